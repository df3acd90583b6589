"""Token counting with the Baichuan2 prompt builder, not LangChain's GPT-2 fallback."""

import logging

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from pydantic import BaseModel

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.loading import registry
from langchain_baichuan2.modeling import BaichuanTokenizer


class GetWeather(BaseModel):
    """Get the weather of a city."""

    city: str


def test_message_count_is_the_official_prompt_length_without_loading_weights(tiny_13b):
    registry.clear()
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_13b)

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Hello there"),
        AIMessage("Hi"),
        HumanMessage("Weather?"),
    ]
    # SPEC: system ids, then 195 + user ids, 196 + assistant ids, ..., then 196.
    expected = [
        *encode("Be brief."),
        195,
        *encode("Hello there"),
        196,
        *encode("Hi"),
        195,
        *encode("Weather?"),
        196,
    ]
    llm = ChatBaichuan2(model=str(tiny_13b))
    assert llm.get_num_tokens_from_messages(messages) == len(expected)
    assert (
        registry.peek(
            str(tiny_13b),
            **{
                "revision": None,
                "source": "auto",
                "dtype": "auto",
                "device_map": None,
                "quantization": None,
            },
        )
        is None
    )
    assert llm.get_num_tokens("Hello there") == len(encode("Hello there"))
    # Typed role tokens are text, as in the prompt.
    assert 195 not in llm.get_token_ids("<reserved_106>")


def test_tools_add_their_protocol_text_to_the_count(tiny_13b):
    llm = ChatBaichuan2(model=str(tiny_13b))
    messages = [HumanMessage("Weather in Paris?")]
    plain = llm.get_num_tokens_from_messages(messages)
    with_tools = llm.get_num_tokens_from_messages(messages, tools=[GetWeather])
    assert with_tools > plain
    # The same count as the prompt a bound call really sends (its usage metadata).
    reply = llm.bind_tools([GetWeather]).invoke(messages, max_tokens=1)
    assert reply.usage_metadata["input_tokens"] == with_tools


def test_long_prompts_do_not_trigger_transformers_length_warning(tiny_13b, caplog):
    llm = ChatBaichuan2(model=str(tiny_13b), model_max_length=64, max_tokens=2)
    with caplog.at_level(logging.WARNING):
        llm.invoke("word " * 200)
    assert not [r for r in caplog.records if "sequence length is longer" in r.getMessage()]
    assert [r for r in caplog.records if "cut on the left" in r.getMessage()]
