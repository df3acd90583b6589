"""langchain-tests unit suite for ChatBaichuan2 (construction never loads weights)."""

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_baichuan2 import ChatBaichuan2


class TestChatBaichuan2Unit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatBaichuan2]:
        return ChatBaichuan2

    @property
    def chat_model_params(self) -> dict:
        # A model id that is never downloaded: the unit suite only constructs.
        return {"model": "baichuan-inc/Baichuan2-7B-Chat"}
