"""The vLLM engine: vLLM's async engine in this process, fed our exact prompt ids.

vLLM schedules, batches and runs the model (tensor / pipeline parallel, Ray for
several nodes); we keep what makes the output Baichuan2's and identical to the
native engine: prompt ids as ``TokensPrompt``, our incremental detokenizing and
stop strings (``OutputText``), the same grammar for tool calls and JSON (sent as
EBNF to vLLM's xgrammar backend). vLLM's ``AsyncLLM`` lives on an event loop in a
background thread, so sync and async callers, from any loop, can share it; leaving
a stream early or cancelling its task aborts the vLLM request at once. LoRA
adapters configured on the model start the engine with vLLM's LoRA enabled; each
request naming one sends a ``LoRARequest`` (one stable id per adapter folder).

Nothing here imports vLLM until an engine is created.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from langchain_baichuan2.engines.base import (
    Engine,
    EngineStoppedError,
    GenerationChunk,
    OutputText,
    SamplingParams,
    deadline_of,
    seconds_to_wait,
    timeout_timer,
)
from langchain_baichuan2.engines.settings import VLLM_LIMITS
from langchain_baichuan2.grammar import build_grammar
from langchain_baichuan2.loading import (
    DType,
    Source,
    check_checkpoint,
    resolve_dtype,
    resolve_model_path,
)
from langchain_baichuan2.loading.adapters import read_adapter, resolve_adapter_path
from langchain_baichuan2.modeling import BaichuanConfig, BaichuanTokenizer
from langchain_baichuan2.prompt import eos_token_ids

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    """Whether vLLM is installed (without importing it)."""
    from importlib.util import find_spec

    return find_spec("vllm") is not None


# How long a shutdown waits for vLLM's requests to end and its processes to exit.
SHUTDOWN_SECONDS = 30
# The vLLM plugin's ``additional_config`` key for "the caller checked this folder"
# (``vllm_plugin.model_config.CHECKED``; not imported: the plugin imports vLLM).
_CHECKED = "baichuan2_checkpoint_checked"
# What sets vLLM's log level; without any of them, a start logs only warnings and errors.
_LOGGING_ARGS = ("log_level", "logging_config", "log_config_file")
_LOGGING_VARIABLES = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_CONFIG_PATH")
# The ranks vLLM sizes its LoRA slots for (``max_lora_rank`` takes only these).
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# One LoRA slot more than adapters, never filled: vLLM's CPU LoRA ops (0.32) index the
# slots with a row's adapter index, and a row without one (index -1) reads the last slot.
_EMPTY_LORA_SLOTS = 1


class VllmEngine(Engine):
    """Generation on vLLM's ``AsyncLLM`` for one checkpoint folder and configuration.

    Args:
        folder: A Baichuan2 checkpoint folder (this package's vLLM plugin loads it).
        config: Its config, as ``check_checkpoint(folder)`` returned it: vLLM only
            starts on a checked folder (a bad one would kill its engine process).
        dtype: ``"auto"`` (bfloat16 on GPU, float32 on CPU) or a dtype name.
        tensor_parallel_size: GPUs (or CPU sockets) each layer is split across.
        pipeline_parallel_size: Stages the layers are split into.
        adapters: The adapter folders it serves (LoRA enabled by ``vllm_kwargs``);
            empty: any adapter its LoRA slots fit.
        vllm_kwargs: Further ``AsyncEngineArgs`` (``gpu_memory_utilization``,
            ``max_model_len``, ``distributed_executor_backend="ray"``, ...). vLLM
            logs only warnings and errors unless ``log_level`` here, or
            ``VLLM_LOGGING_LEVEL`` in the environment, asks for more.
    """

    def __init__(
        self,
        folder: Path,
        config: BaichuanConfig,
        *,
        dtype: DType = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        adapters: tuple[str, ...] = (),
        vllm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.folder = folder
        self.adapters = frozenset(adapters)
        self.tokenizer = BaichuanTokenizer.from_pretrained(folder)
        self.generation_config = GenerationConfig.from_pretrained(folder)
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        self.eos_ids = set(eos_token_ids(self.generation_config, self.tokenizer))
        torch_dtype = resolve_dtype(dtype, on_gpu=torch.cuda.is_available())
        args = {
            "model": str(folder),
            "tokenizer": str(folder),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "max_model_len": config.context_length,
            "enable_prefix_caching": True,
            "trust_remote_code": False,
            **(vllm_kwargs or {}),
        }
        # The folder was checked (_checked_folder): the plugin's hook need not read it again.
        args["additional_config"] = {**args.get("additional_config", {}), _CHECKED: True}
        if not any(args.get(key) for key in _LOGGING_ARGS) and not any(
            os.environ.get(name) for name in _LOGGING_VARIABLES
        ):
            args["log_level"] = "WARNING"  # vLLM passes it to its engine processes too
        self.max_rows = int(args.get("max_num_seqs") or 256)  # vLLM's default on a GPU
        self.max_lora_rank = int(args.get("max_lora_rank") or 16) if args.get("enable_lora") else 0
        self._config = config
        self._closed = False
        self._state_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="baichuan2-vllm", daemon=True
        )
        self._thread.start()
        try:
            self.llm = self._call(self._start(args)).result()
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _start(args: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def _call(self, coroutine: Any) -> Future:
        """Run ``coroutine`` on the engine's event loop (refused once shut down)."""
        with self._state_lock:
            if self._closed:
                coroutine.close()
                msg = (
                    "The vLLM engine stopped: it was shut down (unload()) before this "
                    "request started; the next call starts a new one"
                )
                raise EngineStoppedError(msg)
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def failure(self) -> str | None:
        """Why this engine can no longer serve (it died or was shut down), or None."""
        if self._closed:
            return "it was shut down"
        if self.llm.errored:
            return self._death_reason()
        return None

    def _death_reason(self) -> str:
        """What vLLM knows of its engine's death: the exit codes of its processes."""
        manager = self.llm.engine_core.resources.engine_manager
        finished: dict[str, int] = getattr(manager, "finished_procs", dict)()  # not on Ray
        exits = [f"{name} exited with code {code}" for name, code in finished.items()]
        if exits:
            return f"its engine process {', '.join(exits)}"
        return "its engine core failed (vLLM logged the cause above)"

    def _stopped_error(self, cause: BaseException) -> EngineStoppedError:
        """The error a request gets when the engine died under it."""
        msg = (
            f"The vLLM engine stopped: {self._death_reason()} ({type(cause).__name__}); "
            "this request failed and the next call starts a new engine"
        )
        error = EngineStoppedError(msg)
        error.__cause__ = cause
        return error

    def _lora_request(self, adapter: str | None) -> Any:
        """The ``LoRARequest`` of an adapter folder (None: the base model).

        Raises:
            ValueError: The engine was started without LoRA, or with smaller slots.
            CheckpointError: The adapter is not one this model can serve (named).
        """
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        rank = adapter_rank(Path(adapter), self.folder, self._config)
        if not self.max_lora_rank or (self.adapters and adapter not in self.adapters):
            started = "with other adapters" if self.max_lora_rank else "without LoRA"
            msg = (
                f"Adapter {adapter} asked of a vLLM engine started {started}: name it in "
                "adapters= (or adapter=) of the model, so that its engine serves it"
            )
            raise ValueError(msg)
        if rank > self.max_lora_rank:
            msg = (
                f"Adapter {adapter} has rank {rank}, above this vLLM engine's max_lora_rank "
                f"{self.max_lora_rank}: name it in adapters= of the model (or raise "
                "max_lora_rank in vllm_kwargs)"
            )
            raise ValueError(msg)
        return LoRARequest(adapter, _adapter_id(adapter), adapter)

    def _sampling_params(self, params: SamplingParams) -> Any:
        """Our sampling settings as vLLM's ``SamplingParams``; what vLLM cannot honour raises."""
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.sampling_params import SamplingParams as VllmSamplingParams

        VLLM_LIMITS.check_request(params, self.vocab_size)
        structured = (
            StructuredOutputsParams(grammar=str(build_grammar(params.constraint)))
            if params.constraint is not None
            else None
        )
        return VllmSamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            max_tokens=params.max_new_tokens,
            stop_token_ids=sorted(self.eos_ids),
            structured_outputs=structured,
            detokenize=False,  # our own detokenizing: the same text as the native engine
            output_kind=RequestOutputKind.DELTA,
            skip_reading_prefix_cache=not params.reuse_prefix,
            # Checked by SamplingParams (an int in [0, max_new_tokens]); passed as given.
            min_tokens=dict(params.extra).get("min_new_tokens", 0),
        )

    async def _generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        vllm_params: Any,
        lora: Any,
        emit: Callable[[GenerationChunk | BaseException], None],
    ) -> None:
        """Run one request on the engine loop, sending chunks (or its error) to ``emit``."""
        from vllm.inputs import TokensPrompt

        try:
            text = OutputText(self.tokenizer, params, self.eos_ids)
            submitted = time.perf_counter()
            prompt_seconds: float | None = None
            cached = 0
            # Rendered as vLLM's own token-in server does (a raw prompt is deprecated).
            (prompt,) = await self.llm.renderer.render_cmpl_async(
                [TokensPrompt(prompt_token_ids=prompt_ids)]
            )
            outputs = self.llm.generate(prompt, vllm_params, uuid.uuid4().hex, lora_request=lora)
            try:
                async for out in outputs:
                    if prompt_seconds is None:
                        prompt_seconds = time.perf_counter() - submitted
                        cached = out.num_cached_tokens or 0
                    completion = out.outputs[0]
                    for token in completion.token_ids:
                        chunk = text.push(token)
                        if chunk is not None and (chunk.text or chunk.token_ids):
                            emit(chunk)
                        if text.finish_reason is not None:
                            break
                    if text.finish_reason is not None:
                        break
                    if out.finished:
                        if completion.finish_reason not in ("stop", "length"):
                            msg = f"vLLM ended the request: {completion.finish_reason}"
                            raise RuntimeError(msg)
                        tail = text.finish(completion.finish_reason)
                        if tail is not None:
                            emit(tail)
            finally:
                await outputs.aclose()  # aborts the vLLM request if it is still running
            if text.finish_reason is None:
                raise RuntimeError("vLLM ended the request without a finish reason")
            emit(text.summary(len(prompt_ids), cached, prompt_seconds or 0.0, submitted))
        except asyncio.CancelledError:  # a closed stream, a cancelled task, or shutdown
            if self._closed:  # the caller still waits; a closed stream reads nothing
                msg = (
                    "The vLLM engine stopped: it was shut down (unload()) while this "
                    "request ran; the next call starts a new one"
                )
                emit(EngineStoppedError(msg))
            raise
        except Exception as e:  # the caller must see it
            from vllm.v1.engine.exceptions import EngineDeadError

            dead = isinstance(e, EngineDeadError) or self.llm.errored
            emit(self._stopped_error(e) if dead else e)

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GenerationChunk]:
        """Yield text deltas, then a final chunk; closing the generator aborts the request."""
        deadline = deadline_of(params)
        vllm_params = self._sampling_params(params)  # here: a grammar never stalls the loop
        lora = self._lora_request(params.adapter)
        inbox: queue.SimpleQueue[GenerationChunk | BaseException] = queue.SimpleQueue()
        future = self._call(self._generate(list(prompt_ids), params, vllm_params, lora, inbox.put))
        try:
            while True:
                try:
                    item = inbox.get(timeout=seconds_to_wait(deadline, params, 1.0))
                except queue.Empty:
                    if (future.done() or not self._thread.is_alive()) and inbox.empty():
                        future.result()  # raises what ended the task
                        raise RuntimeError("The vLLM request ended without an answer") from None
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            future.cancel()

    async def astream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Async :meth:`stream`; cancelling the consuming task aborts the request."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()

        def emit(item: GenerationChunk | BaseException) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        started = loop.time()
        vllm_params = await asyncio.to_thread(self._sampling_params, params)
        lora = await asyncio.to_thread(self._lora_request, params.adapter)
        future = self._call(self._generate(list(prompt_ids), params, vllm_params, lora, emit))
        timer = timeout_timer(loop, started, params, inbox.put_nowait)
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            future.cancel()
            if timer is not None:
                timer.cancel()

    def set_prefix_cache_tokens(self, tokens: int) -> None:
        """Nothing to set: vLLM sizes its prefix cache from its KV-cache memory."""

    def running_requests(self) -> int:
        """Requests vLLM is still working on (for checks and monitoring); 0 once shut down."""
        if self.llm is None:
            return 0
        return int(self.llm.output_processor.get_num_unfinished_requests())

    def shutdown(self) -> None:
        """Stop vLLM (its engine process and workers) and the event loop thread."""
        with self._state_lock:
            if self._closed:
                return
            # Refuse new requests, then end the running ones and stop reading vLLM's
            # outputs before vLLM exits (so its exit is not reported as a crash). Closed
            # first: each cancelled request reads it to tell its caller why.
            self._closed = True
            cancelled = asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop)
        try:
            cancelled.result(timeout=SHUTDOWN_SECONDS)
        finally:
            try:
                # Time to exit on its own: a killed engine process leaks its shared memory.
                self.llm.shutdown(timeout=SHUTDOWN_SECONDS)
            finally:
                self._stop_loop()
                # AsyncLLM.__del__ shuts it down again; let that happen now, not at exit
                # (where vLLM's module globals are gone and it fails noisily).
                self.llm = None

    @staticmethod
    async def _cancel_tasks() -> None:
        """Cancel every task on the engine loop (requests, vLLM's output handler)."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


# The running engine of each configuration. An engine's whole life (its start, its
# replacement after a death, its shutdown) happens under its configuration's lock, so
# a shutdown never overlaps a start of the same configuration, and every engine
# started is in this table until it is shut down.
_engines: dict[str, VllmEngine] = {}
_lifecycle_locks: dict[str, threading.Lock] = {}
_table_lock = threading.Lock()  # guards _lifecycle_locks, _folders and _configs
# Where each (model, revision, source) was found (and checked), so engines are found
# again without resolving, downloading or checking anything.
_folders: dict[tuple[str, str | None, str], Path] = {}
_configs: dict[Path, BaichuanConfig] = {}
# Each adapter folder checked against a model (its rank), and its vLLM LoRA id.
_adapter_ranks: dict[tuple[str, Path], int] = {}
_adapter_ids: dict[str, int] = {}
_next_adapter_id = itertools.count(1)
# The LoRA engine arguments and resolved folders of a model's adapters, once read (so
# shutdowns read nothing).
_lora_args: dict[tuple[Path, tuple[str, ...]], tuple[dict[str, Any], tuple[str, ...]]] = {}


class NativeOnlyCheckpoint(ValueError):
    """A checkpoint only the native backend loads (bitsandbytes, the Chat-4bits releases)."""


def adapter_rank(adapter: Path, model: Path, config: BaichuanConfig) -> int:
    """The rank of an adapter, checked once for the model (as the native backend does).

    Raises:
        CheckpointError: Anything in it the model cannot serve (DoRA, other modules,
            another model's shapes, ...), named.
    """
    key = (str(adapter), model)
    with _table_lock:
        rank = _adapter_ranks.get(key)
    if rank is None:
        rank = read_adapter(adapter, config).rank
        with _table_lock:
            _adapter_ranks[key] = rank
    return rank


def _adapter_id(folder: str) -> int:
    """The vLLM LoRA id of an adapter folder: the same for the process's whole life."""
    with _table_lock:
        if folder not in _adapter_ids:
            _adapter_ids[folder] = next(_next_adapter_id)
        return _adapter_ids[folder]


def _lora_engine_args(
    folder: Path, adapters: tuple[str, ...], source: Source
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``enable_lora`` with slots for ``adapters`` and their largest rank, and their folders.

    No adapters: no LoRA arguments. One slot is left empty (``_EMPTY_LORA_SLOTS``).

    Raises:
        CheckpointError: An adapter is missing or one the model cannot serve.
        ValueError: A rank above vLLM's largest LoRA slot.
    """
    if not adapters:
        return {}, ()
    where = (folder, adapters)
    with _table_lock:
        known = _lora_args.get(where)
    if known is not None:
        return known
    config = _configs[folder]
    folders = tuple(sorted({str(resolve_adapter_path(name, source=source)) for name in adapters}))
    rank = max(adapter_rank(Path(adapter), folder, config) for adapter in folders)
    slot = next((size for size in _LORA_RANKS if size >= rank), None)
    if slot is None:
        msg = f"An adapter of rank {rank}: vLLM serves LoRA ranks up to {_LORA_RANKS[-1]}"
        raise ValueError(msg)
    max_loras = len(folders) + _EMPTY_LORA_SLOTS
    args = {"enable_lora": True, "max_lora_rank": slot, "max_loras": max_loras}
    with _table_lock:
        _lora_args[where] = (args, folders)
    return args, folders


def _lifecycle_lock(key: str) -> threading.Lock:
    """The lock that orders the start and shutdown of the engine of ``key``."""
    with _table_lock:
        return _lifecycle_locks.setdefault(key, threading.Lock())


def _checked_folder(name: str, revision: str | None, source: Source) -> Path:
    """Resolve and check a model's folder on first use (never again afterwards)."""
    where = (name, revision, source)
    with _table_lock:
        folder = _folders.get(where)
    if folder is not None:
        return folder
    folder = resolve_model_path(name, revision=revision, source=source)
    config = check_checkpoint(folder)  # before vLLM ever sees the folder
    if getattr(config, "quantization_config", None) is not None:
        msg = (
            f"{folder} holds bitsandbytes-quantized weights, which only backend='native' "
            "loads; for vLLM use the full-precision checkpoint"
        )
        raise NativeOnlyCheckpoint(msg)
    with _table_lock:
        _configs[folder] = config
        _folders[where] = folder
    return folder


def vllm_engine_for(
    name: str,
    *,
    revision: str | None,
    source: Source,
    dtype: DType,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    vllm_kwargs: dict[str, Any],
    adapters: tuple[str, ...] = (),
) -> VllmEngine:
    """The one vLLM engine for this model and configuration (started on first use).

    ``adapters`` (folders or ids) start it with LoRA enabled, its slots sized for
    their largest rank (``vllm_kwargs`` may set ``max_lora_rank`` etc. itself). An
    engine that died (its process exited, vLLM reported it dead) is shut down and
    replaced here, so one crash never makes every later call fail.
    """
    if not vllm_available():
        msg = (
            "backend='vllm' needs vLLM: pip install 'langchain-baichuan2[vllm]' on a GPU "
            "machine (see the README for the CPU build), or use backend='native'"
        )
        raise ImportError(msg)
    folder = _checked_folder(name, revision, source)
    lora, folders = _lora_engine_args(folder, tuple(sorted(adapters)), source)
    vllm_kwargs = {**lora, **vllm_kwargs}
    key = _engine_key(
        folder, dtype, tensor_parallel_size, pipeline_parallel_size, vllm_kwargs, folders
    )
    with _lifecycle_lock(key):
        engine = _engines.get(key)
        if engine is not None:
            failure = engine.failure()
            if failure is None:
                return engine
            logger.warning(
                "The vLLM engine for %s stopped (%s); starting a new one", folder, failure
            )
            del _engines[key]
            engine.shutdown()
        engine = _engines[key] = VllmEngine(
            folder,
            _configs[folder],
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            adapters=folders,
            vllm_kwargs=vllm_kwargs,
        )
        return engine


def _engine_key(
    folder: Path,
    dtype: DType,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    vllm_kwargs: dict[str, Any],
    adapters: tuple[str, ...] = (),
) -> str:
    """The identity of an engine configuration (equal keys share one engine)."""
    resolved = str(resolve_dtype(dtype, on_gpu=torch.cuda.is_available()))
    return json.dumps(
        [str(folder.resolve()), resolved, tensor_parallel_size, pipeline_parallel_size]
        + [vllm_kwargs, list(adapters)],
        sort_keys=True,
        default=str,
    )


def shutdown_vllm_engine(
    name: str,
    *,
    revision: str | None,
    source: Source,
    dtype: DType,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    vllm_kwargs: dict[str, Any],
    adapters: tuple[str, ...] = (),
) -> bool:
    """Stop the engine of this configuration, if one runs; return whether one did.

    Never downloads: a model that was never started has no engine to stop.
    """
    with _table_lock:
        folder = _folders.get((name, revision, source))
        known = _lora_args.get((folder, tuple(sorted(adapters)))) if folder else None
    if folder is None or (adapters and known is None):
        return False
    lora, folders = known or ({}, ())
    key = _engine_key(
        folder,
        dtype,
        tensor_parallel_size,
        pipeline_parallel_size,
        {**lora, **vllm_kwargs},
        folders,
    )
    return _shutdown(key)


def _shutdown(key: str) -> bool:
    """Shut down the engine of ``key`` (waiting for a start in progress); whether one ran."""
    with _lifecycle_lock(key):
        engine = _engines.pop(key, None)
        if engine is not None:
            engine.shutdown()
    return engine is not None


def shutdown_vllm_engines() -> None:
    """Stop every vLLM engine started in this process (their GPU memory is freed)."""
    with _table_lock:
        keys = list(_lifecycle_locks)
    for key in keys:
        _shutdown(key)


atexit.register(shutdown_vllm_engines)
