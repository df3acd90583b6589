r"""LangChain messages to Baichuan2 prompt ids, exactly as the official ``build_chat_input``.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_baichuan2.tools import render_tool_call, render_tool_result

Role = Literal["system", "user", "assistant"]

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
    encoded exactly as the tokenizer does.

    Example:
        ```python
        encoder = LiteralTextEncoder(tokenizer)
        encoder.encode("<reserved_106>", add_special_tokens=False)  # no 195 in it
        ```
    """

    def __init__(self, tokenizer: VocabularyEncoder) -> None:
        self.tokenizer = tokenizer
        controls = sorted(
            (piece for piece in tokenizer.get_vocab() if _CONTROL_PIECE.fullmatch(piece)),
            key=len,
            reverse=True,
        )
        self._controls = re.compile("|".join(map(re.escape, controls))) if controls else None

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


_literal_encoders: weakref.WeakKeyDictionary[VocabularyEncoder, LiteralTextEncoder] = (
    weakref.WeakKeyDictionary()
)


def literal_text_encoder(tokenizer: VocabularyEncoder) -> LiteralTextEncoder:
    """The ``LiteralTextEncoder`` of ``tokenizer`` (built once per tokenizer)."""
    encoder = _literal_encoders.get(tokenizer)
    if encoder is None:
        encoder = _literal_encoders[tokenizer] = LiteralTextEncoder(tokenizer)
    return encoder


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


def build_chat_prompt(
    messages: Sequence[BaseMessage],
    tokenizer: Encoder,
    *,
    model_max_length: int,
    max_new_tokens: int,
    user_token_id: int = 195,
    assistant_token_id: int = 196,
) -> ChatPrompt:
    """Builds the prompt ids of a conversation as the official ``build_chat_input`` does.

    Args:
        messages: The conversation, oldest first.
        tokenizer: Encodes each message's text (see :class:`Encoder`).
        model_max_length: The model's context length (4096 for Baichuan2).
        max_new_tokens: Tokens reserved for the reply.
        user_token_id: The token that opens a user turn.
        assistant_token_id: The token that opens an assistant turn.

    Returns:
        The prompt ids, with how many old rounds were dropped and whether the final
        left cut removed anything.

    Raises:
        ValueError: If ``messages`` is empty, ``max_new_tokens`` leaves no room for
            the prompt, or a message cannot be rendered (see the module docstring).
    """
    max_input = model_max_length - max_new_tokens
    if max_input <= 0:
        msg = (
            f"max_tokens ({max_new_tokens}) leaves no room for the prompt in "
            f"model_max_length ({model_max_length})"
        )
        raise ValueError(msg)
    if not messages:
        raise ValueError("messages is empty: a chat prompt needs at least one message")

    turns = [message_role_and_text(message) for message in messages]
    system, rounds = _system_and_rounds(turns)
    system_ids = tokenizer.encode(system, add_special_tokens=False) if system else []
    budget = max_input - len(system_ids)

    # Newest first and encoded lazily, so older rounds are never tokenized once one
    # does not fit. The official "stop once the history fills the budget" needs no
    # test of its own: every round has at least its role token, so none fits then.
    kept: list[list[int]] = []
    history_len = 0
    for round_ in reversed(rounds):
        round_ids: list[int] = []
        for role, text in round_:
            round_ids.append(user_token_id if role == "user" else assistant_token_id)
            round_ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if kept and history_len + len(round_ids) > budget:
            break
        kept.append(round_ids)
        history_len += len(round_ids)

    ids = list(system_ids)
    for round_ids in reversed(kept):
        ids.extend(round_ids)
    if turns[-1][0] != "assistant":
        ids.append(assistant_token_id)
    return ChatPrompt(
        input_ids=ids[-max_input:],
        dropped_rounds=len(rounds) - len(kept),
        truncated=len(ids) > max_input,
    )
