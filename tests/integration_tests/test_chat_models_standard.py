"""langchain-tests integration suite for ChatBaichuan2 on a tiny random checkpoint."""

from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_baichuan2 import ChatBaichuan2

from .tiny import tiny_chat_checkpoint


class TestChatBaichuan2Integration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatBaichuan2]:
        return ChatBaichuan2

    @property
    def chat_model_params(self) -> dict:
        # Random weights: min_new_tokens keeps a first-step eos from giving empty text.
        return {
            "model": str(tiny_chat_checkpoint("7b")),
            "temperature": 0,
            "max_tokens": 12,
            "model_kwargs": {"min_new_tokens": 1},
        }

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def model_override_value(self) -> str:
        # A per-call `model` loads (and then shares) a second checkpoint.
        return str(tiny_chat_checkpoint("13b"))
