"""From a checked folder to a ready model and tokenizer: dtype, device, quantization.

Weights load safely (safetensors first; ``.bin`` with ``torch.load(weights_only=True)``)
after :func:`~langchain_baichuan2.loading.checkpoint.check_checkpoint` passed.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch
from transformers import BitsAndBytesConfig, GenerationConfig

from langchain_baichuan2.errors import ModelUnloadedError
from langchain_baichuan2.loading.checkpoint import (
    CheckpointError,
    check_checkpoint,
    raise_on_mismatch,
    read_bin,
    tokenizer_file,
    weight_files,
    weights_source,
)
from langchain_baichuan2.loading.sources import Source, resolve_model_path
from langchain_baichuan2.modeling import BaichuanForCausalLM, BaichuanTokenizer

logger = logging.getLogger(__name__)

Quantization = Literal["4bit", "8bit"] | BitsAndBytesConfig | None
DType = Literal["auto", "float32", "float16", "bfloat16"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

T = TypeVar("T")


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
            tokenizer_file(folder)
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
        # Imported only for quantized checkpoints: bitsandbytes is slow to import and
        # warns on every run.
        from langchain_baichuan2.loading.legacy_4bit import read_legacy_4bit

        legacy_state = read_legacy_4bit(weight_files(folder), config)
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
    """Raise when transformers reports a weight missing or unexpected after all.

    ``check_checkpoint`` already compared the stored names with the config; this
    guards what a quantizer or a state-dict conversion could still leave random.
    """
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    raise_on_mismatch(weights_source(folder), missing, unexpected)


def _normalize_head_from_file(model: BaichuanForCausalLM, folder: Path) -> None:
    """Set ``lm_head`` to the stored rows normalized in fp32, then cast (SPEC: NormHead).

    ``from_pretrained`` already normalized the rows after casting to the load dtype;
    when that dtype is narrower than the stored one, normalizing first is what the
    official model computes, so the stored tensor is read again (one tensor, mmap).
    """
    head = model.lm_head.weight
    if head.device.type == "meta":
        return
    files = weight_files(folder)
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
            state = read_bin(path)
            if "lm_head.weight" not in state:
                continue
            stored = state["lm_head.weight"]
        if stored.dtype == head.dtype:
            return  # normalizing after the cast already was normalizing in fp32
        normalized = torch.nn.functional.normalize(stored.float(), dim=-1, eps=1e-12)
        with torch.no_grad():
            head.copy_(normalized.to(device=head.device, dtype=head.dtype))
        return
