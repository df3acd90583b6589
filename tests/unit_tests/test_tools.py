"""The tool protocol: rendering, parsing, tool_choice forms, the stream filter."""

import pytest
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_baichuan2.grammar import bound_lengths
from langchain_baichuan2.tools import (
    ToolCallTextFilter,
    conversation_language,
    format_tools,
    json_system_text,
    normalize_tool_choice,
    parse_tool_calls,
    render_tool_call,
    render_tool_result,
    tools_system_text,
)


def get_weather(city: str) -> str:
    """Get the weather of a city."""
    return "sunny"


WEATHER_PARAMS = (
    '{"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}'
)


def test_english_tool_prompt_equals_the_documented_text():
    expected = (
        "You can call the following tools. To call one, reply with exactly\n"
        '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
        "and nothing else; otherwise answer normally.\n"
        "\n"
        "Tools:\n"
        "- get_weather: Get the weather of a city.\n"
        f"  Parameters (JSON schema): {WEATHER_PARAMS}"
    )
    assert tools_system_text(format_tools([get_weather]), "en") == expected


def test_chinese_tool_prompt_equals_the_documented_text():
    expected = (
        "你可以调用下列工具。调用时只回复\n"
        '<tool_call>{"name": "<工具名>", "arguments": {<JSON 格式的参数>}}</tool_call>\n'
        "不要添加其他内容；不需要工具时正常回答。\n"
        "\n"
        "工具：\n"
        "- get_weather: Get the weather of a city.\n"
        f"  参数（JSON Schema）： {WEATHER_PARAMS}"
    )
    assert tools_system_text(format_tools([get_weather]), "zh") == expected


def test_tool_calls_and_results_render_as_documented():
    assert render_tool_call("get_weather", {"city": "北京"}) == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "北京"}}</tool_call>'
    )
    result = ToolMessage("晴，25°C", tool_call_id="call_1", name="get_weather")
    assert render_tool_result(result) == (
        '<tool_response name="get_weather" id="call_1">晴，25°C</tool_response>'
    )
    failed = ToolMessage(
        [{"type": "text", "text": "city not found"}], tool_call_id="call_2", status="error"
    )
    assert render_tool_result(failed) == (
        '<tool_response id="call_2" status="error">city not found</tool_response>'
    )


def test_json_prompts_in_both_languages():
    assert json_system_text(None, "en") == "Reply with only a JSON object."
    assert json_system_text({"type": "object"}, "zh") == (
        '只回复一个符合以下 JSON Schema 的 JSON 对象：\n{"type": "object"}'
    )


def test_language_follows_the_user_and_system_text():
    assert conversation_language([HumanMessage("What's the weather?")]) == "en"
    assert conversation_language([HumanMessage("今天天气怎么样？")]) == "zh"
    assert conversation_language([SystemMessage("用中文回答"), HumanMessage("hi")]) == "zh"


@pytest.mark.parametrize(
    "args",
    [{}, {"city": "Paris"}, {"n": 3, "nested": {"a": [1, 2.5, None, True]}}, {"text": '引号"和\\'}],
)
def test_render_then_parse_gives_the_same_call(args):
    parsed = parse_tool_calls("Let me check. " + render_tool_call("lookup", args))
    assert parsed.content == "Let me check. "
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("lookup", args)]
    assert parsed.tool_calls[0]["id"].startswith("call_")
    assert not parsed.invalid_tool_calls


def test_several_calls_parse_in_order_with_distinct_ids():
    text = render_tool_call("a", {"x": 1}) + render_tool_call("b", {})
    calls = parse_tool_calls(text).tool_calls
    assert [c["name"] for c in calls] == ["a", "b"]
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>{"name": "a", "arguments": {"x": </tool_call>', "JSONDecodeError"),
        ('<tool_call>{"name": "a"}</tool_call>', "KeyError"),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', "TypeError"),
        ('<tool_call>{"name": "a", "arguments": {"x"', "unterminated"),
    ],
)
def test_unparsable_calls_become_invalid_tool_calls(text, error):
    parsed = parse_tool_calls(text)
    assert not parsed.tool_calls
    assert len(parsed.invalid_tool_calls) == 1
    assert error in parsed.invalid_tool_calls[0]["error"]


def test_text_without_calls_is_all_content():
    assert parse_tool_calls("just <b>text</b> <tool").content == "just <b>text</b> <tool"


@pytest.mark.parametrize("cut", [1, 3, 7, 11, 20])
def test_stream_filter_emits_exactly_the_parsed_content(cut):
    text = "Sure. <to" + render_tool_call("a", {"x": "<tool_call>"}) + " done <tool_c"
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
    stream = ToolCallTextFilter()
    shown = "".join(stream.push(p) for p in pieces) + stream.flush()
    assert shown == "Sure. <to done <tool_c"


class Multiply(BaseModel):
    """Multiply two numbers."""

    a: int = Field(description="first")
    b: int


class Search(TypedDict):
    """Search the web."""

    query: str


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_every_tool_form_converts_to_a_function_definition():
    schema = {
        "title": "lookup",
        "description": "Look up a word.",
        "type": "object",
        "properties": {"word": {"type": "string"}},
        "required": ["word"],
    }
    names = [
        t["function"]["name"] for t in format_tools([get_weather, Multiply, Search, add, schema])
    ]
    assert names == ["get_weather", "Multiply", "Search", "add", "lookup"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        (False, "none"),
        ("any", "required"),
        ("required", "required"),
        (True, "required"),
        ("b", "b"),
        ({"type": "function", "function": {"name": "a"}}, "a"),
    ],
)
def test_tool_choice_forms(choice, expected):
    assert normalize_tool_choice(choice, ["a", "b"]) == expected


def test_an_unknown_tool_choice_is_rejected_by_name():
    with pytest.raises(ValueError, match="tool_choice 'c' is not one of"):
        normalize_tool_choice("c", ["a", "b"])


def test_length_bounds_apply_only_where_no_constraint_exists():
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "limited": {"type": "string", "maxLength": 3},
            "choice": {"type": "string", "enum": ["x", "y"]},
            "items": {"type": "array", "items": {"type": ["string", "null"]}},
            "count": {"type": "integer"},
            "ratio": {"type": "number", "maximum": 1},
        },
    }
    bounded = bound_lengths(schema, 8)
    pattern = '^[^\\x00-\\x1f"\\\\]{0,8}$'
    assert bounded["properties"]["free"]["pattern"] == pattern
    assert "pattern" not in bounded["properties"]["limited"]
    assert "pattern" not in bounded["properties"]["choice"]
    assert bounded["properties"]["items"]["items"]["pattern"] == pattern
    assert bounded["properties"]["items"]["maxItems"] == 8
    assert (
        bounded["properties"]["count"]["minimum"],
        bounded["properties"]["count"]["maximum"],
    ) == (
        -99999999,
        99999999,
    )
    assert "minimum" not in bounded["properties"]["ratio"]
    assert bound_lengths(schema, None) is schema


@pytest.mark.parametrize("name", ["bad</tool_call>name", 'quote"name', "two words", "x" * 65, ""])
def test_tool_names_that_break_the_markup_are_rejected(name):
    tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    with pytest.raises(ValueError, match="is not allowed"):
        format_tools([tool])


def test_tool_parameters_must_be_an_object_schema():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    with pytest.raises(ValueError, match="type 'object'"):
        format_tools([tool])


def test_unicode_tool_names_are_allowed():
    tool = {"type": "function", "function": {"name": "查询天气", "parameters": {"type": "object"}}}
    assert format_tools([tool])[0]["function"]["name"] == "查询天气"
