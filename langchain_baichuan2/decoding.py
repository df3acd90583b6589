"""Streaming detokenization and stop-string matching, each O(new input) per step."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langchain_baichuan2.modeling.tokenization import BaichuanTokenizer

SENTENCEPIECE_UTF8_ERRORS = "langchain_baichuan2.sentencepiece_replace"
"""Name of the codec error handler that replaces invalid UTF-8 as SentencePiece does."""


def _replace_one_byte(error: UnicodeError) -> tuple[str, int]:
    r"""Replaces the first bad byte with U+FFFD and resumes right after it.

    SentencePiece writes one U+FFFD per byte it cannot decode (``b"\xe4\xb8"`` gives
    two), where Python's ``"replace"`` writes one per maximal bad subsequence.
    """
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd", error.start + 1


codecs.register_error(SENTENCEPIECE_UTF8_ERRORS, _replace_one_byte)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas without splitting characters.

    After each ``push``, the joined deltas equal ``tokenizer.decode(ids so far)`` up to
    an unfinished UTF-8 character at the end, which is held back rather than shown
    as U+FFFD; after ``flush`` they equal the full decode exactly. Each push costs
    O(new tokens): ids map to bytes through the tokenizer's table and feed one
    incremental UTF-8 decoder.

    Example:
        ```python
        decoder = IncrementalDecoder(tokenizer)
        decoder.push([1317])  # "" : the first byte of a three-byte character
        decoder.push([1273, 1262])  # "中", its other two bytes
        decoder.flush()  # ""
        ```
    """

    def __init__(self, tokenizer: BaichuanTokenizer, skip_special_tokens: bool = True) -> None:
        """Starts an empty stream.

        Args:
            tokenizer: Tokenizer whose ``decode`` the deltas reproduce.
            skip_special_tokens: Drop special tokens (ids 0, 1, 2) as ``decode`` does.
        """
        self._bytes = tokenizer.token_bytes(skip_special_tokens)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=SENTENCEPIECE_UTF8_ERRORS)

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds token ids and returns the text they complete.

        Args:
            token_ids: The new ids, in order.

        Returns:
            The new text; empty while a character is still incomplete.
        """
        table = self._bytes
        return self._utf8.decode(b"".join([table[i] for i in token_ids]))

    def flush(self) -> str:
        """Ends the stream and returns what was held back (U+FFFD per unfinished byte).

        Returns:
            The remaining text; the decoder is then empty again.
        """
        return self._utf8.decode(b"", final=True)


class StopStringMatcher:
    """Holds back streamed text that may still become a stop string.

    A stop string may arrive split across any number of pushes. Text is released
    only once it can no longer be part of a stop string, so nothing released is ever
    taken back. The stream stops at the first stop string to complete (for stops
    ending at the same place, the one starting first); this is independent of how the
    text is cut into pushes. An Aho-Corasick automaton over the stop strings carries
    the state between pushes, so a push costs O(its text + the longest stop string).

    Example:
        ```python
        matcher = StopStringMatcher(["Observation:"])
        matcher.push("The answer. Obs")  # ("The answer. ", False)
        matcher.push("ervation: 42")  # ("", True)
        ```
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """Builds the matcher.

        Args:
            stops: The stop strings; each must be non-empty.

        Raises:
            TypeError: If ``stops`` is a single string rather than a sequence of them.
            ValueError: If a stop string is empty.
        """
        if isinstance(stops, str):
            msg = f"stops must be a sequence of strings, got the string {stops!r}"
            raise TypeError(msg)
        for stop in stops:
            if not stop:
                msg = f"stop strings must be non-empty, got {list(stops)!r}"
                raise ValueError(msg)
        # Node 0 is the root; node n stands for the stop-string prefix _prefix[n].
        self._goto: list[dict[str, int]] = [{}]
        self._prefix: list[str] = [""]
        self._terminal: list[bool] = [False]
        for stop in stops:
            node = 0
            for char in stop:
                child = self._goto[node].get(char)
                if child is None:
                    child = len(self._goto)
                    self._goto[node][char] = child
                    self._goto.append({})
                    self._prefix.append(self._prefix[node] + char)
                    self._terminal.append(False)
                node = child
            self._terminal[node] = True
        self._build_links()
        self._state = 0
        self._stopped = False

    def _build_links(self) -> None:
        """Computes failure links and, per node, the longest stop string it ends with."""
        self._fail = [0] * len(self._goto)
        # Node whose prefix is the longest stop string that is a suffix of this node's
        # prefix, or 0 for none.
        self._match = [0] * len(self._goto)
        queue = list(self._goto[0].values())
        for node in queue:
            fail = self._fail[node]
            self._match[node] = node if self._terminal[node] else self._match[fail]
            for char, child in self._goto[node].items():
                self._fail[child] = self._step(fail, char)
                queue.append(child)

    def _step(self, node: int, char: str) -> int:
        """Returns the node reached from ``node`` by reading ``char``."""
        while True:
            child = self._goto[node].get(char)
            if child is not None:
                return child
            if node == 0:
                return 0
            node = self._fail[node]

    def push(self, text: str) -> tuple[str, bool]:
        """Adds streamed text.

        Args:
            text: The new text.

        Returns:
            The text safe to emit now, and whether a stop string has completed; once
            stopped, the text is what came before the stop string and later pushes
            return ``("", True)``.
        """
        if self._stopped:
            return "", True
        held = self._prefix[self._state]
        state = self._state
        for i, char in enumerate(text):
            state = self._step(state, char)
            match = self._match[state]
            if match:
                self._stopped = True
                self._state = 0
                buffer = held + text[: i + 1]
                return buffer[: len(buffer) - len(self._prefix[match])], True
        self._state = state
        buffer = held + text
        return buffer[: len(buffer) - len(self._prefix[state])], False

    def flush(self) -> str:
        """Returns the held-back text at the end of a stream that did not stop.

        Returns:
            The text held back as a possible stop-string start; empty after a stop.
        """
        held = "" if self._stopped else self._prefix[self._state]
        self._state = 0
        return held


__all__ = ["SENTENCEPIECE_UTF8_ERRORS", "IncrementalDecoder", "StopStringMatcher"]
