"""Baichuan2 for vLLM, registered through the ``vllm.general_plugins`` entry point.

vLLM runs ``register`` in every process it starts (API server, engine core, workers),
so once this package is installed, ``vllm serve <Baichuan2 folder>`` and ``LLM(...)``
load official checkpoints with no ``trust_remote_code``: the config and tokenizer are
this package's native classes, the network is :mod:`.model`, and chat requests use the
Baichuan2 chat template shipped here (``CHAT_TEMPLATE``) unless another is given.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = Path(__file__).with_name("baichuan2_chat.jinja")
"""Jinja chat template rendering Baichuan2's roles as ``ChatBaichuan2``'s prompt does."""

# Both spellings of the architecture that Baichuan checkpoints carry in config.json.
ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")


def register() -> None:
    """Register the Baichuan2 architecture and chat template with vLLM."""
    from vllm import ModelRegistry
    from vllm.transformers_utils.chat_templates.registry import (
        get_chat_template_fallback_path,
        register_chat_template_fallback_path,
    )

    import langchain_baichuan2.modeling  # noqa: F401  (config and tokenizer for "baichuan")

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(
            architecture, "langchain_baichuan2.vllm_plugin.model:BaichuanForCausalLM"
        )
    if get_chat_template_fallback_path("baichuan", "") != CHAT_TEMPLATE:
        register_chat_template_fallback_path("baichuan", CHAT_TEMPLATE)
