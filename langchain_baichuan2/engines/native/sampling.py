"""Choosing the next token of every running row, on the model's device.

The rows' settings live in tensors built when a row joins or leaves the batch, so a
step transfers nothing to the device and reads back one small tensor: the tokens with
two failure flags per row. Greedy rows take the argmax. Sampled rows follow
transformers' order (repetition penalty, temperature, top-k, top-p) and keep exactly
the tokens its warpers keep: top-k keeps the logits at or above the k-th largest (a
``topk`` pivot, no full sort), top-p drops the tokens whose ascending cumulative mass
is at most ``1 - p``, a tie it cuts losing its lowest ids first (transformers' order
on the GPU, where a vocabulary this large is sorted stably). The token is drawn by an
exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``, which picks ``i`` with
probability ``p_i``). A row with a seed draws its noise from its own generator, so
its tokens do not depend on the other rows.
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
        # A sampled row's k, or 0 where it keeps the whole vocabulary (top_k off, or
        # as large as the vocabulary; greedy rows, whose filters go unused).
        keep = [p.top_k if p.temperature > 0 and 0 < p.top_k < vocab_size else 0 for p in params]
        self.top_k = column(keep, torch.long)
        self.widest_k = max(keep, default=0)
        # Transformers drops a token whose ascending cumulative mass is <= 1 - top_p
        # (a float32 comparison); -inf drops nothing where top-p is off.
        nucleus = [p.temperature > 0 and p.top_p < 1.0 for p in params]
        self.nucleus = any(nucleus)
        self.top_p_cut = column(
            [1.0 - p.top_p if on else -math.inf for p, on in zip(params, nucleus, strict=True)]
        )
        # A row with top-p but no top-k ranks the whole vocabulary: a full sort.
        self.full_sort = any(on and k == 0 for on, k in zip(nucleus, keep, strict=True))
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

    The same tokens as transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper``:
    top-k keeps every logit at or above the k-th largest (ties stay); top-p ranks the
    survivors ascending, ties by id, and drops those whose cumulative mass is at most
    ``1 - p``, keeping the last. Without top-p, or when every top-p row has a top-k,
    only the ``widest_k`` largest logits are ranked, not the whole vocabulary.
    """
    if not settings.widest_k and not settings.nucleus:
        return logits
    # The ranked logits in ascending order, ties by ascending id (a stable sort's order).
    if settings.full_sort:
        ascending, ids = logits.sort(dim=-1, stable=True)
    else:
        top, ids = logits.topk(settings.widest_k, dim=-1)  # ties in no particular order
        if settings.nucleus:
            ids, by_id = ids.sort(dim=-1)
            ascending, by_value = top.gather(1, by_id).sort(dim=-1, stable=True)
            ids = ids.gather(1, by_value)
        else:
            ascending = top.flip(-1)
    width = ascending.shape[-1]
    k = settings.top_k[:, None]
    kth_largest = ascending.gather(1, (width - k).clamp(max=width - 1))
    pivot = torch.where(k > 0, kth_largest, -math.inf)
    filtered = logits.masked_fill(logits < pivot, -math.inf)
    if not settings.nucleus:
        return filtered
    outside = _outside_nucleus(logits, ascending, ids, pivot, settings)
    return filtered.masked_fill(outside, -math.inf)


def _outside_nucleus(
    logits: torch.Tensor,
    ascending: torch.Tensor,
    ids: torch.Tensor,
    pivot: torch.Tensor,
    settings: RowSettings,
) -> torch.Tensor:
    """Which tokens top-p drops from the top-k survivors (those ``>= pivot``).

    Transformers' ``TopPLogitsWarper`` sorts the whole top-k-filtered row ascending: the
    masked tokens (-inf) first, then the ``pivot`` ties, then the larger survivors. That
    row is rebuilt here value for value (from ``ascending``, which holds every survivor
    above the pivot), so its softmax and cumulative sum are transformers' own. The drop
    is a prefix of it: the masked tokens, then the pivot ties by ascending id, then
    ``ascending``'s entries in order. ``ascending`` and ``ids`` may be the widest top-k
    only; ties at the pivot are counted over the whole vocabulary.
    """
    vocab, width = logits.shape[-1], ascending.shape[-1]
    place = torch.arange(vocab, device=logits.device)  # in the sorted row
    above = (logits > pivot).sum(dim=-1, keepdim=True)
    kept = (logits >= pivot).sum(dim=-1, keepdim=True)
    row = torch.where(place >= vocab - kept, pivot, -math.inf)
    tail = place[vocab - width :]  # where ``ascending`` sits
    row[:, vocab - width :] = torch.where(tail >= vocab - above, ascending, row[:, vocab - width :])
    cumulative = row.softmax(dim=-1).cumsum(dim=-1)
    # The largest token always stays (min_tokens_to_keep=1).
    dropped = (cumulative <= settings.top_p_cut[:, None]).sum(dim=-1, keepdim=True)
    dropped = dropped.clamp(max=vocab - 1)
    drop_ranked = (tail >= vocab - above) & (tail < dropped)
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, drop_ranked)
    tied = logits == pivot
    ties_dropped = dropped - (vocab - kept)
    return drop | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= ties_dropped))


def warp_logits(logits: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """Each row's logits as its draw sees them: temperature, then top-k and top-p.

    Equal to transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
    ``TopPLogitsWarper`` applied in that order; tokens outside hold -inf.
    """
    return _filter(logits / settings.temperature[:, None], settings)


def choose_tokens(logits: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """Pick each row's token; returns ``[3, B]``: tokens, nothing-allowed, overflowed.

    *Nothing allowed*: every logit of the row is -inf (grammar and arguments exclude
    every token). *Overflowed*: a sampled row whose settings (say, a repetition
    penalty of 1e-45) leave no valid probabilities. Both only concern their own row.
    """
    best, tokens = logits.max(dim=-1)
    excluded = ~(best > -math.inf)  # every logit -inf (or NaN)
    overflowed = torch.zeros_like(excluded)
    if settings.any_sampled:
        warped = warp_logits(logits, settings)
        probs = warped.softmax(dim=-1)
        overflowed = settings.sampled & ~torch.isfinite(probs).all(dim=-1) & ~excluded
        noise = torch.empty_like(probs).exponential_()
        for row, generator in enumerate(settings.generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        drawn = (probs / noise).nan_to_num(nan=-1.0).argmax(dim=-1)
        tokens = torch.where(settings.sampled, drawn, tokens)
    return torch.stack([tokens, excluded.long(), overflowed.long()])
