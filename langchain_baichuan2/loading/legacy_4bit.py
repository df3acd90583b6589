"""Read the Chat-4bits releases' bitsandbytes 0.41 weights into today's bitsandbytes layout.

Baichuan2-7B-Chat-4bits and 13B-Chat-4bits store each quantized linear layer as two
entries of one ``pytorch_model.bin``: ``<name>.weight.data`` (the packed NF4 bytes) and
``<name>.weight.quant_state``, a Python list in the layout of bitsandbytes 0.41::

    [absmax (uint8), shape (torch.Size), dtype (torch.dtype), blocksize (int),
     [offset (tensor), (nested_absmax (tensor), nested_code (tensor))],
     quant_type ("nf4"), code (tensor)]

The absmax of each block is itself quantized (double quantization): blockwise, in
blocks of 256, after subtracting ``offset``. Current bitsandbytes cannot read that list.
This module turns each one into a :class:`bitsandbytes.functional.QuantState` (the
stored tensors as they are: nothing is re-quantized) and lays it out as bitsandbytes
serializes a ``QuantState`` today, so transformers' own loader for pre-quantized
bitsandbytes checkpoints builds the ``Linear4bit`` layers from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bitsandbytes.functional import QuantState

from langchain_baichuan2.loading.checkpoint import CheckpointError, expected_shapes, read_bin
from langchain_baichuan2.modeling import BaichuanConfig

__all__ = ["QUANTIZED_LINEARS", "convert_legacy_4bit", "read_legacy_4bit"]

QUANTIZED_LINEARS = (
    "self_attn.W_pack",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""The linear layers of each decoder layer that the Chat-4bits releases quantize."""

_DATA = ".weight.data"
_STATE = ".weight.quant_state"
# bitsandbytes 0.41 quantized the absmax in blocks of 256 and did not store that size.
_NESTED_BLOCKSIZE = 256
_STATE_LENGTH = 7
_STATE_LAYOUT = (
    "[absmax, shape, dtype, blocksize, [offset, (nested_absmax, nested_code)], quant_type, code]"
)


def _config_wants_4bit(config: BaichuanConfig) -> bool:
    """Whether ``config.json`` declares bitsandbytes 4-bit weights."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return bool(quantization and quantization.get("load_in_4bit"))


def _is_legacy(state: dict[str, Any]) -> bool:
    """Whether a state dict holds bitsandbytes 0.41 ``quant_state`` lists."""
    return any(key.endswith(_STATE) and isinstance(value, list) for key, value in state.items())


def read_legacy_4bit(
    files: Sequence[Path], config: BaichuanConfig
) -> dict[str, torch.Tensor] | None:
    """Read a Chat-4bits checkpoint and convert it, or return None for any other layout.

    A checkpoint is in the legacy layout when ``config.json`` declares 4-bit
    bitsandbytes weights and its ``.bin`` state dict holds ``...weight.quant_state``
    entries that are lists.

    Args:
        files: The checkpoint's weight files.
        config: The checkpoint's configuration.

    Returns:
        The state dict in current bitsandbytes' serialized layout (see
        :func:`convert_legacy_4bit`), or None when the checkpoint is not legacy 4-bit.

    Raises:
        CheckpointError: When a file cannot be read safely or a legacy entry is
            missing, malformed or does not fit the config.
    """
    if not _config_wants_4bit(config) or any(f.suffix != ".bin" for f in files):
        return None
    state: dict[str, Any] = {}
    for path in files:
        state.update(read_bin(path))
    if not _is_legacy(state):
        return None
    return convert_legacy_4bit(state, config, where=str(files[0].parent))


def _fail(name: str, where: str, problem: str) -> CheckpointError:
    """The error for a tensor ``name`` of the checkpoint at ``where``."""
    return CheckpointError(f"Tensor {name!r} in {where} {problem}")


def _quant_state(name: str, legacy: object, shape: tuple[int, ...], where: str) -> QuantState:
    """Build a ``QuantState`` from one bitsandbytes 0.41 list, checking every field.

    Args:
        name: The state-dict key of the list, for error messages.
        legacy: The unpickled list.
        shape: The weight shape that ``config.json`` implies.
        where: The checkpoint folder, for error messages.

    Returns:
        A nested NF4 ``QuantState`` holding the stored tensors.
    """
    if not isinstance(legacy, list | tuple) or len(legacy) != _STATE_LENGTH:
        raise _fail(name, where, f"is not a bitsandbytes 0.41 quant_state {_STATE_LAYOUT}")
    absmax, stored_shape, dtype, blocksize, nested, quant_type, code = legacy
    if quant_type != "nf4":
        raise _fail(name, where, f"has quant type {quant_type!r}; the Chat-4bits layout is 'nf4'")
    if not isinstance(stored_shape, Sequence) or tuple(stored_shape) != shape:
        raise _fail(
            name,
            where,
            f"describes a weight of shape {stored_shape!r}, but config.json implies "
            f"{list(shape)}: the weights do not match the config",
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _fail(name, where, f"has original dtype {dtype!r}, not a floating dtype")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise _fail(name, where, f"has blocksize {blocksize!r}, not a positive int")
    if not isinstance(nested, list | tuple) or len(nested) != 2:
        raise _fail(name, where, "has no [offset, (nested_absmax, nested_code)] entry")
    offset, nested_state = nested
    if not isinstance(nested_state, list | tuple) or len(nested_state) != 2:
        raise _fail(name, where, "has no (nested_absmax, nested_code) pair")
    nested_absmax, nested_code = nested_state
    tensors = {
        "absmax": absmax,
        "offset": offset,
        "nested_absmax": nested_absmax,
        "nested_code": nested_code,
        "code": code,
    }
    for field, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise _fail(name, where, f"has a {type(value).__name__} as {field}, not a tensor")
    blocks = math.ceil(math.prod(shape) / blocksize)
    if absmax.dtype != torch.uint8 or absmax.numel() != blocks:
        raise _fail(
            name,
            where,
            f"has a {absmax.dtype} absmax of {absmax.numel()} values; "
            f"expected {blocks} uint8 values (blocksize {blocksize}, double quantized)",
        )
    nested_blocks = math.ceil(blocks / _NESTED_BLOCKSIZE)
    if nested_absmax.numel() != nested_blocks:
        raise _fail(
            name,
            where,
            f"has {nested_absmax.numel()} nested absmax values; expected {nested_blocks} "
            f"(blocks of {_NESTED_BLOCKSIZE})",
        )
    return QuantState(
        absmax=absmax,
        shape=torch.Size(shape),
        code=code,
        blocksize=blocksize,
        quant_type="nf4",
        dtype=dtype,
        offset=offset.reshape(()),
        state2=QuantState(
            absmax=nested_absmax,
            code=nested_code,
            blocksize=_NESTED_BLOCKSIZE,
            dtype=nested_absmax.dtype,
        ),
    )


def convert_legacy_4bit(
    state: dict[str, Any], config: BaichuanConfig, *, where: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Rewrite a legacy Chat-4bits state dict in current bitsandbytes' serialized layout.

    Each ``<name>.weight.data`` / ``<name>.weight.quant_state`` pair becomes
    ``<name>.weight`` (the same packed bytes, viewed as ``[n, 1]``) plus the keys that
    ``QuantState.as_dict(packed=True)`` writes (``absmax``, ``quant_map``,
    ``nested_absmax``, ``nested_quant_map``, ``quant_state.bitsandbytes__nf4``), which is
    what ``save_pretrained`` writes for a 4-bit model today. Every other tensor is kept.

    Args:
        state: The unpickled state dict; it is not modified.
        config: The checkpoint's configuration (layer count and shapes).
        where: The checkpoint's location, for error messages.

    Returns:
        The converted state dict.

    Raises:
        CheckpointError: Naming the tensor, when a quantized layer lacks its packed
            data or quant_state, when a quant_state is not nf4 or malformed, or when a
            shape does not match the config.
    """
    shapes = expected_shapes(config)
    converted: dict[str, torch.Tensor] = {}
    expected: set[str] = set()
    for layer in range(config.num_hidden_layers):
        for linear in QUANTIZED_LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            expected.update((prefix + _DATA, prefix + _STATE))
            for key in (prefix + _DATA, prefix + _STATE):
                if key not in state:
                    raise _fail(key, where, "is missing: every quantized layer needs both")
            shape = shapes[f"{linear}.weight"]
            quant_state = _quant_state(prefix + _STATE, state[prefix + _STATE], shape, where)
            data = state[prefix + _DATA]
            packed = math.ceil(math.prod(shape) / 2)
            if (
                not isinstance(data, torch.Tensor)
                or data.dtype != torch.uint8
                or data.numel() != packed
            ):
                raise _fail(
                    prefix + _DATA,
                    where,
                    f"should hold {packed} uint8 bytes (shape {list(shape)} packed two per "
                    "byte), the config's size for this layer",
                )
            converted[prefix + ".weight"] = data.reshape(-1, 1)
            for key, value in quant_state.as_dict(packed=True).items():
                converted[f"{prefix}.weight.{key}"] = value
    for key, value in state.items():
        if key in expected:
            continue
        if key.endswith((_DATA, _STATE)):
            raise _fail(key, where, "is a quantized entry of a layer the config does not have")
        if not isinstance(value, torch.Tensor):
            raise _fail(key, where, f"is a {type(value).__name__}, not a tensor")
        short = key.split(".", 3)[-1] if key.startswith("model.layers.") else key
        want = shapes.get(short)
        if want is not None and tuple(value.shape) != want:
            raise _fail(
                key,
                where,
                f"has shape {list(value.shape)}, but config.json implies {list(want)}: "
                "the weights do not match the config",
            )
        converted[key] = value
    return converted
