"""PEFT LoRA adapters: from a folder, ModelScope or the Hub to checked weights.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, unpickled with ``weights_only=True``), saved by PEFT. What
Baichuan2 serves: LoRA on any of ``TARGET_MODULES``, any rank, ``lora_alpha``,
``use_rslora``; ``lora_dropout`` does nothing at inference. Anything else (DoRA,
``modules_to_save``, embedding or head adapters, other modules, shapes of another
model, non-float tensors) is refused with a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from langchain_baichuan2.loading.checkpoint import CheckpointError, expected_shapes, read_bin
from langchain_baichuan2.loading.sources import Source, resolve_model_path
from langchain_baichuan2.modeling import BaichuanConfig
from langchain_baichuan2.modeling.lora import PARENT, TARGET_MODULES, Adapter

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)
# Settings that change what an adapter computes, and that we do not serve.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adapters are not supported; merge it with PEFT first",
    "modules_to_save": "modules_to_save (fully trained layers such as embed_tokens or lm_head) "
    "is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "layer_replication": "layer_replication is not supported",
    "fan_in_fan_out": "fan_in_fan_out is not supported (Baichuan2 has no Conv1D layers)",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
}


# Hub ids already resolved to a snapshot folder (so a call does not probe the hubs).
_RESOLVED: dict[tuple[str, str | None, str], Path] = {}


def is_adapter_folder(name: str | Path) -> bool:
    """Whether ``name`` is a local folder holding a PEFT adapter (and no model)."""
    folder = Path(name).expanduser()
    return (folder / CONFIG_FILE).is_file() and not (folder / "config.json").is_file()


def resolve_adapter_path(
    name: str | Path, *, revision: str | None = None, source: Source = "auto"
) -> Path:
    """A local folder for an adapter: the folder itself, or a hub snapshot.

    Raises:
        CheckpointError: A missing folder, a bad id, or a folder without an adapter.
        DownloadError: No hub had the id.
    """
    path = Path(name).expanduser()
    local = path.is_dir() or path.is_absolute() or str(name).startswith(".")
    if local and not path.is_dir():
        raise CheckpointError(f"Adapter folder {str(path)!r} does not exist")
    if local:
        folder = path
    else:  # a hub id: looked up once per process
        key = (str(name), revision, source)
        if key not in _RESOLVED:
            found = resolve_model_path(name, revision=revision, source=source, usable=_usable)
            _RESOLVED[key] = found
        folder = _RESOLVED[key]
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    return folder.resolve()


def adapter_key(name: str | None) -> str | None:
    """One string per adapter location: a folder's absolute path, else the id (no I/O)."""
    if name is None:
        return None
    path = Path(name).expanduser()
    local = path.is_dir() or path.is_absolute() or name.startswith(".")
    return str(path.resolve()) if local else name


def _usable(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and any((folder / f).is_file() for f in WEIGHT_FILES)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of a LoRA adapter folder."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{file}: only LoRA adapters are supported, got peft_type {kind!r}")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{file}: {why} ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: trained biases (bias={config['bias']!r}) are not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple):
        unknown = sorted({t for t in targets if str(t).rsplit(".", 1)[-1] not in TARGET_MODULES})
        if unknown:
            msg = (
                f"{file}: unknown target module(s) {', '.join(map(str, unknown))} for Baichuan2; "
                f"its linear layers are {', '.join(TARGET_MODULES)}"
            )
            raise CheckpointError(msg)
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise CheckpointError(f"{file}: r must be an integer >= 1 and lora_alpha a number")
    return config


def adapter_base_model(folder: str | Path) -> str | None:
    """The base model its ``adapter_config.json`` names (``base_model_name_or_path``)."""
    return read_adapter_config(Path(folder).expanduser()).get("base_model_name_or_path")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".bin":
            return read_bin(path)  # weights_only=True; refuses anything else
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            msg = f"Adapter weights {path} are truncated or corrupt: {type(e).__name__}: {e}"
            raise CheckpointError(msg) from e
    msg = f"No adapter weights in {folder}: expected {' or '.join(WEIGHT_FILES)}"
    raise CheckpointError(msg)


def read_adapter(folder: Path, config: BaichuanConfig) -> Adapter:
    """Read and check the LoRA adapter in ``folder`` for a model of ``config``.

    Raises:
        CheckpointError: Anything it holds that Baichuan2 cannot serve exactly (named).
    """
    settings = read_adapter_config(folder)
    rank = int(settings["r"])
    alpha = float(settings.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    shapes = expected_shapes(config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(folder).items():
        where = f"{folder}: tensor {key}"
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(f"{where} is {kind}, not floating point")
        match = _KEY.fullmatch(key)
        if match is None:
            if "embed_tokens" in key or "lm_head" in key:
                msg = f"{where}: adapters of embed_tokens or lm_head are not supported"
            else:
                msg = f"{where} is not a LoRA weight of {', '.join(TARGET_MODULES)}"
            raise CheckpointError(msg)
        layer, parent, module, half = int(match[1]), match[2], match[3], match[4]
        if module not in TARGET_MODULES or PARENT[module] != parent:
            raise CheckpointError(f"{where}: unknown module {parent}.{module} for Baichuan2")
        if layer >= config.num_hidden_layers:
            msg = f"{where}: layer {layer}, but the model has {config.num_hidden_layers} layers"
            raise CheckpointError(msg)
        out_features, in_features = shapes[f"{parent}.{module}.weight"]
        expected = (rank, in_features) if half == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            msg = (
                f"{where} has shape {tuple(tensor.shape)}, expected {expected} (r={rank} on a "
                f"model of hidden size {config.hidden_size}): was it trained for another model?"
            )
            raise CheckpointError(msg)
        halves.setdefault((layer, module), {})[half] = tensor.float()
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise CheckpointError(f"{folder}: layer {layer} {module} has no lora_{missing}")
        weights[layer, module] = (pair["A"], pair["B"])
    if not weights:
        raise CheckpointError(f"{folder}: the adapter holds no LoRA weights")
    return Adapter(
        name=str(folder),
        scale=scale,
        rank=rank,
        weights=weights,
        base_model_name_or_path=settings.get("base_model_name_or_path"),
    )
