"""langchain-tests integration suite for ChatBaichuan2 on a tiny random checkpoint."""

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_baichuan2 import ChatBaichuan2

from .tiny import tiny_chat_checkpoint

RANDOM_WEIGHTS = "random weights cannot choose what to say; this test judges the content"


class TestChatBaichuan2Integration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatBaichuan2]:
        return ChatBaichuan2

    @property
    def chat_model_params(self) -> dict:
        # Random weights: min_new_tokens keeps a first-step eos from giving empty text,
        # and the string bound keeps grammar-constrained JSON finite.
        return {
            "model": str(tiny_chat_checkpoint("7b")),
            "temperature": 0,
            "max_tokens": 96,
            "model_kwargs": {"min_new_tokens": 1},
            "grammar_max_length": 12,
        }

    @property
    def model_override_value(self) -> str:
        # A per-call `model` loads (and then shares) a second checkpoint.
        return str(tiny_chat_checkpoint("13b"))

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (expects args {'input': 3})")
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (expects args {'input': 3})")
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (expects exactly one call, then an answer)")
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS + " (expects the name copied in Chinese/Japanese)")
    def test_unicode_tool_call_integration(
        self, model: BaseChatModel, *, tool_choice: str | None = None, force_tool_call: bool = True
    ) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )
