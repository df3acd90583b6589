r"""LangChain messages to Baichuan2 prompt ids, exactly as the official ``build_chat_input``.

:func:`render` is the one entry point: ``ChatBaichuan2`` calls, its token counts and
the vLLM server's chat renderer all build their prompt with it. This module is also
the one place that knows the role ids (:func:`role_token_ids`), where the tool or JSON
protocol's system text goes, and the end-of-answer ids (:func:`eos_token_ids`).

The official algorithm (``generation_utils.build_chat_input``, used by ``model.chat``):

1. ``max_input = model_max_length - max_new_tokens``.
2. The system text is encoded as plain ids, with no role token.
3. The other messages are split into rounds, a new round starting at each user
   message. A user message becomes ``[user_token_id] + encode(text)``; any other role
   becomes ``[assistant_token_id] + encode(text)``. No EOS, no separators. A message
   before the first user message (e.g. a leading ``AIMessage``) therefore opens a round
   of its own, as in the official code.
4. Rounds are taken newest first within ``max_input - len(system ids)``: the newest
   round is always kept, even when it alone is over budget; the walk stops at the first
   round that does not fit, and once the history fills the budget.
5. ``ids = system + history``, then ``assistant_token_id`` unless the last message is
   an assistant message (the model then continues that message), then only the last
   ``max_input`` ids are kept. That cut can remove the start of the system prompt, or
   of an over-long newest round; :attr:`ChatPrompt.truncated` reports it and the
   caller decides whether to warn or raise.

Rules for what the official code leaves undefined (it asserts a system message can
only come first and knows only role/content dicts):

- Several leading system messages are joined with ``"\n"`` into one system text.
- A system message after the first non-system message becomes a user turn
  (``[user_token_id] + encode(text)``, opening a round like any user message):
  Baichuan2 has no system token, and a user turn keeps the instruction in front of the
  model where it was placed.
- ``HumanMessage`` and ``ChatMessage`` roles ``"user"``/``"human"`` are user;
  ``AIMessage`` and roles ``"assistant"``/``"ai"`` are assistant; ``SystemMessage``
  and role ``"system"`` are system. A ``ToolMessage`` is a user turn and an
  ``AIMessage``'s ``tool_calls`` follow its text, both written by the tool protocol
  of ``tools.py``. Any other ``ChatMessage`` role, function messages, and other
  message types raise ``ValueError``.
- A user message with a ``name`` is rendered as ``"{name}: {text}"`` so the model can
  tell speakers apart; names on assistant and system messages are ignored, because a
  prefixed assistant turn would teach the model to start its replies with a name.
- List content: plain strings and ``{"type": "text"}`` blocks are joined with ``""``
  (the blocks of one message are pieces of one text); any other block raises
  ``ValueError`` naming its type; an ``AIMessage``'s ``tool_use`` blocks are skipped
  because its ``tool_calls`` are rendered instead.
- An empty message list raises ``ValueError``.
- Message text is always text: ``ChatBaichuan2`` encodes it with
  :class:`LiteralTextEncoder`, so ``<reserved_106>``, ``</s>`` and the like typed in a
  message (or a tool result, a name, a tool schema) never become control tokens; the
  official behaviour, where they do, is ``parse_special_tokens=True``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_baichuan2.tools import (
    conversation_language,
    json_system_text,
    render_tool_call,
    render_tool_result,
    tools_system_text,
)

if TYPE_CHECKING:
    from transformers import GenerationConfig

Role = Literal["system", "user", "assistant"]

# Baichuan2's role tokens <reserved_106> and <reserved_107>, used when a checkpoint's
# generation config does not name its own.
DEFAULT_USER_TOKEN_ID = 195
DEFAULT_ASSISTANT_TOKEN_ID = 196
# </s>, used when neither the generation config nor the tokenizer names an eos.
DEFAULT_EOS_TOKEN_ID = 2

# Content blocks that restate an AI message's tool calls (Anthropic / v1 formats).
_TOOL_CALL_BLOCKS = ("tool_use", "tool_call", "function_call")

_CHAT_MESSAGE_ROLES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
}


class Encoder(Protocol):
    """Text to token ids; ``BaichuanTokenizer`` and every transformers tokenizer fit.

    It is always called as ``encode(text, add_special_tokens=False)``: the official
    prompt has no BOS/EOS, and a transformers tokenizer configured to add them would
    otherwise put them around every message.
    """

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Returns the ids of ``text``, with BOS/EOS only if ``add_special_tokens``."""
        ...


class VocabularyEncoder(Encoder, Protocol):
    """An ``Encoder`` that can also list its vocabulary (``BaichuanTokenizer`` does)."""

    def get_vocab(self) -> dict[str, int]:
        """Piece to id."""
        ...


# Pieces that are control tokens, not text: <unk>, <s>, </s> and the reserved pieces,
# among them Baichuan2's role tokens <reserved_106> (user) and <reserved_107>.
_CONTROL_PIECE = re.compile(r"<unk>|<s>|</s>|<reserved_\d+>")


class LiteralTextEncoder:
    """Encodes text so that no part of it ever becomes a control token.

    The tokenizer, exactly like the official one, turns ``<s>``, ``</s>``, ``<unk>`` and
    ``<reserved_N>`` written in text into their ids, so typed text could open a fake
    user or assistant turn. Here each such string is encoded as text instead: its
    ``<`` apart from the rest, which no control piece matches. All other text is
    encoded exactly as the tokenizer does. Cheap to build: the vocabulary is scanned
    once per tokenizer.

    Example:
        ```python
        encoder = LiteralTextEncoder(tokenizer)
        encoder.encode("<reserved_106>", add_special_tokens=False)  # no 195 in it
        ```
    """

    def __init__(self, tokenizer: VocabularyEncoder) -> None:
        self.tokenizer = tokenizer
        self._controls = _control_pattern(tokenizer)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Returns the ids of ``text``; control-token strings in it become text ids."""
        if self._controls is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids: list[int] = []
        position = 0
        for match in self._controls.finditer(text):
            for part in (text[position : match.start()], "<", match.group()[1:]):
                if part:
                    ids.extend(self.tokenizer.encode(part, add_special_tokens=False))
            position = match.end()
        if position < len(text):
            ids.extend(self.tokenizer.encode(text[position:], add_special_tokens=False))
        return ids


# Per tokenizer, the pattern of its control pieces. The values must not refer to their
# key: a value that did would keep its tokenizer (and every model that shares it)
# alive for as long as the process runs.
_control_patterns: weakref.WeakKeyDictionary[VocabularyEncoder, re.Pattern[str] | None] = (
    weakref.WeakKeyDictionary()
)


def _control_pattern(tokenizer: VocabularyEncoder) -> re.Pattern[str] | None:
    """The pattern matching ``tokenizer``'s control pieces, longest first (None: none)."""
    if tokenizer not in _control_patterns:
        controls = sorted(
            (piece for piece in tokenizer.get_vocab() if _CONTROL_PIECE.fullmatch(piece)),
            key=len,
            reverse=True,
        )
        pattern = re.compile("|".join(map(re.escape, controls))) if controls else None
        _control_patterns[tokenizer] = pattern
    return _control_patterns[tokenizer]


def literal_text_encoder(tokenizer: VocabularyEncoder) -> LiteralTextEncoder:
    """The ``LiteralTextEncoder`` of ``tokenizer`` (its vocabulary scanned once)."""
    return LiteralTextEncoder(tokenizer)


def _setting(generation_config: GenerationConfig | Mapping[str, Any] | None, name: str) -> Any:
    """One value of a generation config given as an object, a dict or None."""
    if generation_config is None:
        return None
    if isinstance(generation_config, Mapping):
        return generation_config.get(name)
    return getattr(generation_config, name, None)


def role_token_ids(
    generation_config: GenerationConfig | Mapping[str, Any] | None,
) -> tuple[int, int]:
    """The ids that open a user and an assistant turn.

    Args:
        generation_config: The checkpoint's generation config (transformers'
            ``GenerationConfig``, its dict as vLLM reads it, or None).

    Returns:
        ``(user_token_id, assistant_token_id)`` as the config names them, else 195
        and 196 (Baichuan2's ``<reserved_106>`` and ``<reserved_107>``).
    """
    user = _setting(generation_config, "user_token_id")
    assistant = _setting(generation_config, "assistant_token_id")
    return (
        DEFAULT_USER_TOKEN_ID if user is None else int(user),
        DEFAULT_ASSISTANT_TOKEN_ID if assistant is None else int(assistant),
    )


def eos_token_ids(
    generation_config: GenerationConfig | Mapping[str, Any] | None,
    tokenizer: Any = None,
) -> list[int]:
    """The ids that end an answer, the checkpoint's first.

    Args:
        generation_config: The checkpoint's generation config (as for
            :func:`role_token_ids`), or None when only the tokenizer is at hand.
        tokenizer: The checkpoint's tokenizer, or None.

    Returns:
        The config's ``eos_token_id`` (one id or a list, in its order, without
        repeats), else the tokenizer's ``eos_token_id``, else ``[2]`` (``</s>``). The
        first id is the one to write where a single eos is needed (e.g. the text of
        an empty input).
    """
    for eos in (
        _setting(generation_config, "eos_token_id"),
        getattr(tokenizer, "eos_token_id", None),
    ):
        ids = [] if eos is None else eos if isinstance(eos, Sequence) else [eos]
        if ids:
            return list(dict.fromkeys(int(i) for i in ids))
    return [DEFAULT_EOS_TOKEN_ID]


@dataclass(frozen=True)
class ChatPrompt:
    """A Baichuan2 chat prompt and what truncation did to it."""

    input_ids: list[int]
    """The prompt ids, at most ``model_max_length - max_new_tokens`` long."""
    dropped_rounds: int
    """How many of the oldest rounds were left out to fit the budget."""
    truncated: bool
    """True when the final left cut removed ids (of the system prompt or newest round)."""


def message_text(message: BaseMessage) -> str:
    """Returns the text of a message's content, a string or a list of text blocks.

    Args:
        message: Any LangChain message.

    Returns:
        The content itself if it is a string, else its text blocks joined with ``""``.
        An AI message's ``tool_use``/``tool_call`` blocks are skipped: they repeat its
        ``tool_calls``, which are rendered from that field.

    Raises:
        ValueError: If the content holds a block that is not text (e.g. an image).
    """
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block["text"])
        elif isinstance(message, AIMessage) and block.get("type") in _TOOL_CALL_BLOCKS:
            continue
        else:
            msg = (
                "ChatBaichuan2 accepts text only; "
                f"got a content block of type {block.get('type')!r}"
            )
            raise ValueError(msg)
    return "".join(parts)


def message_role_and_text(message: BaseMessage) -> tuple[Role, str]:
    """Returns the Baichuan2 role of a message and the text its turn renders.

    Args:
        message: A human, AI, system or chat message.

    Returns:
        The role and the text; a user message's ``name`` prefixes it as ``"name: "``.

    Raises:
        ValueError: For tool, function and unknown messages, an unknown ``ChatMessage``
            role, or non-text content.
    """
    role: Role
    if isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, ChatMessage):
        if message.role not in _CHAT_MESSAGE_ROLES:
            msg = (
                f"ChatMessage role {message.role!r} is not supported; "
                f"use one of {sorted(_CHAT_MESSAGE_ROLES)}"
            )
            raise ValueError(msg)
        role = _CHAT_MESSAGE_ROLES[message.role]
    elif isinstance(message, ToolMessage):
        # Baichuan2 has no tool role: a result is a user turn (see tools.py).
        return "user", render_tool_result(message)
    elif isinstance(message, FunctionMessage):
        msg = "FunctionMessage is not supported; use ToolMessage for tool results"
        raise ValueError(msg)
    else:
        msg = (
            f"Unsupported message type {type(message).__name__}; "
            "use HumanMessage, AIMessage, SystemMessage or ChatMessage"
        )
        raise ValueError(msg)
    text = message_text(message)
    if role == "user" and message.name:
        text = f"{message.name}: {text}"
    if isinstance(message, AIMessage):
        text += "".join(render_tool_call(c["name"], c["args"]) for c in message.tool_calls)
    return role, text


def _system_and_rounds(
    turns: Sequence[tuple[Role, str]],
) -> tuple[str, list[list[tuple[Role, str]]]]:
    """Splits turns into the leading system text and rounds that start at user turns."""
    leading = 0
    while leading < len(turns) and turns[leading][0] == "system":
        leading += 1
    system = "\n".join(text for _, text in turns[:leading])
    rounds: list[list[tuple[Role, str]]] = []
    for role, text in turns[leading:]:
        # Baichuan2 has no system token mid-conversation; see the module docstring.
        turn_role: Role = "user" if role == "system" else role
        if turn_role == "user" or not rounds:
            rounds.append([])
        rounds[-1].append((turn_role, text))
    return system, rounds


def render(
    messages: Sequence[BaseMessage],
    encoder: Encoder,
    generation_config: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: object = "auto",
    response_format: Mapping[str, Any] | None = None,
    model_max_length: int | None = None,
    max_new_tokens: int = 0,
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Builds the prompt ids of a conversation as the official ``build_chat_input`` does.

    The one way to a Baichuan2 chat prompt (``ChatBaichuan2`` calls and token counts,
    the vLLM server's chat renderer). The protocol's system text goes first: the JSON
    request's when ``response_format`` is given, else the tools' when ``tools`` are
    given and ``tool_choice`` is not ``"none"`` (see ``tools.py``), in the language of
    ``messages``. The rest is the module docstring's algorithm.

    Args:
        messages: The conversation, oldest first.
        encoder: Encodes each message's text (see :class:`Encoder`); pass a
            :class:`LiteralTextEncoder` so that typed control-token strings stay text.
        generation_config: The checkpoint's generation config, for the role ids
            (see :func:`role_token_ids`); None uses 195 and 196.
        tools: OpenAI function tools (``{"type": "function", "function": {"name",
            "description", "parameters"}}``) the model may call.
        tool_choice: Anything but ``"none"`` describes ``tools`` in the prompt.
        response_format: ``{"schema": <JSON schema or None>}`` asks for one JSON object
            (matching the schema when there is one) instead of tools.
        model_max_length: The model's context length (4096 for Baichuan2); None keeps
            every round (no truncation).
        max_new_tokens: Tokens reserved for the reply within ``model_max_length``.
        add_generation_prompt: End with the assistant token (unless the last message
            is the assistant's, which the model then continues).

    Returns:
        The prompt ids, with how many old rounds were dropped and whether the final
        left cut removed anything.

    Raises:
        ValueError: If ``messages`` is empty, ``max_new_tokens`` leaves no room for
            the prompt, or a message cannot be rendered (see the module docstring).
    """
    max_input = None if model_max_length is None else model_max_length - max_new_tokens
    if max_input is not None and max_input <= 0:
        msg = (
            f"max_tokens ({max_new_tokens}) leaves no room for the prompt in "
            f"model_max_length ({model_max_length})"
        )
        raise ValueError(msg)
    if not messages:
        raise ValueError("messages is empty: a chat prompt needs at least one message")

    system = _protocol_text(messages, tools, tool_choice, response_format)
    turns = [message_role_and_text(message) for message in messages]
    if system is not None:
        turns.insert(0, ("system", system))
    system, rounds = _system_and_rounds(turns)
    user_token_id, assistant_token_id = role_token_ids(generation_config)
    system_ids = encoder.encode(system, add_special_tokens=False) if system else []
    budget = None if max_input is None else max_input - len(system_ids)

    # Newest first and encoded lazily, so older rounds are never tokenized once one
    # does not fit. The official "stop once the history fills the budget" needs no
    # test of its own: every round has at least its role token, so none fits then.
    kept: list[list[int]] = []
    history_len = 0
    for round_ in reversed(rounds):
        round_ids: list[int] = []
        for role, text in round_:
            round_ids.append(user_token_id if role == "user" else assistant_token_id)
            round_ids.extend(encoder.encode(text, add_special_tokens=False))
        if kept and budget is not None and history_len + len(round_ids) > budget:
            break
        kept.append(round_ids)
        history_len += len(round_ids)

    ids = list(system_ids)
    for round_ids in reversed(kept):
        ids.extend(round_ids)
    if add_generation_prompt and turns[-1][0] != "assistant":
        ids.append(assistant_token_id)
    truncated = max_input is not None and len(ids) > max_input
    return ChatPrompt(
        input_ids=ids[-max_input:] if truncated and max_input is not None else ids,
        dropped_rounds=len(rounds) - len(kept),
        truncated=truncated,
    )


def _protocol_text(
    messages: Sequence[BaseMessage],
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: object,
    response_format: Mapping[str, Any] | None,
) -> str | None:
    """The system text that opens the prompt for structured output or tools, or None."""
    if response_format is not None:
        return json_system_text(response_format.get("schema"), conversation_language(messages))
    if tools and tool_choice != "none":
        return tools_system_text([dict(t) for t in tools], conversation_language(messages))
    return None
