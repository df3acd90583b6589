"""The chat template shipped for ``vllm serve`` renders our prompt builder's ids."""

import json

import pytest
from langchain_core.messages import (
    AIMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_openai_messages,
)

from langchain_baichuan2.modeling import BaichuanTokenizer
from langchain_baichuan2.prompt import build_chat_prompt
from langchain_baichuan2.testing import make_tiny_checkpoint
from langchain_baichuan2.vllm_plugin import CHAT_TEMPLATE

CONVERSATIONS = {
    "one user turn": [HumanMessage("What is 1 + 1?")],
    "system, chinese": [SystemMessage("你是助手。"), HumanMessage("温故而知新")],
    "two leading systems": [
        SystemMessage("Be brief."),
        SystemMessage("Be kind."),
        HumanMessage("Hi"),
    ],
    "later system is a user turn": [
        HumanMessage("Hi"),
        AIMessage("Hello!"),
        SystemMessage("Answer in French."),
        HumanMessage("How are you?"),
    ],
    "named user": [HumanMessage("Hi", name="alice")],
    "tools": [
        HumanMessage("Weather in 北京?"),
        AIMessage(
            "Let me check.",
            tool_calls=[{"name": "weather", "args": {"city": "北京", "days": 2}, "id": "c1"}],
        ),
        ToolMessage("晴 sunny", tool_call_id="c1", name="weather"),
        HumanMessage("Thanks"),
    ],
    "ends with the assistant": [HumanMessage("Count"), AIMessage("1, 2,")],
    "leading assistant": [AIMessage("Welcome."), HumanMessage("Hi")],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return BaichuanTokenizer.from_pretrained(
        make_tiny_checkpoint(tmp_path_factory.mktemp("template"), "7b")
    )


def openai_messages(messages):
    """OpenAI-format dicts with tool arguments as objects, as vLLM gives templates."""
    converted = convert_to_openai_messages(messages)
    for message in converted:
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return converted


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_template_ids_equal_the_prompt_builder(tokenizer, name):
    messages = CONVERSATIONS[name]
    expected = build_chat_prompt(messages, tokenizer, model_max_length=4096, max_new_tokens=16)
    rendered = tokenizer.apply_chat_template(
        openai_messages(messages),
        chat_template=CHAT_TEMPLATE.read_text(),
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tokenizer.encode(rendered, add_special_tokens=False) == expected.input_ids
