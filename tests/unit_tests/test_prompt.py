"""prompt.render against prompts written out by hand from SPEC's "Chat prompt" rule.

The fake encoder maps each character c to ord(c) + 2000, so the expected ids below
are written by hand: "a" 2097, "b" 2098, "c" 2099, "d" 2100, "e" 2101, "f" 2102,
"g" 2103, "h" 2104, "i" 2105, "s" 2115, "\n" 2010, " " 2032, ":" 2058, "B" 2066,
"o" 2111. 195 opens a user turn, 196 an assistant turn.
"""

import pytest
import sentencepiece as spm
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from transformers import GenerationConfig

from langchain_baichuan2.prompt import (
    ChatPrompt,
    eos_token_ids,
    message_text,
    render,
    role_token_ids,
)
from langchain_baichuan2.tools import json_system_text, tools_system_text

U, A = 195, 196


class CharEncoder:
    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        assert add_special_tokens is False, "the official prompt has no BOS/EOS"
        return [ord(c) + 2000 for c in text]


def build(messages: list[BaseMessage], max_input: int = 100) -> ChatPrompt:
    return render(messages, CharEncoder(), model_max_length=max_input + 10, max_new_tokens=10)


def test_single_turn_is_user_text_then_assistant_token():
    prompt = build([HumanMessage("hi")])
    assert prompt == ChatPrompt(input_ids=[U, 2104, 2105, A], dropped_rounds=0, truncated=False)


def test_system_text_has_no_marker_and_turns_alternate():
    messages = [SystemMessage("s"), HumanMessage("a"), AIMessage("b"), HumanMessage("c")]
    assert build(messages).input_ids == [2115, U, 2097, A, 2098, U, 2099, A]


def test_ending_with_an_assistant_message_adds_no_assistant_token():
    assert build([HumanMessage("a"), AIMessage("b")]).input_ids == [U, 2097, A, 2098]


def test_only_a_system_message_gives_system_then_assistant_token():
    assert build([SystemMessage("s")]).input_ids == [2115, A]


def test_old_rounds_that_do_not_fit_are_dropped():
    # max_input 8, system 1 id -> budget 7; rounds of 6, 6 and 2 ids.
    messages = [
        SystemMessage("s"),
        HumanMessage("aa"),
        AIMessage("bb"),
        HumanMessage("cc"),
        AIMessage("dd"),
        HumanMessage("e"),
    ]
    prompt = build(messages, max_input=8)
    assert prompt == ChatPrompt(input_ids=[2115, U, 2101, A], dropped_rounds=2, truncated=False)


def test_the_walk_stops_at_the_first_round_that_does_not_fit():
    # Budget 6: "c" (2) fits, "bbbbbb" (7) does not, so "a" (2) is dropped though it fits.
    messages = [HumanMessage("a"), HumanMessage("bbbbbb"), HumanMessage("c")]
    prompt = build(messages, max_input=6)
    assert prompt == ChatPrompt(input_ids=[U, 2099, A], dropped_rounds=2, truncated=False)


def test_a_round_that_fits_the_budget_exactly_is_kept():
    messages = [HumanMessage("a"), AIMessage("b"), HumanMessage("c"), AIMessage("d")]
    prompt = build(messages, max_input=8)
    assert prompt == ChatPrompt(
        input_ids=[U, 2097, A, 2098, U, 2099, A, 2100], dropped_rounds=0, truncated=False
    )


def test_a_newest_round_over_budget_is_kept_and_cut_on_the_left():
    messages = [HumanMessage("a"), AIMessage("b"), HumanMessage("abcdef")]
    prompt = build(messages, max_input=4)
    assert prompt == ChatPrompt(input_ids=[2100, 2101, 2102, A], dropped_rounds=1, truncated=True)


def test_the_final_cut_can_remove_the_start_of_the_system_prompt():
    # System 3 ids leave a budget of 1; the newest round (2 ids) is kept anyway.
    prompt = build([SystemMessage("abc"), HumanMessage("d")], max_input=4)
    assert prompt == ChatPrompt(input_ids=[2099, U, 2100, A], dropped_rounds=0, truncated=True)


def test_the_assistant_token_after_a_full_history_cuts_one_system_id():
    # Official quirk: the history fills the budget, so the appended 196 pushes one over.
    prompt = build([SystemMessage("s"), HumanMessage("ab")], max_input=4)
    assert prompt == ChatPrompt(input_ids=[U, 2097, 2098, A], dropped_rounds=0, truncated=True)


def test_a_leading_assistant_message_opens_a_round_of_its_own():
    assert build([AIMessage("a"), HumanMessage("b")]).input_ids == [A, 2097, U, 2098, A]
    prompt = build([AIMessage("a"), HumanMessage("b")], max_input=3)
    assert prompt == ChatPrompt(input_ids=[U, 2098, A], dropped_rounds=1, truncated=False)


def test_leading_system_messages_are_joined_with_a_newline():
    messages = [SystemMessage("a"), SystemMessage("b"), HumanMessage("c")]
    system = [2097, 2010, 2098]  # "a\nb"
    assert build(messages).input_ids == [*system, U, 2099, A]


def test_double_messages_conversation_of_langchain_tests():
    messages = [
        SystemMessage("a"),
        SystemMessage("b"),
        HumanMessage("c"),
        HumanMessage("d"),
        AIMessage("e"),
        AIMessage("f"),
        HumanMessage("g"),
    ]
    system = [2097, 2010, 2098]  # "a\nb"
    # Rounds: [c], [d, e, f], [g]; two user turns in a row are simply adjacent.
    assert build(messages).input_ids == [*system, U, 2099, U, 2100, A, 2101, A, 2102, U, 2103, A]


def test_a_later_system_message_becomes_a_user_turn():
    messages = [HumanMessage("a"), AIMessage("b"), SystemMessage("c"), HumanMessage("d")]
    assert build(messages).input_ids == [U, 2097, A, 2098, U, 2099, U, 2100, A]


def test_a_later_system_message_opens_its_own_round():
    messages = [HumanMessage("a"), AIMessage("b"), SystemMessage("c"), HumanMessage("d")]
    prompt = build(messages, max_input=5)
    assert prompt == ChatPrompt(input_ids=[U, 2099, U, 2100, A], dropped_rounds=1, truncated=False)


def test_chat_message_roles_map_to_system_user_and_assistant():
    messages = [
        ChatMessage(role="system", content="s"),
        ChatMessage(role="user", content="a"),
        ChatMessage(role="ai", content="b"),
        ChatMessage(role="human", content="c"),
        ChatMessage(role="assistant", content="d"),
    ]
    assert build(messages).input_ids == [2115, U, 2097, A, 2098, U, 2099, A, 2100]


def test_an_unknown_chat_message_role_is_rejected_by_name():
    with pytest.raises(ValueError, match="ChatMessage role 'tool' is not supported"):
        build([ChatMessage(role="tool", content="a")])


def chars(text: str) -> list[int]:
    """The fake tokenizer's ids, one per character (ord + 2000)."""
    return [ord(c) + 2000 for c in text]


def test_a_tool_message_is_a_user_turn_in_the_tool_protocol():
    call = {"name": "f", "args": {"x": 1}, "id": "c1", "type": "tool_call"}
    messages = [
        HumanMessage("a"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("ok", tool_call_id="c1", name="f"),
    ]
    assert build(messages, max_input=500).input_ids == [
        U,
        2097,
        A,
        *chars('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'),
        U,
        *chars('<tool_response name="f" id="c1">ok</tool_response>'),
        A,
    ]


def test_a_failed_tool_result_says_error():
    message = ToolMessage("boom", tool_call_id="c2", status="error")
    assert build([HumanMessage("a"), message]).input_ids == [
        U,
        2097,
        U,
        *chars('<tool_response id="c2" status="error">boom</tool_response>'),
        A,
    ]


def test_function_messages_are_rejected_by_type():
    with pytest.raises(ValueError, match="FunctionMessage is not supported"):
        build([HumanMessage("a"), FunctionMessage("a", name="f")])


def test_a_user_name_prefixes_the_text():
    bo_colon_space = [2066, 2111, 2058, 2032]
    assert build([HumanMessage("hi", name="Bo")]).input_ids == [U, *bo_colon_space, 2104, 2105, A]


def test_names_on_assistant_and_system_messages_are_ignored():
    messages = [SystemMessage("s", name="Bo"), HumanMessage("a"), AIMessage("b", name="Bo")]
    assert build(messages).input_ids == [2115, U, 2097, A, 2098]


def test_list_content_joins_strings_and_text_blocks():
    message = HumanMessage(["a", {"type": "text", "text": "b"}])
    assert message_text(message) == "ab"
    assert build([message]).input_ids == [U, 2097, 2098, A]


def test_a_non_text_block_is_rejected_naming_its_type():
    block = {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}
    with pytest.raises(ValueError, match="text only; got a content block of type 'image_url'"):
        build([HumanMessage([{"type": "text", "text": "a"}, block])])


def test_tool_use_blocks_of_an_ai_message_are_rendered_from_its_tool_calls():
    call = {"name": "f", "args": {}, "id": "1", "type": "tool_call"}
    content = [
        {"type": "text", "text": "b"},
        {"type": "tool_use", "id": "1", "name": "f", "input": {}},
    ]
    ids = build([HumanMessage("a"), AIMessage(content, tool_calls=[call])]).input_ids
    assert ids == [
        U,
        2097,
        A,
        2098,
        *chars('<tool_call>{"name": "f", "arguments": {}}</tool_call>'),
    ]


def test_an_empty_message_list_is_rejected():
    with pytest.raises(ValueError, match="messages is empty"):
        build([])


@pytest.mark.parametrize("max_new_tokens", [10, 11])
def test_max_new_tokens_must_leave_room_for_the_prompt(max_new_tokens: int):
    msg = (
        rf"max_tokens \({max_new_tokens}\) leaves no room for the prompt in model_max_length \(10\)"
    )
    with pytest.raises(ValueError, match=msg):
        render(
            [HumanMessage("a")], CharEncoder(), model_max_length=10, max_new_tokens=max_new_tokens
        )


@pytest.mark.parametrize(
    "generation_config",
    [
        {"user_token_id": 7, "assistant_token_id": 8},
        GenerationConfig(user_token_id=7, assistant_token_id=8),
    ],
)
def test_role_token_ids_come_from_the_generation_config(generation_config):
    prompt = render(
        [HumanMessage("a"), AIMessage("b"), HumanMessage("c")],
        CharEncoder(),
        generation_config,
        model_max_length=20,
        max_new_tokens=10,
    )
    assert prompt.input_ids == [7, 2097, 8, 2098, 7, 2099, 8]


@pytest.mark.parametrize("generation_config", [None, {}, GenerationConfig()])
def test_role_token_ids_default_to_195_and_196(generation_config):
    assert role_token_ids(generation_config) == (195, 196)


def test_without_a_length_no_round_is_dropped():
    messages = [HumanMessage("a" * 50), AIMessage("b" * 50), HumanMessage("c")]
    prompt = render(messages, CharEncoder())
    assert len(prompt.input_ids) == 105  # 3 role tokens, 101 characters, the final one
    assert (prompt.dropped_rounds, prompt.truncated) == (0, False)


def test_without_the_generation_prompt_no_assistant_token_ends_the_prompt():
    prompt = render([HumanMessage("a")], CharEncoder(), add_generation_prompt=False)
    assert prompt.input_ids == [U, 2097]


TOOL = {
    "type": "function",
    "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
}


def test_the_tools_text_goes_first_as_system_text():
    prompt = render([SystemMessage("s"), HumanMessage("hi")], CharEncoder(), tools=[TOOL])
    text = tools_system_text([TOOL], "en")
    assert prompt.input_ids == [*CharEncoder().encode(f"{text}\ns", add_special_tokens=False),
                                U, 2104, 2105, A]  # fmt: skip


def test_the_tools_text_is_in_the_conversations_language():
    prompt = render([HumanMessage("你好")], CharEncoder(), tools=[TOOL])
    text = tools_system_text([TOOL], "zh")
    assert prompt.input_ids[: len(text)] == CharEncoder().encode(text, add_special_tokens=False)


def test_tool_choice_none_leaves_the_tools_out():
    prompt = render([HumanMessage("hi")], CharEncoder(), tools=[TOOL], tool_choice="none")
    assert prompt.input_ids == [U, 2104, 2105, A]


@pytest.mark.parametrize("schema", [None, {"type": "object"}])
def test_a_response_format_puts_the_json_text_first_instead_of_the_tools(schema):
    prompt = render(
        [HumanMessage("hi")], CharEncoder(), tools=[TOOL], response_format={"schema": schema}
    )
    text = json_system_text(schema, "en")
    assert prompt.input_ids == [*CharEncoder().encode(text, add_special_tokens=False),
                                U, 2104, 2105, A]  # fmt: skip


class Tokenizer:
    eos_token_id = 5


@pytest.mark.parametrize(
    ("generation_config", "tokenizer", "expected"),
    [
        ({"eos_token_id": 7}, Tokenizer(), [7]),
        (GenerationConfig(eos_token_id=[9, 7, 9]), None, [9, 7]),
        ({"eos_token_id": []}, Tokenizer(), [5]),
        (None, Tokenizer(), [5]),
        ({}, None, [2]),
        (GenerationConfig(), object(), [2]),
    ],
)
def test_eos_comes_from_the_generation_config_then_the_tokenizer_then_2(
    generation_config, tokenizer, expected
):
    assert eos_token_ids(generation_config, tokenizer) == expected


class SentencePieceEncoder:
    def __init__(self, model_file: str) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=model_file)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self.sp.encode(text)


@pytest.mark.real_tokenizer
def test_single_turn_with_the_real_tokenizer(real_tokenizer_model):
    encoder = SentencePieceEncoder(str(real_tokenizer_model))
    prompt = render([HumanMessage("你好")], encoder, model_max_length=4096, max_new_tokens=2048)
    assert prompt.input_ids == [U, *encoder.sp.encode("你好"), A]
    assert prompt.input_ids == [U, 16829, A]
