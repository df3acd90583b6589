"""ChatBaichuan2: the LangChain chat model for locally run Baichuan2 checkpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from transformers import BitsAndBytesConfig

from langchain_baichuan2 import engines
from langchain_baichuan2.arguments import reject_unknown_arguments
from langchain_baichuan2.chat_output import (
    Call,
    ChunkConverter,
    chat_result,
    require_a_valid_call,
)
from langchain_baichuan2.engines import settings
from langchain_baichuan2.grammar import bound_lengths
from langchain_baichuan2.loading import LoadedModel
from langchain_baichuan2.loading.adapters import (
    adapter_base_model,
    adapter_key,
    is_adapter_folder,
    resolve_adapter_path,
)
from langchain_baichuan2.prompt import literal_text_encoder, render
from langchain_baichuan2.tools import (
    Constraint,
    ToolChoice,
    format_tools,
    normalize_tool_choice,
)

logger = logging.getLogger(__name__)


def _base_of_adapter_folder(values: Any) -> Any:
    """``model=<adapter folder>``: the base its ``adapter_config.json`` names, that adapter."""
    if not isinstance(values, dict):
        return values
    key = "model" if "model" in values else "model_name"
    folder = values.get(key)
    if not isinstance(folder, str) or not is_adapter_folder(folder):
        return values
    base = adapter_base_model(folder)
    if not base:
        msg = f"{folder}/adapter_config.json names no base_model_name_or_path: pass model=<base>"
        raise ValueError(msg)
    if values.get("adapter") is not None:
        msg = f"model={folder!r} is an adapter folder; do not pass adapter= as well"
        raise ValueError(msg)
    return {**values, key: base, "adapter": folder}


# Per-call arguments `_prepare` understands (``invoke(..., temperature=0.5)``); the
# internal ones come from bind_tools / with_structured_output and LangChain itself.
_INTERNAL_ARGUMENTS = frozenset(
    {"tools", "tool_choice", "response_format", "ls_structured_output_format"}
)
_CALL_ARGUMENTS = (
    _INTERNAL_ARGUMENTS
    | {"model", "adapter"}
    | (set(settings.SETTING_NAMES) - {"stop"})  # stop: a parameter of its own
)


class ChatBaichuan2(BaseChatModel):
    """Baichuan2 chat model running locally, exact to the official ``model.chat``.

    Messages become Baichuan2's role-token prompt exactly as the official
    ``build_chat_input`` builds it (system text, user token 195, assistant token 196,
    oldest rounds dropped to fit ``model_max_length - max_tokens``). A newest round
    that alone exceeds that budget is cut on the left by the official rule (its start,
    or the system prompt's, is lost): a warning is logged and
    ``response_metadata["prompt_truncated"]`` is True. The weights load
    lazily, once, on the first call, and are shared with every ``ChatBaichuan2`` and
    ``Baichuan2Embeddings`` configured alike.

    Setup:
        ```bash
        pip install torch  # the build for your GPU, or torch==2.13.0 on CPU
        pip install langchain-baichuan2
        ```

    Key init args — completion params:
        temperature: Sampling temperature; 0 means greedy. Default: the checkpoint's.
        max_tokens: Most new tokens per answer. Default: the checkpoint's (2048).
        stop: Strings that end the answer (not included in it).

    Key init args — client params:
        model: A local folder or a model id such as ``"baichuan-inc/Baichuan2-7B-Chat"``.
        dtype / device_map / quantization: How the weights are placed.

    Instantiate:
        ```python
        from langchain_baichuan2 import ChatBaichuan2

        llm = ChatBaichuan2(model="baichuan-inc/Baichuan2-7B-Chat", temperature=0)
        ```

    Invoke:
        ```python
        messages = [
            ("system", "You are a helpful assistant."),
            ("human", "解释一下“温故而知新”"),
        ]
        llm.invoke(messages)
        ```

    Stream:
        ```python
        for chunk in llm.stream(messages):
            print(chunk.text, end="", flush=True)
        ```

    Async:
        ```python
        await llm.ainvoke(messages)
        async for chunk in llm.astream(messages):
            print(chunk.text, end="")
        ```

    Token usage:
        ```python
        llm.invoke(messages).usage_metadata
        # {"input_tokens": 21, "output_tokens": 57, "total_tokens": 78}
        ```

    Response metadata:
        ```python
        llm.invoke(messages).response_metadata
        # {"model_name": "baichuan-inc/Baichuan2-7B-Chat", "finish_reason": "stop",
        #  "prompt_seconds": 0.05, "generation_seconds": 1.9, "tokens_per_second": 30.1,
        #  "dropped_rounds": 0, "prompt_truncated": False, ...}
        ```

    Tool calling:
        Calls are grammar-constrained: unless cut off by ``max_tokens`` or a stop
        string (then they are in ``invalid_tool_calls``), they parse and match the
        tool's schema.

        ```python
        from pydantic import BaseModel, Field


        class GetWeather(BaseModel):
            '''Get the current weather in a city.'''

            city: str = Field(description="the city, e.g. Beijing")


        ai_msg = llm.bind_tools([GetWeather], tool_choice="any").invoke("北京天气如何？")
        ai_msg.tool_calls
        # [{"name": "GetWeather", "args": {"city": "北京"}, "id": "call_...", ...}]
        ```

    Structured output:
        ```python
        class Joke(BaseModel):
            setup: str
            punchline: str


        llm.with_structured_output(Joke).invoke("Tell me a joke about cats")
        # Joke(setup="...", punchline="...")
        ```

    JSON mode:
        ```python
        llm.with_structured_output(None, method="json_mode").invoke("List three colors as JSON")
        # {"colors": ["red", "green", "blue"]}
        ```
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str = Field(alias="model_name")
    """A local checkpoint folder, or a model id (``"baichuan-inc/Baichuan2-13B-Chat"``)."""

    revision: str | None = None
    """Branch, tag or commit of a downloaded model. Default: the hub's default."""

    source: Literal["auto", "local", "modelscope", "huggingface"] = "auto"
    """Where ``model`` comes from: ``"auto"`` uses a folder if it exists, else
    ModelScope, then the Hugging Face Hub."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weight dtype; ``"auto"`` is bfloat16 on GPU and float32 on CPU."""

    device_map: str | dict | None = None
    """transformers ``device_map``; None puts the model on the GPU if any, else CPU."""

    quantization: Literal["4bit", "8bit"] | BitsAndBytesConfig | None = None
    """bitsandbytes quantization at load: ``"4bit"`` (NF4, double quant), ``"8bit"``,
    or a ``BitsAndBytesConfig``. Default: none."""

    temperature: float | None = None
    """Sampling temperature, >= 0; 0 means greedy. Default: the checkpoint's (0.3)."""

    top_p: float | None = None
    """Nucleus sampling mass in (0, 1]. Default: the checkpoint's (0.85)."""

    top_k: int | None = None
    """Sample among the k likeliest tokens; 0 disables. Default: the checkpoint's (5)."""

    repetition_penalty: float | None = None
    """Penalty > 0 for tokens already present (1 = none). Default: the checkpoint's (1.05)."""

    max_tokens: int | None = None
    """Most new tokens per answer, >= 1. Default: the checkpoint's ``max_new_tokens``."""

    stop: list[str] | None = None
    """Strings that end the answer; the answer stops before them. Per-call ``stop`` is
    added to these."""

    seed: int | None = None
    """Seed for sampling, so a sampled answer can be repeated. Default: random."""

    model_max_length: int | None = None
    """Context size used for history truncation. Default: the checkpoint's (4096)."""

    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra ``generate()`` arguments: ``min_new_tokens``, ``no_repeat_ngram_size``,
    ``suppress_tokens``, ``bad_words_ids``. Others are rejected with an error."""

    grammar_max_length: int | None = None
    """Longest string (characters) and array (items) the grammar allows inside tool
    arguments and structured output where the schema sets no bound. Default None (no
    bound); it keeps a small or untrained model that rambles inside JSON finite."""

    prefix_cache_tokens: int = Field(default=4096, ge=0)
    """Token budget for reusing the KV cache of recent prompts: a prompt that starts
    like a cached one prefills only the rest (chat histories, agent transcripts).
    Least recently used entries are evicted; 0 keeps this object's calls out of the
    store (they neither read nor add to it). The store belongs to the loaded model and
    is shared by every object using it, sized by the largest budget any of them set.
    With ``backend="vllm"``, vLLM's own prefix cache is used (sized by its KV memory).
    Default 4096 tokens (about 2 GiB for 7B in bf16)."""

    parse_special_tokens: bool = False
    """Whether ``<s>``, ``</s>``, ``<unk>`` and ``<reserved_N>`` (the role tokens among
    them) written in message text become control tokens, as the official tokenizer
    does. Default False: message text is always encoded as text, so typed text cannot
    open a fake user or assistant turn."""

    backend: Literal["auto", "native", "vllm"] = "auto"
    """What runs the model: ``"native"`` (this package's engine, in this process: any
    device, bitsandbytes and the official 4-bit checkpoints), ``"vllm"`` (vLLM's engine,
    fed the same prompt ids: higher throughput, several GPUs, several nodes) or
    ``"auto"`` (vLLM when it is installed, a CUDA GPU is present and no native-only
    setting (``quantization``, ``device_map``, ``compile``, ``kv_cache_bytes``,
    ``prefill_chunk_tokens``) is given; else native)."""

    compile: bool | None = None
    """Native backend: run the decode step compiled with ``torch.compile`` (CUDA
    graphs on a GPU). None (default): compiled on a CUDA GPU, not on a CPU, where the
    uncompiled fast path is as quick and starts at once. Compiling costs time once per
    batch size on the first calls (logged); if it fails, the engine warns and runs
    uncompiled; bitsandbytes weights always run uncompiled. The engine is shared by
    every object on the same model: an explicit value applies to all of them."""

    kv_cache_bytes: int | None = Field(default=None, gt=0)
    """Native backend: memory the running requests' key/value cache may take. Each
    request reserves room for ``min(prompt + max_tokens, context)`` tokens when it
    starts; requests beyond the budget wait until a running one ends. None (default):
    95% of the GPU memory free after loading, less what the engine sets aside for
    everything else (a prefill chunk, the decode step's temporaries, the CUDA-graph
    pool, an embedding forward); a quarter of the memory available on a CPU. Applies
    when the model's engine is created (its first call)."""

    prefill_chunk_tokens: int | None = Field(default=None, ge=0)
    """Native backend: most prompt tokens fed between two decode steps, so a long
    prompt arriving does not stall the replies already streaming (chunked prefill).
    None (default): 256; 0: whole prompts at once. The engine is shared by every
    object on the same model: an explicit value applies to all of them."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    """``backend="vllm"``: GPUs each layer is split across. Default 1."""

    pipeline_parallel_size: int = Field(default=1, ge=1)
    """``backend="vllm"``: stages the layers are split into (across GPUs or nodes).
    Default 1."""

    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """``backend="vllm"``: further vLLM engine arguments, e.g.
    ``{"gpu_memory_utilization": 0.8, "distributed_executor_backend": "ray"}``."""

    show_progress: bool | None = None
    """Progress bars while downloading and loading weights. Default None: shown in a
    terminal or notebook, hidden when output is not interactive."""

    adapters: dict[str, str] = Field(default_factory=dict)
    """Named PEFT LoRA adapters, ``{name: folder or ModelScope/Hub id}``, chosen per call
    with ``invoke(..., adapter=name)`` or ``bind(adapter=name)``. Each loads on first
    use and is shared by every object of the same model; ``unload()`` frees them."""

    adapter: str | None = None
    """The adapter of every call: a name in ``adapters``, or a folder or id. Default
    None: the base model. ``model`` may also be an adapter folder: its
    ``adapter_config.json`` names the base."""

    merge_adapter: bool = False
    """Fold ``adapter`` into the weights (native backend): full base speed, but a
    model of its own (not shared with the base) that serves only this adapter."""

    streaming: bool = False
    """Whether ``invoke`` streams internally, so each token reaches ``on_llm_new_token``."""

    timeout: float | None = None
    """Seconds a call may take in all (waiting, prompt and answer, and every retry of
    ``max_retries`` together: a retry gets what is left); past it the call is stopped,
    its batch row freed, and ``TimeoutError`` raised. Default None: no limit."""

    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Accepted so that settings shared with hosted chat models work unchanged; a model
    running in this process needs no key, so it is never used or sent anywhere."""

    max_retries: int = Field(default=2, ge=0)
    """How many times a call is started again when its engine stopped before the
    answer's first token: the model was unloaded meanwhile, or the vLLM engine died
    (the retry starts a new one). Errors of the request itself are never retried.
    Default 2."""

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, values: Any) -> Any:
        """Names, then values by the same rule as per-call arguments (``None``: not set)."""
        values = _base_of_adapter_folder(reject_unknown_arguments(cls, values))
        if isinstance(values, dict):
            try:
                settings.check_values(values)
            except TypeError as e:  # pydantic reports ValueErrors, naming the field
                raise ValueError(str(e)) from e
            if "model_kwargs" in values and values["model_kwargs"] is None:
                values = {**values, "model_kwargs": {}}
        return values

    @model_validator(mode="after")
    def _check_backend(self) -> ChatBaichuan2:
        """Refuse what the backend cannot honour now, before it is ever started."""
        spec = self._spec()
        spec.check()
        spec.limits.check(self.temperature, self.model_kwargs.items())
        self._adapter_source(self.adapter)
        if self.merge_adapter and self.adapter is None:
            raise ValueError("merge_adapter=True needs an adapter to merge (adapter=...)")
        return self

    # -- LangChain identity ---------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "chat-baichuan2"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.model,
            "revision": self.revision,
            "source": self.source,
            "dtype": self.dtype,
            "device_map": self.device_map,
            "quantization": self.quantization,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "model_max_length": self.model_max_length,
            "model_kwargs": self.model_kwargs,
            "stop": self.stop,
            "grammar_max_length": self.grammar_max_length,
            "parse_special_tokens": self.parse_special_tokens,
            "backend": self.backend,
            "compile": self.compile,
            "kv_cache_bytes": self.kv_cache_bytes,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "vllm_kwargs": self.vllm_kwargs,
            "adapters": self.adapters,
            "adapter": self.adapter,
            "merge_adapter": self.merge_adapter,
        }
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="baichuan2",
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = settings.merge(self._settings(), {"stop": stop})["stop"]
        if stops:
            params["ls_stop"] = list(stops)
        return params

    # -- the model behind it --------------------------------------------------------

    def _spec(self, model: str | None = None) -> engines.EngineSpec:
        """What picks this object's engine (``model``: a per-call model name)."""
        spec = engines.EngineSpec.of(self, model)
        if self.merge_adapter:
            spec = replace(spec, merged_adapter=adapter_key(self._adapter_source(self.adapter)))
        return spec

    def _adapter_source(self, name: str | None) -> str | None:
        """Where the adapter ``name`` comes from (a folder or id); nothing is read.

        Raises:
            ValueError: ``name`` is neither a name in ``adapters`` nor a folder or id.
        """
        if name is None or name in self.adapters:
            return self.adapters.get(name) if name is not None else None
        if "/" in name or Path(name).expanduser().is_dir():
            return name
        known = ", ".join(map(repr, self.adapters)) or "none (pass adapters={name: folder})"
        raise ValueError(f"Unknown adapter {name!r}; known adapters: {known}")

    def _adapter_folder(self, kwargs: dict[str, Any]) -> str | None:
        """The resolved folder of a call's adapter (None: base, or merged into it)."""
        name = kwargs.get("adapter", self.adapter)
        if self.merge_adapter:
            if name != self.adapter:
                msg = (
                    f"This model merges adapter {self.adapter!r} into its weights; a call "
                    f"cannot choose another ({name!r}): use merge_adapter=False"
                )
                raise ValueError(msg)
            return None
        source = self._adapter_source(name)
        if source is None:
            return None
        return str(resolve_adapter_path(source, source=self.source))

    def _settings(self) -> dict[str, Any]:
        """This object's sampling fields, by their names in ``settings.SETTING_NAMES``."""
        return {name: getattr(self, name) for name in settings.SETTING_NAMES}

    def loaded_model(self, model: str | None = None) -> LoadedModel:
        """Return the shared loaded model of the native backend (loading it on first use)."""
        return engines.loaded_model(self._spec(model))

    def engine(self, model: str | None = None) -> engines.Engine:
        """Return the shared engine that runs this object's calls (started on first use)."""
        return engines.open(self._spec(model))

    def unload(self) -> bool:
        """Free the model this object runs on (its engine stops; memory is released).

        Every object sharing the model loses it too; the next call loads it again.
        Returns whether anything was loaded. (Ollama's ``keep_alive=0``, done by hand.)
        """
        return engines.release(self._spec())

    # -- counting tokens ------------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """Return the Baichuan2 token ids of ``text`` as message text is encoded."""
        tokenizer, _ = engines.tokenizer_and_defaults(self._spec())
        encoder = tokenizer if self.parse_special_tokens else literal_text_encoder(tokenizer)
        return list(encoder.encode(text, add_special_tokens=False))

    def get_num_tokens_from_messages(
        self,
        messages: list[BaseMessage],
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool] | None = None,
    ) -> int:
        """Return the length of the Baichuan2 prompt these messages make, untruncated.

        Counted exactly as a call builds the prompt (system text, role tokens, the
        tool protocol's system text when ``tools`` are given, the final assistant
        token), with the checkpoint's tokenizer. The weights are not loaded for this
        (a model id is downloaded first, as any call would).
        """
        tokenizer, defaults = engines.tokenizer_and_defaults(self._spec())
        encoder = tokenizer if self.parse_special_tokens else literal_text_encoder(tokenizer)
        return len(render(messages, encoder, defaults, tools=format_tools(tools or [])).input_ids)

    def _call_settings(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[engines.EngineSpec, dict[str, Any]]:
        """Check a call's arguments (nothing is loaded or started); its spec and settings."""
        unknown = sorted(set(kwargs) - _CALL_ARGUMENTS)
        if unknown:
            msg = (
                f"Unknown call argument(s) {', '.join(unknown)}; ChatBaichuan2 accepts "
                f"{', '.join(sorted(_CALL_ARGUMENTS - _INTERNAL_ARGUMENTS))}"
            )
            raise ValueError(msg)
        spec = self._spec(kwargs.get("model"))
        self._adapter_source(kwargs.get("adapter"))
        values = settings.merge(self._settings(), {**kwargs, "stop": stop})
        settings.check(values, spec.limits)
        return spec, values

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Call:
        """Resolve the model, the prompt ids and the sampling settings of one call."""
        spec, values = self._call_settings(stop, kwargs)
        adapter = self._adapter_folder(kwargs)
        engine = engines.open(spec)
        tools = kwargs.get("tools") or []
        choice = normalize_tool_choice(
            kwargs.get("tool_choice"), [t["function"]["name"] for t in tools]
        )
        response_format = kwargs.get("response_format") or None
        constraint = self._constraint(tools, choice, response_format)
        params = settings.resolve(
            engine.generation_config,
            values,
            constraint=constraint,
            reuse_prefix=self.prefix_cache_tokens > 0,
            adapter=adapter,
        )
        context = int(values["model_max_length"] or engine.context_length)
        tokenizer = engine.tokenizer
        prompt = render(
            messages,
            tokenizer if self.parse_special_tokens else literal_text_encoder(tokenizer),
            engine.generation_config,
            tools=tools,
            tool_choice=choice,
            response_format=response_format,
            model_max_length=context,
            max_new_tokens=params.max_new_tokens,
        )
        if prompt.truncated:
            logger.warning(
                "The prompt was cut on the left to fit model_max_length - max_tokens = %d tokens",
                context - params.max_new_tokens,
            )
        parse_tools = constraint is not None and constraint.kind == "tools"
        return Call(engine, prompt, params, spec.model, parse_tools)

    def _constraint(
        self, tools: list[dict[str, Any]], choice: ToolChoice, response_format: dict | None
    ) -> Constraint | None:
        """What bound tools or a response format constrain the output to, or None.

        The prompt side (the protocol's system text) is ``prompt.render``'s.
        """
        bound = self.grammar_max_length
        if response_format:
            return Constraint("json", schema=bound_lengths(response_format.get("schema"), bound))
        if tools and choice != "none":
            return Constraint("tools", tools=tuple(bound_lengths(tools, bound)), choice=choice)
        return None

    # -- generation -----------------------------------------------------------------

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # LangChain's stream() reports each chunk to on_llm_new_token itself.
        attempts = engines.Attempts(self.max_retries)
        for _ in attempts:
            call = self._prepare(messages, stop, kwargs)
            converter = ChunkConverter(call)
            answered = False
            try:
                for piece in call.engine.stream(call.prompt.input_ids, attempts.limit(call.params)):
                    answered = True
                    chunk = converter.convert(piece)
                    if chunk is not None:
                        yield chunk
                return
            except Exception as e:
                attempts.failed(e, answered)  # raises unless the call starts again

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Loading the model and tokenizing are blocking; keep them off the event loop.
        attempts = engines.Attempts(self.max_retries)
        for _ in attempts:
            call = await asyncio.to_thread(self._prepare, messages, stop, kwargs)
            converter = ChunkConverter(call)
            answered = False
            try:
                params = attempts.limit(call.params)
                async for piece in call.engine.astream(call.prompt.input_ids, params):
                    answered = True
                    chunk = converter.convert(piece)
                    if chunk is not None:
                        yield chunk
                return
            except Exception as e:
                attempts.failed(e, answered)  # raises unless the call starts again

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return chat_result(list(self._stream(messages, stop, **kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return chat_result([c async for c in self._astream(messages, stop, **kwargs)])

    # -- batching -------------------------------------------------------------------

    @staticmethod
    def _batch_config(
        count: int, config: RunnableConfig | list[RunnableConfig] | None, rows: int
    ) -> tuple[RunnableConfig | list[RunnableConfig], int]:
        """The batch's config, and how many inputs start at once: as many as ``rows``.

        ``rows``: how many requests the engine decodes together. A ``max_concurrency``
        the caller set is kept. The other inputs join the running batch as earlier ones
        end, so no more threads wait than rows decode.
        """
        first = (config[0] if config else {}) if isinstance(config, list) else (config or {})
        limit = min(first.get("max_concurrency") or rows, count)
        if isinstance(config, list):
            configs = [{**c, "max_concurrency": c.get("max_concurrency") or limit} for c in config]
            return cast(list[RunnableConfig], configs), limit
        return {**(config or {}), "max_concurrency": limit}, limit

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Run the inputs as one batch on the model (not one by one)."""
        if not inputs:
            return []
        engine = self.engine(kwargs.get("model"))
        config, starting = self._batch_config(len(inputs), config, engine.max_rows)
        with engine.gather(starting):
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Async :meth:`batch`: the inputs decode together as one batch."""
        if not inputs:
            return []
        engine = await asyncio.to_thread(self.engine, kwargs.get("model"))
        config, starting = self._batch_config(len(inputs), config, engine.max_rows)
        with engine.gather(starting):
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )

    # -- tools and structured output --------------------------------------------------

    def bind(  # type: ignore[override,unused-ignore]  # newer langchain-core: a subclass
        self, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind call arguments, checked now by the per-call rule (nothing is started)."""
        call = {name: value for name, value in kwargs.items() if name != "stop"}
        self._call_settings(kwargs.get("stop"), call)
        return super().bind(**kwargs)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; calls are grammar-constrained to the tools' JSON schemas.

        Args:
            tools: ``BaseTool``s, functions, pydantic models, TypedDicts or JSON-schema
                dicts.
            tool_choice: ``"auto"`` (default: answer or call), ``"none"``, ``"any"`` /
                ``"required"`` / ``True`` (call one of the tools), a tool name, or
                ``{"type": "function", "function": {"name": ...}}``.
            **kwargs: Further call arguments to bind.
        """
        formatted = format_tools(tools)
        choice = normalize_tool_choice(tool_choice, [t["function"]["name"] for t in formatted])
        return self.bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Return a runnable whose output follows ``schema``, valid by construction.

        Args:
            schema: A pydantic model (v2 or v1), a TypedDict or a JSON schema dict.
            method: ``"json_schema"`` (the output is a JSON object constrained to the
                schema), ``"function_calling"`` (a forced call of a tool built from the
                schema), or ``"json_mode"`` (a JSON object; constrained to ``schema``
                when one is given).
            include_raw: Return ``{"raw", "parsed", "parsing_error"}`` instead of only
                the parsed value.
            strict: Accepted for compatibility; the grammar is always strict.
            **kwargs: Not supported; passing any raises ``ValueError``.

        Returns:
            Pydantic instances for pydantic schemas, else dicts.
        """
        if kwargs:
            msg = f"Unsupported with_structured_output arguments: {', '.join(kwargs)}"
            raise ValueError(msg)
        if method not in ("json_schema", "function_calling", "json_mode"):
            msg = f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}"
            raise ValueError(msg)
        if schema is None and method != "json_mode":
            msg = f"method {method!r} needs a schema"
            raise ValueError(msg)
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        json_schema = convert_to_json_schema(schema) if schema is not None else None
        trace = {"kwargs": {"method": method, "strict": strict}, "schema": json_schema}
        parser: Runnable
        if method == "function_calling":
            schema = cast(dict | type, schema)
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=tool_name, ls_structured_output_format=trace
            )
            parser = RunnableLambda(require_a_valid_call) | (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
            )
        else:
            kind = "json_schema" if method == "json_schema" else "json_object"
            llm = self.bind(
                response_format={"type": kind, "schema": json_schema},
                ls_structured_output_format=trace,
            )
            parser = (
                PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
            )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")
