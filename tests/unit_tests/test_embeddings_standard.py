"""langchain-tests unit suite for Baichuan2Embeddings (construction never loads weights)."""

from langchain_tests.unit_tests import EmbeddingsUnitTests

from langchain_baichuan2.embeddings import Baichuan2Embeddings


class TestBaichuan2EmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[Baichuan2Embeddings]:
        return Baichuan2Embeddings

    @property
    def embedding_model_params(self) -> dict:
        # A model id that is never downloaded: the unit suite only constructs.
        return {"model": "baichuan-inc/Baichuan2-7B-Chat"}
