import pytest

from langchain_baichuan2 import Baichuan2Embeddings, ChatBaichuan2


def test_a_misspelled_chat_argument_is_named_with_the_closest_field():
    with pytest.raises(ValueError, match="'max_new_tokens' \\(did you mean 'max_tokens'\\?\\)"):
        ChatBaichuan2(model="folder", max_new_tokens=512)


def test_an_unknown_chat_argument_is_rejected_on_either_backend():
    with pytest.raises(ValueError, match="unknown argument\\(s\\) 'bogus'"):
        ChatBaichuan2(model="folder", backend="vllm", tensor_parallel_size=2, bogus=1)


def test_a_misspelled_embeddings_argument_is_named_with_the_closest_field():
    with pytest.raises(ValueError, match="'poolng' \\(did you mean 'pooling'\\?\\)"):
        Baichuan2Embeddings(model="folder", poolng="last")


def test_aliases_and_fields_are_accepted():
    assert ChatBaichuan2(model_name="folder", max_tokens=5).model == "folder"


def test_a_bad_call_argument_is_rejected_before_anything_loads():
    llm = ChatBaichuan2(model="/nonexistent/folder")  # loading it would fail differently
    with pytest.raises(ValueError, match="Unknown call argument\\(s\\) temprature"):
        llm.invoke("hi", temprature=0.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        llm.invoke("hi", top_p=2)
