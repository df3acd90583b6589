"""langchain-tests unit suite for ChatBaichuan2 (construction never loads weights)."""

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_baichuan2 import ChatBaichuan2


class TestChatBaichuan2Unit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatBaichuan2]:
        return ChatBaichuan2

    @property
    def standard_chat_model_params(self) -> dict:
        # max_retries and api_key mean nothing for a model in this process: ChatBaichuan2
        # has no such fields and rejects unknown arguments. timeout is a real deadline.
        params = dict(super().standard_chat_model_params)
        params.pop("max_retries", None)
        params.pop("api_key", None)
        return params

    @property
    def chat_model_params(self) -> dict:
        # A model id that is never downloaded: the unit suite only constructs.
        return {"model": "baichuan-inc/Baichuan2-7B-Chat"}
