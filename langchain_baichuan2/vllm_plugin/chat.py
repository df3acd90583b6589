"""OpenAI-format chat messages to Baichuan2 prompt ids, exactly as ``ChatBaichuan2`` builds them.

The server's chat requests go through :func:`chat_prompt_ids` instead of a text template:
a template renders a string that vLLM tokenizes again with special-token parsing, so a
``<reserved_106>`` or ``</s>`` typed in a message would become a role or end token. Here
the messages become LangChain messages and :func:`~langchain_baichuan2.prompt.build_chat_prompt`
encodes their text with the given encoder (a
:class:`~langchain_baichuan2.prompt.LiteralTextEncoder` in the server), while the role
tokens are ids: the ids are ``ChatBaichuan2``'s default prompt for the same messages.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage, SystemMessage, convert_to_messages

from langchain_baichuan2.prompt import Encoder, build_chat_prompt
from langchain_baichuan2.tools import conversation_language, tools_system_text


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
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    user_token_id: int = 195,
    assistant_token_id: int = 196,
) -> list[int]:
    """Returns the Baichuan2 prompt ids of an OpenAI-format conversation.

    Args:
        messages: Chat messages as the OpenAI API sends them (``role``, ``content`` as a
            string or text parts, ``name``, ``tool_calls`` with JSON-string or object
            ``arguments``, ``tool_call_id``).
        encoder: Encodes message text; pass a ``LiteralTextEncoder`` so that typed
            control-token strings stay text.
        add_generation_prompt: End with the assistant token (when the last message is
            not the assistant's, which the model then continues).
        tools: OpenAI function tools the request offers: their protocol text opens the
            prompt as a system message, as ``ChatBaichuan2.bind_tools`` writes it.
        user_token_id: The token that opens a user turn.
        assistant_token_id: The token that opens an assistant turn.

    Returns:
        The ids ``build_chat_prompt`` gives for the same LangChain messages, with no
        history truncation (vLLM refuses prompts longer than its context itself).

    Raises:
        ValueError: On a message that is not a chat message, tool call arguments that
            are not a JSON object, or what ``build_chat_prompt`` refuses (an empty
            conversation, a role or content block Baichuan2 cannot take).
    """
    converted = [_langchain_message(message, i) for i, message in enumerate(messages)]
    if tools:
        text = tools_system_text([dict(t) for t in tools], conversation_language(converted))
        converted = [SystemMessage(text), *converted]
    prompt = build_chat_prompt(
        converted,
        encoder,
        model_max_length=sys.maxsize,
        max_new_tokens=0,
        user_token_id=user_token_id,
        assistant_token_id=assistant_token_id,
    )
    ids = prompt.input_ids
    if not add_generation_prompt and converted[-1].type != "ai":
        ids = ids[:-1]  # build_chat_prompt's generation prompt (the assistant token)
    return ids
