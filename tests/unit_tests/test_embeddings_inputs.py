import pytest

from langchain_baichuan2 import Baichuan2Embeddings


def test_a_string_instead_of_a_list_is_rejected_before_loading():
    embeddings = Baichuan2Embeddings(model="/nonexistent/folder")
    with pytest.raises(TypeError, match="list of strings, got the string 'abc'"):
        embeddings.embed_documents("abc")
