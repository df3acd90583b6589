"""What the native engine accepts in a request: extra arguments and token ids.

The checks run before a request is queued, so a bad value fails its own call and
never a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers.generation.logits_process import (
    LogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
)

from langchain_baichuan2.engines.settings import NATIVE_LIMITS, SamplingParams

# Extra generate() arguments the engine applies as transformers' own processors, built
# from (value, eos ids). They read each row's ids; ``min_new_tokens`` and
# ``suppress_tokens`` are applied directly on the device instead (same rule, no ids).
PROCESSORS: dict[str, Callable[[Any, set[int]], LogitsProcessor]] = {
    "no_repeat_ngram_size": lambda v, eos: NoRepeatNGramLogitsProcessor(int(v)),
    "bad_words_ids": lambda v, eos: NoBadWordsLogitsProcessor([list(w) for w in v], sorted(eos)),
}
EXTRA_ARGUMENTS = NATIVE_LIMITS.extra_arguments  # declared with the backend's limits


def check_extra_arguments(extra: Sequence[tuple[str, Any]]) -> None:
    """Reject ``generate()`` arguments the native engine does not apply."""
    NATIVE_LIMITS.check(None, extra)


def check_request(params: SamplingParams, vocab_size: int) -> None:
    """Every check a request's settings pass before it is queued."""
    NATIVE_LIMITS.check_request(params, vocab_size)
