r"""The tool-calling and structured-output protocol for Baichuan2.

Baichuan2 was never trained on a tool format, so this package defines one and makes it
valid by construction with grammar-constrained decoding (see ``grammar.py``).

**Tool definitions** go into the system text, in the conversation's language (Chinese
when a user or system message contains CJK characters, else English)::

    You can call the following tools. To call one, reply with exactly
    <tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>
    and nothing else; otherwise answer normally.

    Tools:
    - get_weather: Get the weather for a city.
      Parameters (JSON schema): {"type": "object", ...}

**A tool call** in an assistant turn (an ``AIMessage``'s ``tool_calls``, after its
text) is rendered as ``<tool_call>{"name": "get_weather", "arguments": {"city":
"Paris"}}</tool_call>``, one per call, with no separator.

**A tool result** (``ToolMessage``) becomes a user turn, because Baichuan2 has only
user and assistant roles: ``<tool_response name="get_weather" id="call_1">sunny
</tool_response>``; ``status="error"`` adds ``status="error"`` to the tag. List content
is joined as text.

**Parsing**: every ``<tool_call>...</tool_call>`` block in the output becomes a
``ToolCall`` (ids generated as ``call_<hex>``); a block that is not valid JSON with a
string ``name`` and an object ``arguments``, or one cut off by ``max_tokens`` or a stop
string, becomes an ``InvalidToolCall`` whose ``args`` is the raw call text; text outside
the blocks is the message content.

**Structured output** asks, in the system text, for a single JSON object matching the
schema, and the grammar allows nothing else.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.messages import BaseMessage, ToolMessage
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call, tool_call
from langchain_core.utils.function_calling import convert_to_openai_tool

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ToolChoice = Literal["auto", "none", "required"] | str
Language = Literal["en", "zh"]

_TEMPLATES: dict[Language, dict[str, str]] = {
    "en": {
        "intro": (
            "You can call the following tools. To call one, reply with exactly\n"
            '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
            "and nothing else; otherwise answer normally."
        ),
        "tools": "Tools:",
        "parameters": "Parameters (JSON schema):",
        "json": "Reply with only a JSON object that matches this JSON schema:",
        "any_json": "Reply with only a JSON object.",
    },
    "zh": {
        "intro": (
            "你可以调用下列工具。调用时只回复\n"
            '<tool_call>{"name": "<工具名>", "arguments": {<JSON 格式的参数>}}</tool_call>\n'
            "不要添加其他内容；不需要工具时正常回答。"
        ),
        "tools": "工具：",
        "parameters": "参数（JSON Schema）：",
        "json": "只回复一个符合以下 JSON Schema 的 JSON 对象：",
        "any_json": "只回复一个 JSON 对象。",
    },
}

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_TOOL_NAME = re.compile(r"[\w.-]{1,64}")
_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)


def _dumps(value: Any) -> str:
    """Compact JSON as the protocol writes it (non-ASCII kept readable)."""
    return json.dumps(value, ensure_ascii=False)


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Convert any tool form LangChain accepts to OpenAI-style function definitions.

    Accepts ``BaseTool``, functions, pydantic models, TypedDicts and JSON-schema dicts.
    A tool whose name could break the call markup (anything but letters, digits,
    ``_``, ``.`` and ``-``, at most 64) or whose parameters are not a JSON object
    schema raises ``ValueError``.
    """
    formatted = [convert_to_openai_tool(t) for t in tools]
    for tool in formatted:
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            msg = (
                f"Tool name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' "
                "or '-' (other text can break the tool-call markup)"
            )
            raise ValueError(msg)
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            msg = (
                f"Tool {name!r} has parameters {parameters!r:.80}: they must be a JSON schema "
                "of type 'object' (the call's arguments are a JSON object)"
            )
            raise ValueError(msg)
    return formatted


def normalize_tool_choice(tool_choice: Any, tool_names: Sequence[str]) -> ToolChoice:
    """Map LangChain's ``tool_choice`` forms to "auto", "none", "required" or a name.

    ``None`` and ``"auto"`` mean auto; ``"any"``, ``"required"`` and ``True`` force a
    call of any tool; a tool name or ``{"type": "function", "function": {"name": ...}}``
    forces that tool.
    """
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(name, str) and name in tool_names:
        return name
    msg = (
        f"tool_choice {tool_choice!r} is not one of 'auto', 'none', 'any', 'required', True, "
        f"or a bound tool name ({', '.join(tool_names) or 'no tools bound'})"
    )
    raise ValueError(msg)


def conversation_language(messages: Sequence[BaseMessage]) -> Language:
    """Chinese when a user or system message contains CJK characters, else English."""
    for message in messages:
        if message.type in ("human", "system") and _CJK.search(str(message.content)):
            return "zh"
    return "en"


def tools_system_text(tools: Sequence[dict[str, Any]], language: Language) -> str:
    """The system text that describes the tools and the call format."""
    words = _TEMPLATES[language]
    lines = [words["intro"], "", words["tools"]]
    for tool in tools:
        function = tool["function"]
        lines.append(f"- {function['name']}: {function.get('description', '')}".rstrip())
        lines.append(f"  {words['parameters']} {_dumps(function.get('parameters', {}))}")
    return "\n".join(lines)


def json_system_text(schema: dict[str, Any] | None, language: Language) -> str:
    """The system text that asks for a JSON object (matching ``schema`` if given)."""
    words = _TEMPLATES[language]
    if schema is None:
        return words["any_json"]
    return f"{words['json']}\n{_dumps(schema)}"


@dataclass(frozen=True)
class Constraint:
    """What the output must follow, independent of any backend's grammar engine.

    ``kind="json"``: one JSON object, matching ``schema`` when one is given.
    ``kind="tools"``: the tool-call protocol for ``tools`` (OpenAI function dicts)
    under ``choice`` (``"auto"``, ``"required"`` or a tool name). ``grammar.py`` turns
    it into a grammar.
    """

    kind: Literal["json", "tools"]
    schema: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()
    choice: ToolChoice = "auto"


def tool_call_prefix(name: str) -> str:
    """The text of a call of ``name`` up to its arguments object."""
    return f'{TOOL_CALL_OPEN}{{"name": {_dumps(name)}, "arguments": '


TOOL_CALL_SUFFIX = "}" + TOOL_CALL_CLOSE


def render_tool_call(name: str, args: dict[str, Any]) -> str:
    """Render one tool call the way the model is asked to write it."""
    return tool_call_prefix(name) + _dumps(args) + TOOL_CALL_SUFFIX


def render_tool_result(message: ToolMessage) -> str:
    """Render a ``ToolMessage`` as the text of a user turn."""
    if isinstance(message.content, str):
        content = message.content
    else:
        content = "".join(
            block if isinstance(block, str) else str(block.get("text", _dumps(block)))
            for block in message.content
        )
    attributes = f' name="{message.name}"' if message.name else ""
    attributes += f' id="{message.tool_call_id}"'
    if message.status == "error":
        attributes += ' status="error"'
    return f"<tool_response{attributes}>{content}</tool_response>"


@dataclass
class ParsedOutput:
    """Model output split into content text, tool calls and unparsable calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def parse_tool_calls(text: str) -> ParsedOutput:
    """Extract the protocol's tool-call blocks from ``text``.

    An unterminated ``<tool_call>`` at the end (e.g. cut by ``max_tokens``) is an
    invalid call too.
    """
    parsed = ParsedOutput(content="")
    pieces: list[str] = []
    position = 0
    blocks = list(_CALL_BLOCK.finditer(text))
    for match in blocks:
        pieces.append(text[position : match.start()])
        position = match.end()
        _add_call(parsed, match.group(1))
    rest = text[position:]
    open_at = rest.find(TOOL_CALL_OPEN)
    if open_at >= 0:
        pieces.append(rest[:open_at])
        _add_call(parsed, rest[open_at + len(TOOL_CALL_OPEN) :], error="unterminated tool call")
    else:
        pieces.append(rest)
    parsed.content = "".join(pieces)
    return parsed


def _add_call(parsed: ParsedOutput, body: str, error: str | None = None) -> None:
    """Append ``body`` as a valid call, or as an invalid one with the reason."""
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    if error is None:
        try:
            data = json.loads(body)
            name, args = data["name"], data["arguments"]
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError("'name' must be a string and 'arguments' an object")
        except (ValueError, KeyError, TypeError) as e:
            error = f"{type(e).__name__}: {e}"
        else:
            parsed.tool_calls.append(tool_call(name=name, args=args, id=call_id))
            return
    name_match = re.search(r'"name"\s*:\s*"([^"]*)"', body)
    # ``args`` keeps the call's raw markup: starting with "<", partial-JSON repair (which
    # LangChain applies when it merges streamed chunks) cannot turn it into a bogus call.
    parsed.invalid_tool_calls.append(
        invalid_tool_call(
            name=name_match.group(1) if name_match else None,
            args=TOOL_CALL_OPEN + body,
            id=call_id,
            error=error,
        )
    )


class ToolCallTextFilter:
    """Stream filter: passes content text, holds back tool-call markup.

    Text that could be the start of ``<tool_call>`` is held until it is known; the
    text of a call, up to its ``</tool_call>``, is never content (calls are parsed at
    the end from the full text). What it emits equals ``parse_tool_calls(...).content``.
    """

    def __init__(self) -> None:
        self._held = ""
        self._in_call = False

    def push(self, text: str) -> str:
        """Return the part of ``text`` that is safe to show as content now."""
        buffer, self._held = self._held + text, ""
        out: list[str] = []
        while True:
            if self._in_call:
                end = buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    self._held = buffer
                    return "".join(out)
                buffer, self._in_call = buffer[end + len(TOOL_CALL_CLOSE) :], False
                continue
            start = buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                out.append(buffer[:start])
                buffer, self._in_call = buffer[start + len(TOOL_CALL_OPEN) :], True
                continue
            for keep in range(min(len(TOOL_CALL_OPEN) - 1, len(buffer)), 0, -1):
                if TOOL_CALL_OPEN.startswith(buffer[-keep:]):
                    self._held = buffer[-keep:]
                    buffer = buffer[:-keep]
                    break
            out.append(buffer)
            return "".join(out)

    def flush(self) -> str:
        """Release held text at the end of the stream (an unfinished call is dropped)."""
        held, self._held = self._held, ""
        return "" if self._in_call else held
