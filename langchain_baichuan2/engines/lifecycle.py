"""The front door to engines: which backend, shared engines, unload, and what is retried.

``open(spec)`` returns the shared engine for an ``EngineSpec`` (loading the model or
starting vLLM on first use, replacing an engine that died); ``release(spec)`` stops it.
``Attempts`` runs one call's tries: a call whose engine stopped before its answer
began (``EngineStoppedError``, nothing else) starts again, within one ``timeout``.
The LangChain classes know this module and ``Engine``, never a backend class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import GenerationConfig

from langchain_baichuan2.engines.base import Engine
from langchain_baichuan2.engines.settings import NATIVE_LIMITS, VLLM_LIMITS, BackendLimits
from langchain_baichuan2.errors import EngineStoppedError, ModelUnloadedError
from langchain_baichuan2.loading import (
    LOAD_SETTINGS,
    DType,
    LoadedModel,
    Quantization,
    Source,
    load_tokenizer,
    registry,
    resolve_model_path,
)

if TYPE_CHECKING:
    from langchain_baichuan2.engines.settings import SamplingParams
    from langchain_baichuan2.modeling import BaichuanTokenizer

logger = logging.getLogger(__name__)

Backend = Literal["auto", "native", "vllm"]
_NATIVE_ONLY = (
    "quantization",
    "device_map",
    "compile",
    "kv_cache_bytes",
    "prefill_chunk_tokens",
    "merged_adapter",
)


@dataclass(frozen=True)
class EngineSpec:
    """What decides which engine serves a model: equal specs share one engine.

    Built from a ``ChatBaichuan2``'s or ``Baichuan2Embeddings``' fields with ``of``.
    """

    model: str
    backend: Backend = "auto"
    revision: str | None = None
    source: Source = "auto"
    dtype: DType = "auto"
    device_map: str | dict | None = None
    quantization: Quantization = None
    compile: bool | None = None
    """Native only: compile the decode step (None: on a CUDA GPU)."""
    kv_cache_bytes: int | None = None
    """Native only: the running requests' key/value memory."""
    prefix_cache_tokens: int = 0
    """Native only: the prefix cache's cap (the largest asked for applies)."""
    prefill_chunk_tokens: int | None = None
    """Native only: prompt tokens fed between two decode steps (the last asked applies)."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    vllm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    extra_arguments: tuple[str, ...] = ()
    """The ``generate()`` arguments the model's fields ask for (``backend="auto"``
    runs natively when vLLM cannot apply them)."""
    show_progress: bool | None = None
    merged_adapter: str | None = None
    """Native only: a LoRA adapter (folder or id) folded into the weights (a model of
    its own, not shared with the base)."""
    lora_adapters: tuple[str, ...] = ()
    """vLLM: the adapters (folders or ids) configured on the object; its engine starts
    with LoRA enabled for them."""

    @classmethod
    def of(cls, obj: Any, model: str | None = None) -> EngineSpec:
        """The spec of an object's fields (those it has); ``model`` replaces its model.

        An object without a ``backend`` field (embeddings) runs natively.
        """
        names = [f.name for f in fields(cls) if f.name not in ("model", "extra_arguments")]
        values = {name: getattr(obj, name) for name in names if hasattr(obj, name)}
        values.setdefault("backend", "native")
        extra = tuple(getattr(obj, "model_kwargs", None) or ())
        named = dict(getattr(obj, "adapters", None) or {})
        chosen = getattr(obj, "adapter", None)
        sources = {*named.values(), named.get(chosen, chosen)} - {None}
        if getattr(obj, "merge_adapter", False):
            sources = set(named.values())
        values["lora_adapters"] = tuple(sorted(sources))
        return cls(model=model or obj.model, extra_arguments=extra, **values)

    @property
    def load_settings(self) -> dict[str, Any]:
        """The settings that pick the loaded model (``LOAD_SETTINGS``, a merged adapter)."""
        settings = {name: getattr(self, name) for name in LOAD_SETTINGS}
        return {**settings, "merged_adapter": self.merged_adapter}

    def vllm_settings(self) -> list[str]:
        """The vLLM-only settings this spec sets."""
        return [
            name
            for name, is_set in (
                ("tensor_parallel_size", self.tensor_parallel_size != 1),
                ("pipeline_parallel_size", self.pipeline_parallel_size != 1),
                ("vllm_kwargs", bool(self.vllm_kwargs)),
            )
            if is_set
        ]

    def native_settings(self) -> list[str]:
        """The native-only settings this spec sets."""
        return [name for name in _NATIVE_ONLY if getattr(self, name) is not None]

    @property
    def resolved_backend(self) -> Literal["native", "vllm"]:
        """The backend that runs it.

        ``"auto"`` is vLLM when it is installed, a CUDA GPU is present and no
        native-only setting or argument is asked for; else native.
        """
        if self.backend != "auto":
            return self.backend
        if self.vllm_settings():
            return "vllm"
        if self.native_settings() or set(self.extra_arguments) - set(VLLM_LIMITS.extra_arguments):
            return "native"
        return "vllm" if torch.cuda.is_available() and _vllm_available() else "native"

    @property
    def limits(self) -> BackendLimits:
        """What its backend can honour."""
        return VLLM_LIMITS if self.resolved_backend == "vllm" else NATIVE_LIMITS

    def check(self) -> None:
        """Raise ``ValueError`` naming settings that only apply to the other backend."""
        backend = self.resolved_backend
        wrong = self.vllm_settings() if backend == "native" else self.native_settings()
        if wrong:
            other = "vllm" if backend == "native" else "native"
            msg = (
                f"{', '.join(wrong)} only apply to backend='{other}', but this model runs on "
                f"backend='{backend}'"
                + ("" if backend == "native" else "; pass vLLM's own settings in vllm_kwargs")
            )
            raise ValueError(msg)
        self.limits.check(None, ((name, None) for name in self.extra_arguments))

    def _vllm_values(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "source": self.source,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "vllm_kwargs": dict(self.vllm_kwargs),
            "adapters": self.lora_adapters,
        }


def _vllm_available() -> bool:
    from langchain_baichuan2.engines.vllm import vllm_available

    return vllm_available()


def loaded_model(spec: EngineSpec) -> LoadedModel:
    """The shared loaded model of the native backend (loaded on first use)."""
    return registry.get(spec.model, show_progress=spec.show_progress, **spec.load_settings)


def open(spec: EngineSpec) -> Engine:
    """The shared engine for ``spec``, started on first use (a dead one is replaced).

    Raises:
        ImportError: ``backend="vllm"`` without vLLM installed.
        CheckpointError: The checkpoint is missing, incomplete or not Baichuan2.
    """
    if spec.resolved_backend == "vllm":
        from langchain_baichuan2.engines import vllm

        try:
            return vllm.vllm_engine_for(spec.model, **spec._vllm_values())
        except vllm.NativeOnlyCheckpoint:
            if spec.backend != "auto" or spec.vllm_settings():
                raise
    from langchain_baichuan2.engines.native import engine_for

    while True:
        try:
            return engine_for(
                loaded_model(spec),
                spec.compile,
                spec.kv_cache_bytes,
                prefix_cache_tokens=spec.prefix_cache_tokens,
                prefill_chunk_tokens=spec.prefill_chunk_tokens,
            )
        except ModelUnloadedError:
            continue  # unloaded between the lookup and the start: load it again


def release(spec: EngineSpec) -> bool:
    """Stop the engine of ``spec`` and free its model; return whether one was running.

    Every object sharing it loses it too; the next ``open`` starts it again. Never
    downloads or loads anything.
    """
    if spec.resolved_backend == "native":
        return registry.unload(spec.model, **spec.load_settings)
    from langchain_baichuan2.engines import vllm

    return vllm.shutdown_vllm_engine(spec.model, **spec._vllm_values())


def tokenizer_and_defaults(spec: EngineSpec) -> tuple[BaichuanTokenizer, GenerationConfig | None]:
    """The checkpoint's tokenizer and generation defaults, without loading its weights.

    The loaded model's when it is loaded, else read from its folder (a model id is
    downloaded first); the defaults are None when the folder has none.
    """
    loaded = registry.peek(spec.model, **spec.load_settings)
    if loaded is not None:
        return loaded.tokenizer, loaded.generation_config
    folder = resolve_model_path(spec.model, revision=spec.revision, source=spec.source)
    has_defaults = (folder / "generation_config.json").is_file()
    defaults = GenerationConfig.from_pretrained(folder) if has_defaults else None
    return load_tokenizer(folder, source="local"), defaults


class Attempts:
    """The tries of one call: a retry when its engine stopped before the answer began.

    Only ``EngineStoppedError`` (the model was unloaded, the vLLM engine died) is
    retried, at most ``max_retries`` times; errors of the request itself never are.
    A request's ``timeout`` is the whole call's: each try gets what is left of it.

    Example:
        ```python
        attempts = Attempts(max_retries=2)
        for _ in attempts:
            try:
                ...  # stream with attempts.limit(params); return when done
            except Exception as e:
                attempts.failed(e, answered)  # raises unless this call is retried
        ```
    """

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self.started = time.monotonic()
        self.attempt = 0
        self.timeout: float | None = None

    def __iter__(self) -> Iterator[int]:
        for attempt in range(self.max_retries + 1):
            self.attempt = attempt
            yield attempt

    def limit(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the time left of the call's timeout (set by the first try).

        Raises:
            TimeoutError: The call's timeout has passed.
        """
        if self.attempt == 0:
            self.timeout = params.timeout
        if self.timeout is None:
            return params
        left = self.started + self.timeout - time.monotonic()
        if left <= 0:
            raise self._timed_out()
        return replace(params, timeout=left)

    def failed(self, error: Exception, answered: bool) -> None:
        """Return if the call starts again; else raise ``error`` (a timeout: the call's)."""
        if isinstance(error, TimeoutError) and self.timeout is not None:
            raise self._timed_out() from error
        if not isinstance(error, EngineStoppedError) or answered:
            raise error
        if self.attempt == self.max_retries:
            raise error
        logger.warning("%s; starting the call again (retry %d)", error, self.attempt + 1)

    def _timed_out(self) -> TimeoutError:
        msg = (
            f"The call took longer than timeout={self.timeout} s (retries included) and was stopped"
        )
        return TimeoutError(msg)
