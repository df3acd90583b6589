"""langchain-tests integration suite for Baichuan2Embeddings on a tiny random checkpoint."""

from langchain_tests.integration_tests import EmbeddingsIntegrationTests

from langchain_baichuan2.embeddings import Baichuan2Embeddings

from .tiny import tiny_chat_checkpoint


class TestBaichuan2EmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[Baichuan2Embeddings]:
        return Baichuan2Embeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": str(tiny_chat_checkpoint("7b"))}
