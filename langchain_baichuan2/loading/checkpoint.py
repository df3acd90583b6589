"""Is this folder a complete Baichuan2 checkpoint? Every check, before any weight loads.

The leaf of ``loading``: it imports only ``modeling``, torch, safetensors and
sentencepiece, so the vLLM plugin runs the same checks as the native loader.
Safetensors are read from their headers; ``.bin`` files are memory-mapped with
``weights_only=True``, so no tensor data is read.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from langchain_baichuan2.modeling import BaichuanConfig, BaichuanTokenizer

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "check_tensor_names",
    "raise_on_mismatch",
    "weights_source",
    "expected_names",
    "expected_shapes",
    "read_bin",
    "read_config",
    "tokenizer_file",
    "weight_files",
]


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or not Baichuan2."""


# safetensors' names of the floating-point dtypes a model weight may be stored in.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_SAFETENSORS_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "self_attn.W_pack.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
# Baichuan-1 7B saved its RoPE frequencies; transformers ignores them for RoPE models.
_ROPE_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# The Chat-4bits releases (bitsandbytes 0.41) store a quantized ``X.weight`` as
# ``X.weight.data`` and ``X.weight.quant_state`` (a list).
_LEGACY_STATE = ".weight.quant_state"
# bitsandbytes 8-bit keeps these beside a layer's weight (4-bit: under ``X.weight.``).
_INT8_EXTRAS = ("SCB", "weight_format")


def expected_shapes(config: BaichuanConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the official state-dict entries of one decoder layer and the ends."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    return {
        "model.embed_tokens.weight": (v, h),
        "self_attn.W_pack.weight": (3 * h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }


def expected_names(config: BaichuanConfig) -> list[str]:
    """Every tensor an unquantized checkpoint of this config stores, in model order."""
    layers = [
        f"model.layers.{n}.{name}"
        for n in range(config.num_hidden_layers)
        for name in _LAYER_WEIGHTS
    ]
    return ["model.embed_tokens.weight", *layers, "model.norm.weight", "lm_head.weight"]


def read_config(folder: Path) -> BaichuanConfig:
    """Read ``config.json`` and insist that it describes a Baichuan2 model."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        msg = f"{config_file} is missing: {folder} is not a model checkpoint folder"
        raise CheckpointError(msg)
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as e:
        msg = f"{config_file} is not valid JSON: {e}"
        raise CheckpointError(msg) from e
    model_type = raw.get("model_type")
    if model_type != "baichuan":
        msg = f"{config_file} is model_type {model_type!r}, not 'baichuan'"
        raise CheckpointError(msg)
    try:
        return BaichuanConfig.from_pretrained(folder)
    except Exception as e:
        msg = f"{config_file} does not describe a Baichuan2 model: {e}"
        raise CheckpointError(msg) from e


def weight_files(folder: Path) -> list[Path]:
    """List the checkpoint's weight files, preferring safetensors, via the index if any."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                msg = f"{index} is not a valid weights index: {e}"
                raise CheckpointError(msg) from e
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                msg = f"{index} lists shards that are missing from {folder}: {', '.join(missing)}"
                raise CheckpointError(msg)
            return [folder / s for s in shards]
        if (folder / single_name).is_file():
            return [folder / single_name]
    msg = (
        f"No weights in {folder}: expected model.safetensors, pytorch_model.bin, "
        "or a sharded checkpoint with its index json"
    )
    raise CheckpointError(msg)


def tokenizer_file(folder: Path) -> Path:
    """The checkpoint's ``tokenizer.model``; raises ``CheckpointError`` when it is missing."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        msg = f"{path} is missing: the tokenizer cannot be loaded"
        raise CheckpointError(msg)
    return path


def read_bin(path: Path) -> dict[str, Any]:
    """Unpickle a ``.bin`` with ``weights_only=True`` (tensors, lists, sizes and dtypes only).

    The file is memory-mapped: a 13B checkpoint is not read into memory.
    """
    try:
        with zipfile.ZipFile(path):
            pass
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; name only what was refused.
        lines = str(e).splitlines()
        detail = next((line.strip() for line in lines if "WeightsUnpickler" in line), str(e))
        msg = (
            f"Could not read {path} safely: only tensors, lists, tuples, sizes and dtypes "
            f"may be unpickled from a checkpoint ({type(e).__name__}: {detail})"
        )
        raise CheckpointError(msg) from e
    except Exception as e:
        msg = f"Weights file {path} is truncated or corrupt: {type(e).__name__}: {e}"
        raise CheckpointError(msg) from e


def _stored_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str] | None]:
    """Each stored key with its (shape, dtype name), or None for a non-tensor entry."""
    if path.suffix != ".safetensors":
        return {
            key: (
                (tuple(value.shape), _SAFETENSORS_NAMES.get(value.dtype, str(value.dtype)))
                if isinstance(value, torch.Tensor)
                else None
            )
            for key, value in read_bin(path).items()
        }
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored: dict[str, tuple[tuple[int, ...], str] | None] = {}
            for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensor = f.get_slice(key)
                stored[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
            return stored
    except Exception as e:
        msg = f"Weights file {path} is truncated or corrupt: {type(e).__name__}: {e}"
        raise CheckpointError(msg) from e


def _check_shape(path: Path, key: str, shape: tuple[int, ...], config: BaichuanConfig) -> None:
    """Raise when a stored tensor's shape disagrees with config.json."""
    short = key.split(".", 3)[-1] if key.startswith("model.layers.") else key
    want = expected_shapes(config).get(short)
    if want is not None and shape != want:
        msg = (
            f"Tensor {key!r} in {path} has shape {list(shape)}, but config.json implies "
            f"{list(want)}: the weights do not match the config"
        )
        raise CheckpointError(msg)


def _check_float(path: Path, key: str, dtype: str) -> None:
    """Raise when an unquantized checkpoint stores a tensor as integers or booleans.

    Loading would cast such values to floats silently and the model would answer
    garbage.
    """
    if dtype not in _FLOAT_DTYPES:
        msg = (
            f"Tensor {key!r} in {path} is stored as {dtype.removeprefix('torch.')}, not a "
            "floating-point dtype: the weights are corrupt, or quantized without a "
            "quantization_config in config.json"
        )
        raise CheckpointError(msg)


def _is_quantization_entry(key: str, weights: set[str]) -> bool:
    """Whether ``key`` is bitsandbytes' statistics of one of the expected ``weights``."""
    if any(key.startswith(f"{weight}.") for weight in weights):
        return True
    layer, _, last = key.rpartition(".")
    return last in _INT8_EXTRAS and f"{layer}.weight" in weights


def check_tensor_names(stored: Iterable[str], config: BaichuanConfig, where: str) -> None:
    """Raise naming each missing and unexpected tensor: none may be random or ignored.

    A quantized checkpoint may also hold bitsandbytes' statistics of its weights; the
    Chat-4bits releases store a quantized ``X.weight`` as ``X.weight.data`` (its
    ``X.weight.quant_state`` is checked by ``legacy_4bit``). ``where`` names the
    weights in the message (the folder and its files); the vLLM plugin's
    ``load_weights`` checks the names it received with it too.
    """
    keys = set(stored)
    expected = expected_names(config)
    quantized = getattr(config, "quantization_config", None) is not None
    if quantized and any(key.endswith(_LEGACY_STATE) for key in keys):
        expected = [
            name + ".data" if name + ".data" in keys and name not in keys else name
            for name in expected
        ]
    wanted = set(expected)
    weights = {name.removesuffix(".data") for name in wanted}
    missing = [name for name in expected if name not in keys]
    unexpected = sorted(
        key
        for key in keys - wanted
        if not (config.position_embedding == "rope" and _ROPE_BUFFER.fullmatch(key))
        and not (quantized and _is_quantization_entry(key, weights))
    )
    raise_on_mismatch(where, missing, unexpected)


def raise_on_mismatch(where: str, missing: Sequence[str], unexpected: Sequence[str]) -> None:
    """Raise ``CheckpointError`` naming the missing and unexpected tensors, if any."""
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}")
    msg = (
        f"The weights in {where} do not match config.json: "
        + "; ".join(problems)
        + ("..." if len(missing) > 8 or len(unexpected) > 8 else "")
    )
    raise CheckpointError(msg)


def weights_source(model: str | Path) -> str:
    """How errors name the weights of ``model``: the folder and its weight files."""
    folder = Path(model)
    if not folder.is_dir():
        return str(model)  # a model id: its files are elsewhere
    return f"{folder} ({', '.join(path.name for path in weight_files(folder))})"


def _check_tokenizer_size(folder: Path, config: BaichuanConfig) -> None:
    """Raise unless the tokenizer's ids, added tokens included, are exactly the vocabulary.

    A Hugging Face fine-tune that added tokens (``added_tokens.json``, resized
    embeddings) has ``vocab_size`` = pieces + added tokens. A smaller vocabulary would
    crash the engine at an id past the embedding table; a larger one would let the
    model sample ids the tokenizer cannot decode.
    """
    import sentencepiece

    path = tokenizer_file(folder)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as e:
        msg = f"{path} is not a SentencePiece model: {e}"
        raise CheckpointError(msg) from e
    pieces = processor.GetPieceSize()
    try:
        length = len(BaichuanTokenizer.from_pretrained(folder))
    except Exception as e:
        msg = f"The tokenizer files in {folder} cannot be loaded: {type(e).__name__}: {e}"
        raise CheckpointError(msg) from e
    if length != config.vocab_size:
        added = f" plus {length - pieces} added tokens" if length != pieces else ""
        msg = (
            f"{path} has {pieces} pieces{added} but config.json says vocab_size "
            f"{config.vocab_size}: the tokenizer does not belong to these weights"
        )
        raise CheckpointError(msg)


def check_checkpoint(folder: Path) -> BaichuanConfig:
    """Check that ``folder`` holds a complete Baichuan2 checkpoint; return its config.

    Checks ``config.json``, the tokenizer's size, and every weight file: its framing,
    each tensor's name, and (unquantized) its shape and floating-point dtype.

    Raises:
        CheckpointError: Naming the file or tensor at fault.
    """
    config = read_config(folder)
    _check_tokenizer_size(folder, config)
    quantized = getattr(config, "quantization_config", None) is not None
    files = weight_files(folder)
    names: list[str] = []
    for path in files:
        for key, tensor in _stored_tensors(path).items():
            names.append(key)
            if quantized:
                continue
            if tensor is None:
                msg = f"Entry {key!r} in {path} is not a tensor"
                raise CheckpointError(msg)
            _check_shape(path, key, tensor[0], config)
            _check_float(path, key, tensor[1])
    check_tensor_names(names, config, weights_source(folder))
    return config
