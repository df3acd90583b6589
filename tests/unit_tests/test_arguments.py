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


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"temperature": 1e-45}, "temperature must be 0 \\(greedy\\) or >= 0.01, got 1e-45"),
        ({"temperature": 0.009}, "temperature must be 0 \\(greedy\\) or >= 0.01, got 0.009"),
        ({"model_kwargs": {"min_new_tokens": -5}}, "min_new_tokens must be an integer >= 0"),
        ({"model_kwargs": {"min_new_tokens": "a"}}, "min_new_tokens must be an integer >= 0"),
        ({"model_kwargs": {"min_new_tokens": 1.5}}, "min_new_tokens must be an integer >= 0"),
        (
            {"max_tokens": 10, "model_kwargs": {"min_new_tokens": 11}},
            "min_new_tokens \\(11\\) must not exceed max_tokens \\(10\\)",
        ),
        ({"model_kwargs": {"bad_words_ids": [5]}}, "bad_words_ids must be a list of token-id"),
        ({"model_kwargs": {"bad_words_ids": [[]]}}, "bad_words_ids must be a list of token-id"),
        ({"model_kwargs": {"suppress_tokens": ["x"]}}, "suppress_tokens must be a list of token"),
        ({"model_kwargs": {"no_repeat_ngram_size": 0}}, "no_repeat_ngram_size must be an integer"),
    ],
)
def test_bad_generation_values_are_named_at_construction_and_per_call(arguments, message):
    with pytest.raises(ValueError, match=message):
        ChatBaichuan2(model="/nonexistent/folder", **arguments)
    llm = ChatBaichuan2(model="/nonexistent/folder")  # loading it would fail differently
    with pytest.raises(ValueError, match=message):
        llm.invoke("hi", **arguments)


def test_the_smallest_temperature_and_greedy_are_accepted():
    assert ChatBaichuan2(model="folder", temperature=0.01).temperature == 0.01
    assert ChatBaichuan2(model="folder", temperature=0).temperature == 0


@pytest.mark.parametrize(
    ("stop", "error"), [([1], TypeError), (["ok", None], TypeError), ([""], ValueError)]
)
def test_a_stop_that_is_not_a_non_empty_string_is_named(stop, error):
    with pytest.raises(ValueError, match="stop"):  # pydantic names the field and item
        ChatBaichuan2(model="/nonexistent/folder", stop=stop)
    llm = ChatBaichuan2(model="/nonexistent/folder")
    with pytest.raises(error, match="stop must be a list of non-empty strings; item"):
        llm.invoke("hi", stop=stop)


def test_engine_sampling_params_share_the_same_checks():
    from langchain_baichuan2.engines import SamplingParams

    with pytest.raises(ValueError, match="min_new_tokens \\(9\\) must not exceed max_tokens"):
        SamplingParams(max_new_tokens=8, extra=(("min_new_tokens", 9),))
    with pytest.raises(TypeError, match="item 0 is int 1"):
        SamplingParams(max_new_tokens=8, stop=(1,))  # type: ignore[arg-type]


def test_every_standard_langchain_parameter_is_accepted():
    from langchain_tests.unit_tests import ChatModelUnitTests

    class Suite(ChatModelUnitTests):
        chat_model_class = ChatBaichuan2

    standard = Suite().standard_chat_model_params
    expected = {"temperature", "max_tokens", "timeout", "stop", "max_retries", "api_key"}
    assert set(standard) >= expected
    llm = ChatBaichuan2(model="folder", **standard)
    assert (llm.temperature, llm.max_tokens, llm.timeout, llm.stop, llm.max_retries) == (
        0,
        100,
        60,
        [],
        2,
    )
    assert "test" not in repr(llm)  # the key is a secret, never shown
    with pytest.raises(ValueError, match="max_retries"):
        ChatBaichuan2(model="folder", max_retries=-1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_tokens": 10**400}, "max_tokens must be below 2\\*\\*63, got 1000"),
        ({"temperature": 10**400}, "temperature must be a finite number, got 1000"),
        ({"model_max_length": "abc"}, "model_max_length must be an integer >= 1, got 'abc'"),
        ({"model_max_length": True}, "model_max_length must be an integer >= 1, got True"),
        ({"temperature": "0.5"}, "temperature must be a finite number, got str '0.5'"),
        ({"temperature": True}, "temperature must be a finite number, got bool True"),
        ({"model_kwargs": [1]}, "model_kwargs must be a dict of generate\\(\\) arguments"),
    ],
)
def test_one_rule_names_the_argument_at_construction_and_per_call(arguments, message):
    # Before: OverflowError, "invalid literal for int()", and "0.5" or True accepted
    # by the constructor while refused per call.
    with pytest.raises(ValueError, match=message):
        ChatBaichuan2(model="/nonexistent/folder", **arguments)
    llm = ChatBaichuan2(model="/nonexistent/folder")  # loading it would fail differently
    with pytest.raises(ValueError, match=message):
        llm.invoke("hi", **arguments)
    with pytest.raises(ValueError, match=message):
        llm.bind(**arguments)


def test_model_kwargs_none_means_not_set_at_construction_and_per_call():
    llm = ChatBaichuan2(model="/nonexistent/folder", model_kwargs=None)
    assert llm.model_kwargs == {}
    with pytest.raises(Exception) as raised:  # gets past the arguments to loading
        llm.invoke("hi", model_kwargs=None)
    assert "model_kwargs" not in str(raised.value) and "mapping" not in str(raised.value)


VLLM_LIMIT = "temperature must be at most 2.0 on backend 'vllm' \\(vLLM's limit\\), got 2.5"


def test_a_temperature_over_vllms_limit_is_refused_before_vllm_starts():
    # Before, it was refused only at the first call, after a vLLM start of minutes.
    with pytest.raises(ValueError, match=VLLM_LIMIT):
        ChatBaichuan2(model="/nonexistent/folder", backend="vllm", temperature=2.5)
    llm = ChatBaichuan2(model="/nonexistent/folder", backend="vllm")  # never started here
    with pytest.raises(ValueError, match=VLLM_LIMIT):
        llm.bind(temperature=2.5)
    with pytest.raises(ValueError, match=VLLM_LIMIT):
        llm.invoke("hi", temperature=2.5)
    with pytest.raises(ValueError, match=VLLM_LIMIT):
        llm.model_copy(update={"temperature": 2.5}).invoke("hi")
    assert ChatBaichuan2(model="folder", backend="native", temperature=2.5).temperature == 2.5


def test_backend_limits_are_data_each_engine_reads():
    from langchain_baichuan2.engines.settings import NATIVE_LIMITS, VLLM_LIMITS, SamplingParams

    assert VLLM_LIMITS.max_temperature == 2.0 and NATIVE_LIMITS.max_temperature is None
    assert set(VLLM_LIMITS.extra_arguments) < set(NATIVE_LIMITS.extra_arguments)
    params = SamplingParams(max_new_tokens=4, top_k=50, extra=(("suppress_tokens", [60]),))
    with pytest.raises(ValueError, match="top_k must be at most the vocabulary size 40"):
        NATIVE_LIMITS.check_request(params, vocab_size=40)
    with pytest.raises(ValueError, match="suppress_tokens holds ids outside the vocabulary"):
        NATIVE_LIMITS.check_request(params, vocab_size=55)
    with pytest.raises(ValueError, match="Unsupported generate\\(\\) argument\\(s\\) suppress"):
        VLLM_LIMITS.check_request(params, vocab_size=100)
