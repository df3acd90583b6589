"""Choosing the next token of every running row, on the model's device.

The rows' settings live in tensors built when a row joins or leaves the batch, so a
step transfers nothing to the device and reads back one small tensor: the tokens with
two failure flags per row. Greedy rows take the argmax. Sampled rows follow
transformers' order (repetition penalty, temperature, top-k, top-p): top-k keeps the
logits at or above the k-th largest (a ``topk`` pivot, no full sort), top-p keeps the
smallest set of the sorted candidates whose mass reaches p, and the token is drawn by
an exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``, which picks ``i`` with
probability ``p_i``). A row with a seed draws its noise from its own generator, so its
tokens do not depend on the other rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from langchain_baichuan2.engines.base import SamplingParams


class RowSettings:
    """Per-row sampling settings of a batch as device tensors.

    Args:
        params: Each row's settings, in batch order.
        generators: Each row's seeded generator, or None.
        vocab_size: Size of the vocabulary.
        device: Where the logits live.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        def column(values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        self.generators = list(generators)
        self.penalty = column([p.repetition_penalty for p in params])
        self.penalized = any(p.repetition_penalty != 1.0 for p in params)
        self.sampled = column([p.temperature > 0 for p in params], torch.bool)
        self.any_sampled = any(p.temperature > 0 for p in params)
        self.temperature = column([p.temperature if p.temperature > 0 else 1.0 for p in params])
        sampled = [p for p in params if p.temperature > 0]
        # top_k of 0 (off) keeps the whole vocabulary.
        keep = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        self.top_k = column(keep, torch.long)
        self.largest_k = max(
            (k for k, p in zip(keep, params, strict=True) if p.temperature > 0),
            default=vocab_size,
        )
        self.top_p = column([p.top_p if p.top_p < 1.0 else math.inf for p in params])
        self.nucleus = any(p.top_p < 1.0 for p in sampled)
        self.vocab_size = vocab_size


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: torch.Tensor, settings: RowSettings
) -> torch.Tensor:
    """Penalize logits of tokens each row has seen (CTRL rule, as transformers does).

    ``seen_ids`` ``[B, N]`` holds the ids of each row's prompt and output (repeats
    allowed): only those logits are read and rewritten, not the whole vocabulary.
    """
    if not settings.penalized:
        return logits
    factor = settings.penalty[:, None]
    chosen = logits.gather(1, seen_ids)
    penalized = torch.where(chosen < 0, chosen * factor, chosen / factor)
    return logits.scatter(1, seen_ids, penalized)


def _filter(logits: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """Mask (with -inf) what lies outside each row's top-k set and nucleus.

    Top-k keeps every logit at or above the k-th largest (ties stay, as transformers'
    ``TopKLogitsWarper`` does); top-p then drops, in sorted order, each candidate whose
    preceding mass already reaches p (the first always stays), as ``TopPLogitsWarper``.
    """
    if settings.largest_k >= settings.vocab_size and not settings.nucleus:
        return logits
    # Candidates in descending order: the largest k of them, or all when a row has no k.
    if settings.largest_k < settings.vocab_size:
        candidates, order = logits.topk(settings.largest_k, dim=-1)
    else:
        candidates, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(candidates.shape[-1], device=logits.device)[None, :]
    in_top_k = candidates.masked_fill(rank >= settings.top_k[:, None], -math.inf)
    kept = (in_top_k > -math.inf).sum(dim=-1, keepdim=True).clamp(min=1)
    pivot = in_top_k.gather(1, kept - 1)
    filtered = logits.masked_fill(logits < pivot, -math.inf)
    if settings.nucleus:
        probs = candidates.masked_fill(candidates < pivot, -math.inf).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        outside = (mass_before >= settings.top_p[:, None]) & (rank > 0)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, outside)
        filtered = filtered.masked_fill(drop, -math.inf)
    return filtered


def choose_tokens(logits: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """Pick each row's token; returns ``[3, B]``: tokens, nothing-allowed, overflowed.

    *Nothing allowed*: every logit of the row is -inf (grammar and arguments exclude
    every token). *Overflowed*: a sampled row whose settings (say, a temperature of
    1e-45) leave no valid probabilities. Both only concern their own row.
    """
    best, tokens = logits.max(dim=-1)
    excluded = ~(best > -math.inf)  # every logit -inf (or NaN)
    overflowed = torch.zeros_like(excluded)
    if settings.any_sampled:
        warped = _filter(logits / settings.temperature[:, None], settings)
        probs = warped.softmax(dim=-1)
        overflowed = settings.sampled & ~torch.isfinite(probs).all(dim=-1) & ~excluded
        noise = torch.empty_like(probs).exponential_()
        for row, generator in enumerate(settings.generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        drawn = (probs / noise).nan_to_num(nan=-1.0).argmax(dim=-1)
        tokens = torch.where(settings.sampled, drawn, tokens)
    return torch.stack([tokens, excluded.long(), overflowed.long()])
