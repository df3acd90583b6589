"""Grammar-constrained decoding with xgrammar: tokenizer info, compiled-grammar cache.

A backend-neutral ``Constraint`` becomes an xgrammar ``Grammar`` here; the native
engine compiles it against the tokenizer info (built once per tokenizer, from its
SentencePiece pieces) and runs one ``GrammarMatcher`` per request, masking each step's
logits; the vLLM engine hands the same grammar to vLLM as EBNF text.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
import xgrammar as xgr

from langchain_baichuan2.tools import (
    TOOL_CALL_OPEN,
    TOOL_CALL_SUFFIX,
    Constraint,
    tool_call_prefix,
)

# Control pieces that decode to nothing visible; an empty piece marks them special for
# xgrammar, so a grammar can never produce them as text.
_CONTROL_IDS = (0, 1, 2)


def tokenizer_info(
    tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]
) -> xgr.TokenizerInfo:
    """The Baichuan2 vocabulary as xgrammar sees it.

    Byte-fallback pieces, ``▁`` for spaces, no prefix space (Baichuan2 has no dummy
    prefix), and the control pieces ``<unk>``, ``<s>``, ``</s>`` marked special, so
    a grammar can never produce them as text. ``eos_token_ids`` (from
    :func:`~langchain_baichuan2.prompt.eos_token_ids`) may each end a finished grammar.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for i in _CONTROL_IDS:
        pieces[i] = ""
    return xgr.TokenizerInfo(
        pieces,
        xgr.VocabType.BYTE_FALLBACK,
        vocab_size=vocab_size,
        stop_token_ids=list(eos_token_ids),
        add_prefix_space=False,
    )


def build_grammar(constraint: Constraint) -> xgr.Grammar:
    """The grammar of ``constraint`` (uncompiled: each backend compiles it its own way).

    JSON is compact (``json.dumps`` spacing, no other whitespace). A forced tool call is
    the call prefix, the arguments valid against the tool's schema, and the suffix;
    ``choice="auto"`` allows free text in which a call starts at ``<tool_call>``.
    """
    if constraint.kind == "json":
        return _json_grammar(constraint.schema)
    tools = list(constraint.tools)
    if constraint.choice == "auto":
        return xgr.Grammar.from_structural_tag(json.dumps(tool_call_structural_tag(tools)))
    calls = [
        xgr.Grammar.concat(
            _literal(tool_call_prefix(t["function"]["name"])),
            _json_grammar(t["function"].get("parameters")),
            _literal(TOOL_CALL_SUFFIX),
        )
        for t in tools
        if constraint.choice in ("required", t["function"]["name"])
    ]
    return calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)


class GrammarCompiler:
    """Compiles grammars for one tokenizer and vocabulary size; keeps the recent ones.

    Different constraints compile in parallel; callers asking for the same one wait
    for a single compile. The ``CACHE_SIZE`` most recently used grammars are kept.
    """

    CACHE_SIZE = 64

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.info = tokenizer_info(tokenizer, vocab_size, eos_token_ids)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._compiling: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()  # guards the two dicts, never held while compiling

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar of ``constraint`` (compiled once while it stays cached)."""
        key = json.dumps(asdict(constraint), sort_keys=True)
        while True:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
                key_lock = self._compiling.setdefault(key, threading.Lock())
            with key_lock:
                with self._lock:
                    if key in self._cache or self._compiling.get(key) is not key_lock:
                        continue  # compiled meanwhile: take it from the cache
                try:
                    grammar = self._compiler.compile_grammar(build_grammar(constraint))
                except BaseException:
                    with self._lock:
                        del self._compiling[key]
                    raise
                with self._lock:
                    self._cache[key] = grammar
                    del self._compiling[key]
                    while len(self._cache) > self.CACHE_SIZE:
                        self._cache.popitem(last=False)
                return grammar


def _literal(text: str) -> xgr.Grammar:
    """A grammar matching exactly ``text``."""
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")


def _json_grammar(schema: dict[str, Any] | None) -> xgr.Grammar:
    """Compact JSON valid against ``schema`` (an object when there is none)."""
    return xgr.Grammar.from_json_schema(
        json.dumps(schema or {"type": "object"}),
        any_whitespace=False,
        separators=(", ", ": "),
    )


def bound_lengths(schema: Any, max_length: int | None) -> Any:
    """Copy ``schema`` with length bounds on strings, arrays and numbers that have none.

    Small or untrained models can ramble inside a JSON string, array or number
    forever; a bound makes every constrained output finish. Strings get a ``pattern``
    of at most ``max_length`` characters that are neither control characters, quotes
    nor backslashes (xgrammar's ``maxLength`` rule lets raw control characters
    through, which is not valid JSON); arrays get ``maxItems``; integers and numbers
    get ``minimum``/``maximum`` of ``max_length`` digits (which also bounds a number's
    fraction digits). None returns ``schema``.
    """
    if max_length is None:
        return schema
    if isinstance(schema, list):
        return [bound_lengths(item, max_length) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bound_lengths(value, max_length) for key, value in schema.items()}
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "string" in types and not _STRING_CONSTRAINTS & schema.keys():
        bounded["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{0,{max_length}}}$'
    if "array" in types and "maxItems" not in schema:
        bounded["maxItems"] = max_length
    if ("integer" in types or "number" in types) and not _NUMBER_BOUNDS & schema.keys():
        bounded["minimum"], bounded["maximum"] = -(10**max_length - 1), 10**max_length - 1
    return bounded


_STRING_CONSTRAINTS = {"maxLength", "pattern", "format", "enum", "const"}
_NUMBER_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const"}


def tool_call_structural_tag(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The xgrammar structural tag of ``tool_choice="auto"``: text, or calls."""
    tags = [
        {
            "type": "tag",
            "begin": tool_call_prefix(t["function"]["name"]),
            "content": {
                "type": "json_schema",
                "json_schema": t["function"].get("parameters") or {"type": "object"},
                "max_whitespace_cnt": 1,
            },
            "end": TOOL_CALL_SUFFIX,
        }
        for t in tools
    ]
    return {
        "type": "structural_tag",
        "format": {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": tags},
    }


class GrammarMask:
    """Per-request grammar state: masks logits and follows the chosen tokens."""

    def __init__(
        self, grammar: xgr.CompiledGrammar, vocab_size: int, device: torch.device | None = None
    ) -> None:
        self.matcher = xgr.GrammarMatcher(grammar)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        if device is not None and device.type == "cuda":
            # Pinned, so the copy to the GPU is queued without waiting for running work.
            self.bitmask = self.bitmask.pin_memory()

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids to -inf, in place (``[1, V]``)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        mask = self.bitmask.to(logits.device, non_blocking=self.bitmask.is_pinned())
        xgr.apply_token_bitmask_inplace(logits, mask)

    def accept(self, token: int) -> bool:
        """Advance the grammar past ``token``; False if the grammar does not allow it."""
        if self.matcher.is_terminated():
            return True  # only the stop token was allowed, and it ends the request
        return bool(self.matcher.accept_token(token))
