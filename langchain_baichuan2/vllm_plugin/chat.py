"""OpenAI-format chat messages to Baichuan2 prompt ids, exactly as ``ChatBaichuan2`` builds them.

The server's chat requests go through :func:`chat_prompt_ids` instead of a text template:
a template renders a string that vLLM tokenizes again with special-token parsing, so a
``<reserved_106>`` or ``</s>`` typed in a message would become a role or end token. Here
the messages become LangChain messages and :func:`~langchain_baichuan2.prompt.render`
encodes their text with the given encoder (a
:class:`~langchain_baichuan2.prompt.LiteralTextEncoder` in the server), while the role
tokens are ids: the ids are ``ChatBaichuan2``'s default prompt for the same messages.
A request that cannot become a prompt raises :class:`ChatRequestError`, naming its field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages

from langchain_baichuan2.prompt import Encoder, render
from langchain_baichuan2.tools import format_tools


class ChatRequestError(ValueError):
    """A chat request that cannot become a Baichuan2 prompt.

    Attributes:
        parameter: The request field at fault (``"messages"`` or ``"tools"``).
    """

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


# The fields of an OpenAI function tool this package reads: name, Python type, JSON type.
_FUNCTION_FIELDS = (
    ("name", str, "string"),
    ("description", str, "string"),
    ("parameters", Mapping, "object"),
)


def request_tools(tools: object) -> list[dict[str, Any]]:
    """The OpenAI function tools of a request, checked (None or empty: no tools).

    Raises:
        ChatRequestError: Unless ``tools`` is a list of ``{"function": {"name": str,
            "description": str, "parameters": object}}`` objects (description and
            parameters optional or null) whose names and parameters
            ``ChatBaichuan2.bind_tools`` would accept.
    """
    if not tools:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        msg = f"tools must be a list of function tools, got a {type(tools).__name__}"
        raise ChatRequestError(msg, "tools")
    checked = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            msg = f'tools[{index}] is not an object with a "function" object'
            raise ChatRequestError(msg, "tools")
        # vLLM passes the fields a client left out as null.
        function = {key: value for key, value in function.items() if value is not None}
        for key, kind, json_kind in _FUNCTION_FIELDS:
            if key in function and not isinstance(function[key], kind):
                msg = f"tools[{index}].function.{key} is not a JSON {json_kind}"
                raise ChatRequestError(msg, "tools")
        if "name" not in function:
            msg = f'tools[{index}].function has no "name"'
            raise ChatRequestError(msg, "tools")
        try:
            (formatted,) = format_tools([{"type": "function", "function": function}])
        except ValueError as e:
            raise ChatRequestError(f"tools[{index}]: {e}", "tools") from e
        checked.append(formatted)
    return checked


def _tool_call_arguments(arguments: Any, where: str) -> dict[str, Any]:
    """The arguments object of an OpenAI tool call (a JSON string, an object or empty)."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            msg = f"{where} has arguments that are not valid JSON: {e}"
            raise ValueError(msg) from e
    if not isinstance(arguments, Mapping):
        msg = f"{where} has arguments that are a JSON {type(arguments).__name__}, not an object"
        raise ValueError(msg)
    return dict(arguments)


def _langchain_message(message: Mapping[str, Any], index: int) -> BaseMessage:
    """One OpenAI-format message dict as the LangChain message ``ChatOpenAI`` would send."""
    if not isinstance(message, Mapping) or "role" not in message:
        msg = f"messages[{index}] is not an object with a 'role'"
        raise ValueError(msg)
    message = dict(message)
    calls = message.get("tool_calls")
    if calls:
        converted = []
        for number, call in enumerate(calls):
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                msg = f"messages[{index}].tool_calls[{number}] has no function with a name"
                raise ValueError(msg)
            where = f"messages[{index}].tool_calls[{number}] ({function['name']!r})"
            arguments = _tool_call_arguments(function.get("arguments"), where)
            converted.append({**call, "function": {**function, "arguments": arguments}})
        message["tool_calls"] = converted
    elif "tool_calls" in message:
        del message["tool_calls"]  # an empty or null list: a plain assistant message
    if message.get("content") is None:
        message["content"] = ""
    try:
        (converted_message,) = convert_to_messages([message])
    except ValueError as e:
        msg = f"messages[{index}] cannot be read as a chat message: {e}"
        raise ValueError(msg) from e
    return converted_message


def chat_prompt_ids(
    messages: Sequence[Mapping[str, Any]],
    encoder: Encoder,
    generation_config: Mapping[str, Any] | None = None,
    *,
    add_generation_prompt: bool = True,
    tools: object = None,
    tool_choice: object = "auto",
) -> list[int]:
    """Returns the Baichuan2 prompt ids of an OpenAI-format conversation.

    Args:
        messages: Chat messages as the OpenAI API sends them (``role``, ``content`` as a
            string or text parts, ``name``, ``tool_calls`` with JSON-string or object
            ``arguments``, ``tool_call_id``).
        encoder: Encodes message text; pass a ``LiteralTextEncoder`` so that typed
            control-token strings stay text.
        generation_config: The checkpoint's generation config as a dict (for the role
            ids); None uses Baichuan2's.
        add_generation_prompt: End with the assistant token (when the last message is
            not the assistant's, which the model then continues).
        tools: OpenAI function tools the request offers (checked by
            :func:`request_tools`): their protocol text opens the prompt, as
            ``ChatBaichuan2.bind_tools`` writes it.
        tool_choice: The request's; ``"none"`` leaves the tools out of the prompt.

    Returns:
        The ids :func:`~langchain_baichuan2.prompt.render` gives for the same LangChain
        messages, with no history truncation (vLLM refuses prompts longer than its
        context itself).

    Raises:
        ChatRequestError: On malformed tools, a message that is not a chat message,
            tool call arguments that are not a JSON object, or what ``render`` refuses
            (an empty conversation, a role or content block Baichuan2 cannot take).
    """
    checked_tools = request_tools(tools)
    try:
        converted = [_langchain_message(message, i) for i, message in enumerate(messages)]
        prompt = render(
            converted,
            encoder,
            generation_config,
            tools=checked_tools,
            tool_choice=tool_choice,
            add_generation_prompt=add_generation_prompt,
        )
    except ValueError as e:
        raise ChatRequestError(str(e), "messages") from e
    return prompt.input_ids
