"""Baichuan2 for vLLM, registered through the ``vllm.general_plugins`` entry point.

vLLM runs ``register`` in every process it starts (API server, engine core, workers),
so once this package is installed, ``vllm serve <Baichuan2 folder>`` and ``LLM(...)``
load official checkpoints with no ``trust_remote_code``: the config and tokenizer are
this package's native classes, the network is :mod:`.model`, a local folder is checked
with ``check_checkpoint`` before vLLM starts (:mod:`.model_config`), and chat requests
become ``ChatBaichuan2``'s prompt ids (:mod:`.renderer`, tokenizer mode ``"baichuan2"``,
chosen when ``--tokenizer-mode`` is ``auto``). The chat template shipped here
(``CHAT_TEMPLATE``) renders the same roles as text; vLLM falls back to it when the HF
renderer is chosen (``--tokenizer-mode hf``), where typed control-token strings in
messages do become control tokens. A PEFT LoRA adapter folder given as the model is
refused naming its base and the flags that serve it (:func:`_refuse_adapter_folders`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = Path(__file__).with_name("baichuan2_chat.jinja")
"""Jinja chat template rendering Baichuan2's roles as ``ChatBaichuan2``'s prompt does."""

# Both spellings of the architecture that Baichuan checkpoints carry in config.json.
ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")

TOKENIZER_MODE = "baichuan2"
"""vLLM tokenizer and renderer mode whose chat prompts are ``ChatBaichuan2``'s ids."""


def register() -> None:
    """Register the Baichuan architectures, chat renderer and chat template with vLLM."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry
    from vllm.transformers_utils.chat_templates.registry import (
        get_chat_template_fallback_path,
        register_chat_template_fallback_path,
    )

    import langchain_baichuan2.modeling  # noqa: F401  (config and tokenizer for "baichuan")
    from langchain_baichuan2.vllm_plugin.model_config import BaichuanModelConfig

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(
            architecture, "langchain_baichuan2.vllm_plugin.model:BaichuanForCausalLM"
        )
        MODELS_CONFIG_MAP[architecture] = BaichuanModelConfig
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        # The tokenizer is vLLM's HF one; only the chat renderer is ours.
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
        RENDERER_REGISTRY.register(
            TOKENIZER_MODE, "langchain_baichuan2.vllm_plugin.renderer", "Baichuan2Renderer"
        )
    if get_chat_template_fallback_path("baichuan", "") != CHAT_TEMPLATE:
        register_chat_template_fallback_path("baichuan", CHAT_TEMPLATE)
    _use_native_tokenizer_info()
    _refuse_adapter_folders()


def adapter_folder_error(model: str) -> str | None:
    """Why ``model`` cannot be served: a PEFT adapter folder (None: it is not one)."""
    folder = Path(model).expanduser()
    config = folder / "adapter_config.json"
    if not config.is_file() or (folder / "config.json").is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path") or "<base model>"
    except (ValueError, AttributeError):
        base = "<base model>"
    return (
        f"{model} is a PEFT LoRA adapter folder (adapter_config.json, no config.json), "
        f"not a model: serve its base model with the adapter, e.g. vllm serve {base} "
        f"--enable-lora --lora-modules {folder.resolve().name}={model}"
    )


def _refuse_adapter_folders() -> None:
    """Make vLLM's config reading refuse an adapter folder with ``adapter_folder_error``.

    vLLM would report only a missing ``config.json``; this runs before any model
    architecture (and so before this package's config hook) is known.
    """
    from vllm.config import model as model_config

    generic = model_config.get_config
    if getattr(generic, "baichuan2", False):
        return

    def get_config(model: Any, *args: Any, **kwargs: Any) -> Any:
        error = adapter_folder_error(str(model))
        if error is not None:
            raise ValueError(error)
        return generic(model, *args, **kwargs)

    get_config.baichuan2 = True  # type: ignore[attr-defined]
    model_config.get_config = get_config  # type: ignore[assignment]


def _use_native_tokenizer_info() -> None:
    """Give vLLM's xgrammar backend the vocabulary view the native engine uses.

    xgrammar's generic reading of a SentencePiece tokenizer assumes a prefix space and
    treats ``<unk>``/``<s>``/``</s>`` as text; Baichuan2 has no dummy prefix and those
    ids must never appear inside constrained output. Only Baichuan2 tokenizers are
    affected; every other tokenizer goes through xgrammar's own code.
    """
    import xgrammar as xgr

    from langchain_baichuan2.grammar import tokenizer_info
    from langchain_baichuan2.modeling import BaichuanTokenizer
    from langchain_baichuan2.prompt import eos_token_ids

    generic = xgr.TokenizerInfo.from_huggingface
    if getattr(generic, "baichuan2", False):
        return

    def from_huggingface(
        tokenizer: Any,
        vocab_size: int | None = None,
        stop_token_ids: list[int] | int | None = None,
        **kwargs: Any,
    ) -> xgr.TokenizerInfo:
        if not isinstance(tokenizer, BaichuanTokenizer):
            return generic(
                tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids, **kwargs
            )
        # vLLM names no stops here (it gives each request's matcher its own).
        stops = [stop_token_ids] if isinstance(stop_token_ids, int) else stop_token_ids
        return tokenizer_info(
            tokenizer, vocab_size or len(tokenizer), stops or eos_token_ids(None, tokenizer)
        )

    from_huggingface.baichuan2 = True  # type: ignore[attr-defined]
    xgr.TokenizerInfo.from_huggingface = staticmethod(from_huggingface)  # type: ignore[method-assign]
