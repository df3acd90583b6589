"""From engine chunks to LangChain messages: text, tool calls, usage and metadata."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import cast

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import (
    InvalidToolCall,
    ToolCallChunk,
    invalid_tool_call,
    tool_call_chunk,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_baichuan2.engines import Engine, GenerationChunk, SamplingParams
from langchain_baichuan2.prompt import ChatPrompt
from langchain_baichuan2.tools import ToolCallTextFilter, parse_tool_calls


def usage(final: GenerationChunk) -> UsageMetadata:
    """Token counts of one call, measured from the ids (``cache_read``: reused prefix)."""
    return UsageMetadata(
        input_tokens=final.prompt_tokens,
        output_tokens=final.completion_tokens,
        total_tokens=final.prompt_tokens + final.completion_tokens,
        input_token_details={"cache_read": final.cached_prompt_tokens},
    )


def response_metadata(final: GenerationChunk, model_name: str, prompt: ChatPrompt) -> dict:
    """Finish reason, timings and truncation facts of one call."""
    seconds = final.generation_seconds
    return {
        "model_name": model_name,
        "model_provider": "baichuan2",
        "finish_reason": final.finish_reason,
        "prompt_seconds": final.prompt_seconds,
        "generation_seconds": seconds,
        # Only the tokens actually prefilled: a reused prefix took no time.
        "prompt_tokens_per_second": (final.prompt_tokens - final.cached_prompt_tokens)
        / final.prompt_seconds
        if final.prompt_seconds
        else None,
        "tokens_per_second": final.completion_tokens / seconds if seconds else None,
        "dropped_rounds": prompt.dropped_rounds,
        "prompt_truncated": prompt.truncated,
    }


@dataclass
class Call:
    """Everything one call resolved before generating."""

    engine: Engine
    prompt: ChatPrompt
    params: SamplingParams
    model_name: str
    parse_tools: bool


def require_a_valid_call(message: AIMessage) -> AIMessage:
    """Pass ``message`` on if it holds a tool call; raise naming why the call failed."""
    if not message.tool_calls and message.invalid_tool_calls:
        msg = f"The tool call is invalid: {message.invalid_tool_calls[0].get('error')}"
        raise OutputParserException(msg, llm_output=str(message.invalid_tool_calls[0]["args"]))
    return message


class ChunkConverter:
    """Turns one call's engine chunks into LangChain chunks.

    With tools bound, tool-call markup is kept out of the content and the calls are
    parsed at the end into ``tool_call_chunks`` (finish reason ``"tool_calls"``).
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.text_filter = ToolCallTextFilter() if call.parse_tools else None
        self.raw: list[str] = []

    def convert(self, piece: GenerationChunk) -> ChatGenerationChunk | None:
        """The LangChain chunk for ``piece``, or None when it has nothing to show yet."""
        tool_chunks: list[ToolCallChunk] = []
        invalid: list[InvalidToolCall] = []
        if self.text_filter is not None:
            self.raw.append(piece.text)
            piece.text = self.text_filter.push(piece.text)
            if piece.finish_reason is None and not piece.text:
                return None
            if piece.finish_reason is not None:
                held = self.text_filter.flush()
                tool_chunks, invalid = self._tool_call_chunks()
                if not self._forced_call_cut_short(tool_chunks, invalid):
                    piece.text += held
                else:  # the start of a forced call: the output is nothing but that call
                    invalid = [self._cut_call(piece.finish_reason)]
                if tool_chunks:
                    piece.finish_reason = "tool_calls"
        if piece.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
        # Unparsable calls go straight to invalid_tool_calls: as chunks, partial-JSON
        # repair would turn them into (wrong) valid calls.
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=piece.text,
                tool_call_chunks=tool_chunks,
                invalid_tool_calls=invalid,
                usage_metadata=usage(piece),
                response_metadata=response_metadata(piece, self.call.model_name, self.call.prompt),
                chunk_position="last",
            ),
            generation_info={"finish_reason": piece.finish_reason},
        )

    def _forced_call_cut_short(
        self, calls: list[ToolCallChunk], invalid: list[InvalidToolCall]
    ) -> bool:
        """Whether a forced call ended before even its ``<tool_call>`` was complete."""
        constraint = self.call.params.constraint
        forced = (
            constraint is not None and constraint.kind == "tools" and constraint.choice != "auto"
        )
        return forced and not calls and not invalid

    def _cut_call(self, finish: str) -> InvalidToolCall:
        """The unfinished start of a forced call, as an invalid call saying why."""
        return invalid_tool_call(
            name=None,
            args="".join(self.raw),
            id=f"call_{uuid.uuid4().hex[:24]}",
            error=f"the forced tool call was cut off before it began (finish_reason={finish!r})",
        )

    def _tool_call_chunks(self) -> tuple[list[ToolCallChunk], list[InvalidToolCall]]:
        """Parse the whole output into valid calls (as chunks) and invalid ones."""
        parsed = parse_tool_calls("".join(self.raw))
        chunks = [
            tool_call_chunk(
                name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"], index=i
            )
            for i, c in enumerate(parsed.tool_calls)
        ]
        return chunks, parsed.invalid_tool_calls


def chat_result(chunks: list[ChatGenerationChunk]) -> ChatResult:
    """Join streamed chunks into the single message ``invoke`` returns."""
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    message = cast(AIMessageChunk, merged.message)
    result = AIMessage(
        content=message.content,
        tool_calls=message.tool_calls,
        # Merging chunks drops the parse errors; the final chunk holds them.
        invalid_tool_calls=cast(AIMessageChunk, chunks[-1].message).invalid_tool_calls,
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
        id=message.id,
    )
    return ChatResult(
        generations=[ChatGeneration(message=result, generation_info=merged.generation_info)]
    )
