"""From a folder or model id to a ready Baichuan2 model and tokenizer.

Resolves the source (local folder, ModelScope, Hugging Face Hub), checks the files,
picks dtype / device / quantization, loads weights safely (safetensors first; ``.bin``
with ``torch.load(weights_only=True)``), and shares loaded models through a registry.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch
from transformers import BitsAndBytesConfig, GenerationConfig

from langchain_baichuan2.modeling import BaichuanConfig, BaichuanForCausalLM, BaichuanTokenizer

logger = logging.getLogger(__name__)

Source = Literal["auto", "local", "modelscope", "huggingface"]
Quantization = Literal["4bit", "8bit"] | BitsAndBytesConfig | None
DType = Literal["auto", "float32", "float16", "bfloat16"]

SOURCES: tuple[str, ...] = ("auto", "local", "modelscope", "huggingface")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Downloads never fetch the Python files that sit beside official checkpoints.
_SKIP_PATTERNS = ["*.py", "*.pyc"]
# What a hub model id may look like: one owner, one name, no path tricks.
_MODEL_ID = re.compile(r"[\w.-]+/[\w.-]+")


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or not Baichuan2."""


class DownloadError(RuntimeError):
    """A model id could not be fetched from any source."""


class ModelUnloadedError(RuntimeError):
    """The loaded model was unloaded; ask the registry for it again."""


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer, generation defaults and where it came from."""

    model: BaichuanForCausalLM
    tokenizer: BaichuanTokenizer
    generation_config: GenerationConfig
    path: Path
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    """Held around every forward pass; nothing else waits on it."""
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)
    _shared_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _closed: bool = field(default=False, repr=False)

    def shared(self, name: str, build: Callable[[], T]) -> T:
        """The one ``name`` object serving this model (engine, grammar compiler), built once.

        Building never waits for a forward pass (its lock is not the model's).

        Raises:
            ModelUnloadedError: The model was closed: nothing new may start on it.
        """
        with self._shared_lock:
            if self._closed:
                msg = f"The model from {self.path} was unloaded; load it again"
                raise ModelUnloadedError(msg)
            if name not in self._shared:
                self._shared[name] = build()
            return self._shared[name]

    def close(self) -> None:
        """Shut down what serves this model (its engine's worker thread), for good.

        Creating and closing are one atomic lifecycle: nothing built after ``close``
        can be left running, because ``shared`` refuses from then on.
        """
        with self._shared_lock:
            self._closed = True
            services, self._shared = list(self._shared.values()), {}
        for service in services:
            if hasattr(service, "shutdown"):
                service.shutdown()

    @cached_property
    def memory_footprint(self) -> dict[str, int]:
        """Bytes of weights by dtype name, counted once (bitsandbytes repacks on first use)."""
        return weight_bytes_by_dtype(self.model)


def weight_bytes_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Count the bytes of a model's parameters and buffers, grouped by dtype.

    4-bit weights also count their quantization statistics (block scales, nested
    scales, code tables), which bitsandbytes keeps beside the parameter.
    """
    tensors = [*model.parameters(), *model.buffers()]
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            state = state.state2
    totals: Counter[str] = Counter()
    for tensor in tensors:
        totals[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
    return dict(totals)


def resolve_dtype(dtype: DType | torch.dtype, *, on_gpu: bool) -> torch.dtype:
    """Turn a dtype name into a torch dtype.

    ``"auto"`` is bfloat16 on a GPU (the released weights' dtype) and float32 on CPU,
    where half-precision matmuls are slow.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in _DTYPES:
        msg = f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r}"
        raise ValueError(msg)
    return _DTYPES[dtype]


def quantization_config(
    quantization: Quantization, compute_dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    """Map ``"4bit"`` (NF4, double quant) / ``"8bit"`` / a config / None to a config."""
    if quantization is None or isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    msg = f"quantization must be '4bit', '8bit', a BitsAndBytesConfig or None, got {quantization!r}"
    raise ValueError(msg)


def _download(name: str, revision: str | None, source: Source) -> Path:
    """Fetch ``name`` from ModelScope (as the model card does) and/or the HF Hub."""
    hubs = ["modelscope", "huggingface"] if source == "auto" else [source]
    failures = []
    for hub in hubs:
        try:
            if hub == "modelscope":
                from modelscope import snapshot_download as ms_snapshot_download

                folder = ms_snapshot_download(
                    name, revision=revision or "master", ignore_file_pattern=_SKIP_PATTERNS
                )
            else:
                from huggingface_hub import snapshot_download as hf_snapshot_download

                folder = hf_snapshot_download(
                    name, revision=revision, ignore_patterns=_SKIP_PATTERNS
                )
            return Path(folder)
        except Exception as e:  # each hub raises its own network and lookup errors
            failures.append(f"{hub}: {type(e).__name__}: {e}")
    msg = (
        f"Could not download {name!r}"
        + (f" (revision {revision!r})" if revision else "")
        + " — "
        + "; ".join(failures)
        + ". Check the network connection and the model id, or pass a local folder."
    )
    raise DownloadError(msg)


def resolve_model_path(
    name: str | Path, *, revision: str | None = None, source: Source = "auto"
) -> Path:
    """Return a local folder for ``name``: the folder itself, or a downloaded snapshot."""
    if source not in SOURCES:
        msg = f"source must be one of {', '.join(SOURCES)}; got {source!r}"
        raise ValueError(msg)
    path = Path(name).expanduser()
    if source in ("auto", "local") and path.is_dir():
        return path
    if source == "local" or path.is_absolute() or str(name).startswith("."):
        msg = f"Model folder {str(path)!r} does not exist"
        raise CheckpointError(msg)
    if not _MODEL_ID.fullmatch(str(name)) or ".." in str(name):
        msg = (
            f"{str(name)!r} is neither an existing folder nor a model id of the form "
            "'owner/name' (such as 'baichuan-inc/Baichuan2-7B-Chat')"
        )
        raise CheckpointError(msg)
    return _download(str(name), revision, source)


def _weight_files(folder: Path) -> list[Path]:
    """List the checkpoint's weight files, preferring safetensors, via the index if any."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
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


# safetensors' names of the floating-point dtypes a model weight may be stored in.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _check_weight_file(path: Path, config: BaichuanConfig | None) -> None:
    """Check a weights file's framing (cheap) so corrupt files fail with their name.

    With a ``config``, every tensor's shape is checked against it and its dtype must
    be floating point (quantized checkpoints store packed integer tensors, so they
    pass None). Safetensors are read from their header; ``.bin`` files are memory-mapped
    with ``weights_only=True``, so no tensor data is read.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    if config is not None:
                        tensor = f.get_slice(key)
                        _check_shape(path, key, tuple(tensor.get_shape()), config)
                        _check_float(path, key, tensor.get_dtype())
        else:
            with zipfile.ZipFile(path):
                pass
            if config is not None:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for key, value in state.items():
                    _check_shape(path, key, tuple(value.shape), config)
                    _check_float(path, key, _SAFETENSORS_NAMES.get(value.dtype, str(value.dtype)))
    except CheckpointError:
        raise
    except Exception as e:
        msg = f"Weights file {path} is truncated or corrupt: {type(e).__name__}: {e}"
        raise CheckpointError(msg) from e


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


_SAFETENSORS_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


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


def _tokenizer_file(folder: Path) -> Path:
    """The checkpoint's ``tokenizer.model``; raises ``CheckpointError`` when it is missing."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        msg = f"{path} is missing: the tokenizer cannot be loaded"
        raise CheckpointError(msg)
    return path


def _check_tokenizer_size(path: Path, config: BaichuanConfig) -> None:
    """Raise when ``tokenizer.model`` and config.json disagree on the vocabulary size.

    Ids past the embedding table would crash the engine at the first request.
    """
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as e:
        msg = f"{path} is not a SentencePiece model: {e}"
        raise CheckpointError(msg) from e
    pieces = processor.GetPieceSize()
    if pieces != config.vocab_size:
        msg = (
            f"{path} has {pieces} pieces but config.json says vocab_size "
            f"{config.vocab_size}: the tokenizer does not belong to these weights"
        )
        raise CheckpointError(msg)


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


def check_checkpoint(folder: Path) -> BaichuanConfig:
    """Check that ``folder`` holds a complete Baichuan2 checkpoint; return its config."""
    config = read_config(folder)
    _check_tokenizer_size(_tokenizer_file(folder), config)
    quantized = getattr(config, "quantization_config", None) is not None
    for path in _weight_files(folder):
        _check_weight_file(path, None if quantized else config)
    return config


def load_model_and_tokenizer(
    name: str | Path,
    *,
    revision: str | None = None,
    source: Source = "auto",
    dtype: DType | torch.dtype = "auto",
    device_map: str | dict | None = None,
    quantization: Quantization = None,
    show_progress: bool | None = None,
) -> LoadedModel:
    """Load a Baichuan2 checkpoint from a folder or a model id.

    Args:
        name: A local folder, or a model id such as ``"baichuan-inc/Baichuan2-7B-Chat"``.
        revision: Branch, tag or commit of a downloaded model.
        source: ``"auto"`` (a folder if it exists, else ModelScope then the HF Hub),
            ``"local"``, ``"modelscope"`` or ``"huggingface"``.
        dtype: ``"auto"`` (bfloat16 on GPU, float32 on CPU) or a dtype name.
        device_map: Passed to transformers (``"auto"``, ``"cpu"``, ``"cuda:0"``, a dict);
            None means ``"cuda"`` when a GPU is present, else ``"cpu"``.
        quantization: ``"4bit"`` (NF4, double quant), ``"8bit"``, a
            ``BitsAndBytesConfig``, or None.
        show_progress: Progress bars for download and weight loading; None shows
            them in a terminal or notebook and hides them otherwise (CI, logs).

    Returns:
        The model (eval mode, head normalized), tokenizer and generation defaults.
    """
    with progress_bars(progress_enabled(show_progress)):
        return _load(name, revision, source, dtype, device_map, quantization)


_tokenizers: dict[Path, BaichuanTokenizer] = {}
_tokenizers_lock = threading.Lock()


def load_tokenizer(
    name: str | Path, *, revision: str | None = None, source: Source = "auto"
) -> BaichuanTokenizer:
    """Return the tokenizer of a checkpoint without loading its weights (read once)."""
    folder = resolve_model_path(name, revision=revision, source=source).resolve()
    with _tokenizers_lock:
        if folder not in _tokenizers:
            _tokenizer_file(folder)
            _tokenizers[folder] = BaichuanTokenizer.from_pretrained(folder)
        return _tokenizers[folder]


def progress_enabled(show_progress: bool | None) -> bool:
    """Whether to draw progress bars: as asked, else only when someone is watching."""
    if show_progress is not None:
        return show_progress
    try:
        from IPython import get_ipython

        if get_ipython() is not None:
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' and the HF Hub's tqdm bars on or off, then restore them."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    was_transformers = hf_logging.is_progress_bar_enabled()
    was_hub = not are_progress_bars_disabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_transformers else hf_logging.disable_progress_bar)()
        (enable_progress_bars if was_hub else disable_progress_bars)()


def _load(
    name: str | Path,
    revision: str | None,
    source: Source,
    dtype: DType | torch.dtype,
    device_map: str | dict | None,
    quantization: Quantization,
) -> LoadedModel:
    """The body of :func:`load_model_and_tokenizer`, inside its progress settings."""
    on_gpu = torch.cuda.is_available()
    torch_dtype = resolve_dtype(dtype, on_gpu=on_gpu)
    bnb_config = quantization_config(quantization, torch_dtype)
    folder = resolve_model_path(name, revision=revision, source=source)
    config = check_checkpoint(folder)
    legacy_state = None
    if getattr(config, "quantization_config", None) is not None:
        # Imported only for quantized checkpoints (bitsandbytes is slow to import and
        # warns on every run), and here: legacy_4bit builds on this module's errors.
        from langchain_baichuan2.legacy_4bit import read_legacy_4bit

        legacy_state = read_legacy_4bit(_weight_files(folder), config)
    weights: dict[str, object] = (
        {"pretrained_model_name_or_path": folder}
        if legacy_state is None
        else {
            "pretrained_model_name_or_path": None,
            "config": config,
            "state_dict": legacy_state,
            "generation_config": GenerationConfig.from_pretrained(folder),
        }
    )
    device_map = device_map or ("cuda" if on_gpu else "cpu")
    try:
        loaded_with_info = BaichuanForCausalLM.from_pretrained(
            **weights,
            output_loading_info=True,
            dtype=torch_dtype,
            device_map=device_map,
            quantization_config=bnb_config,
            use_safetensors=None,
            weights_only=True,
            trust_remote_code=False,
        )
    except Exception as e:
        msg = f"Could not load the weights in {folder}: {type(e).__name__}: {e}"
        raise CheckpointError(msg) from e
    model, info = cast(tuple[BaichuanForCausalLM, dict[str, Any]], loaded_with_info)
    _check_every_weight_loaded(info, folder)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.pre_quantized:
        # transformers 5.24 cannot reverse its bitsandbytes deserializer, so save_pretrained
        # fails (huggingface/transformers#45743); the state dict already has the saved layout.
        model._weight_conversions = []  # type: ignore[assignment]
    model.eval()
    if legacy_state is None and config.norm_head:
        _normalize_head_from_file(model, folder)
    tokenizer = BaichuanTokenizer.from_pretrained(folder)
    loaded = LoadedModel(model, tokenizer, model.generation_config, folder)
    footprint = ", ".join(f"{dt} {n / 2**20:.1f} MiB" for dt, n in loaded.memory_footprint.items())
    logger.info("Loaded Baichuan2 from %s on %s (%s)", folder, device_map, footprint)
    return loaded


def _check_every_weight_loaded(info: Mapping[str, Any], folder: Path) -> None:
    """Raise when the files lack a weight the model has, or hold one it does not.

    transformers fills missing weights with random values and only reports them; a
    model with random parts must not load.
    """
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if not missing and not unexpected:
        return
    files = ", ".join(path.name for path in _weight_files(folder))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}")
    msg = (
        f"The weights in {folder} ({files}) do not match config.json: "
        + "; ".join(problems)
        + ("..." if len(missing) > 8 or len(unexpected) > 8 else "")
    )
    raise CheckpointError(msg)


def _normalize_head_from_file(model: BaichuanForCausalLM, folder: Path) -> None:
    """Set ``lm_head`` to the stored rows normalized in fp32, then cast (SPEC: NormHead).

    ``from_pretrained`` already normalized the rows after casting to the load dtype;
    when that dtype is narrower than the stored one, normalizing first is what the
    official model computes, so the stored tensor is read again (one tensor, mmap).
    """
    head = model.lm_head.weight
    if head.device.type == "meta":
        return
    files = _weight_files(folder)
    index = folder / (
        "model.safetensors.index.json"
        if files[0].suffix == ".safetensors"
        else "pytorch_model.bin.index.json"
    )
    if index.is_file():
        files = [folder / json.loads(index.read_text())["weight_map"]["lm_head.weight"]]
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if "lm_head.weight" not in f.keys():  # noqa: SIM118
                    continue
                stored = f.get_tensor("lm_head.weight")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if "lm_head.weight" not in state:
                continue
            stored = state["lm_head.weight"]
        if stored.dtype == head.dtype:
            return  # normalizing after the cast already was normalizing in fp32
        normalized = torch.nn.functional.normalize(stored.float(), dim=-1, eps=1e-12)
        with torch.no_grad():
            head.copy_(normalized.to(device=head.device, dtype=head.dtype))
        return


# The settings that decide which loaded model an object gets (besides the model name).
LOAD_SETTINGS = ("revision", "source", "dtype", "device_map", "quantization")


def load_settings(obj: object) -> dict[str, Any]:
    """The ``LOAD_SETTINGS`` fields of a chat model or embeddings object."""
    return {name: getattr(obj, name) for name in LOAD_SETTINGS}


class ModelRegistry:
    """Shares one loaded model between every object that asks for the same settings."""

    def __init__(self) -> None:
        self._models: dict[tuple, LoadedModel] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    @staticmethod
    def key(name: str | Path, settings: Mapping[str, Any]) -> tuple:
        """The identity of a load request (equal keys share one model)."""
        path = Path(name).expanduser()
        where = str(path.resolve()) if path.is_dir() else str(name)
        quantization = settings.get("quantization")
        quant = (
            quantization.to_json_string()
            if isinstance(quantization, BitsAndBytesConfig)
            else quantization
        )
        device_map = settings.get("device_map")
        device = (
            json.dumps(device_map, sort_keys=True) if isinstance(device_map, dict) else device_map
        )
        return (
            where,
            settings.get("revision"),
            settings.get("source", "auto"),
            # "auto" and the dtype it resolves to are the same weights.
            str(resolve_dtype(settings.get("dtype", "auto"), on_gpu=torch.cuda.is_available())),
            device,
            quant,
        )

    def get(
        self, name: str | Path, *, show_progress: bool | None = None, **settings: Any
    ) -> LoadedModel:
        """Return the shared model for these settings, loading it on first request.

        Args:
            name: A local folder or a model id.
            show_progress: Progress bars if it has to load (see ``load_model_and_tokenizer``).
            **settings: ``revision``, ``source``, ``dtype``, ``device_map``,
                ``quantization``, as for ``load_model_and_tokenizer``.
        """
        key = self.key(name, settings)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per key, even when many threads ask at once
            if key not in self._models:
                self._models[key] = load_model_and_tokenizer(
                    name, show_progress=show_progress, **settings
                )
            return self._models[key]

    def peek(self, name: str | Path, **settings: Any) -> LoadedModel | None:
        """Return the shared model for these settings if it is loaded; never loads it."""
        return self._models.get(self.key(name, settings))

    def unload(self, name: str | Path, **settings: Any) -> bool:
        """Forget the model loaded for these settings and stop its engine.

        Its memory is freed once no object holds it any more. Returns whether one was
        loaded.
        """
        with self._guard:
            loaded = self._models.pop(self.key(name, settings), None)
        if loaded is not None:
            loaded.close()
        return loaded is not None

    def clear(self) -> None:
        """Forget every loaded model and stop its engine (freed once nothing holds it)."""
        with self._guard:
            models, self._models = list(self._models.values()), {}
            self._locks.clear()
        for loaded in models:
            loaded.close()


registry = ModelRegistry()
# Stop worker threads before the interpreter tears native libraries down.
atexit.register(registry.clear)
