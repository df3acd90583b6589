"""On-device token choice: filters, the exponential race, penalties, failure flags."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from langchain_baichuan2.engines.base import SamplingParams
from langchain_baichuan2.engines.sampling import (
    RowSettings,
    apply_repetition_penalty,
    choose_tokens,
)

VOCAB = 50


def settings_for(params, generators=None):
    generators = generators or [None] * len(params)
    return RowSettings(params, generators, VOCAB, torch.device("cpu"))


def sampled(**kwargs):
    return SamplingParams(max_new_tokens=1, temperature=kwargs.pop("temperature", 1.0), **kwargs)


def draws(logits_row, params, n=4000, seed=0):
    """``n`` independent draws for one row (as ``n`` identical rows)."""
    torch.manual_seed(seed)
    logits = logits_row.expand(n, -1).clone()
    return choose_tokens(logits, settings_for([params] * n))[0]


@pytest.mark.parametrize(
    "params",
    [
        sampled(top_k=5),
        sampled(top_p=0.7),
        sampled(top_k=8, top_p=0.5, temperature=0.7),
        sampled(temperature=1.3),
    ],
    ids=["top-k", "top-p", "top-k+top-p", "temperature"],
)
def test_draws_follow_transformers_warped_distribution(params):
    """Frequencies match the distribution transformers' own warpers define."""
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    warped = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        warped = TopKLogitsWarper(params.top_k)(None, warped)
    if params.top_p < 1:
        warped = TopPLogitsWarper(params.top_p)(None, warped)
    expected = warped.softmax(-1)[0]
    counts = torch.bincount(draws(logits, params), minlength=VOCAB).float() / 4000
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert (counts - expected).abs().max() < 0.03


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(max_new_tokens=1)
    params = [greedy, sampled(), greedy, sampled()]
    tokens = choose_tokens(logits, settings_for(params))[0]
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))

    def run(rows):
        generator = torch.Generator().manual_seed(42)
        params = [sampled(seed=42)] + [sampled(temperature=0.5)] * (rows - 1)
        settings = settings_for(params, [generator] + [None] * (rows - 1))
        return [int(choose_tokens(logits[:rows], settings)[0, 0]) for _ in range(20)]

    assert run(1) == run(3)


def test_repetition_penalty_equals_transformers_processor():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4))
    seen_ids = torch.tensor([[1, 5, 5, 9], [0, 2, 3, 49]])
    params = [SamplingParams(max_new_tokens=1, repetition_penalty=1.3)] * 2
    got = apply_repetition_penalty(logits.clone(), seen_ids, settings_for(params))
    # The rule by hand: seen tokens' positive logits divided, negative ones multiplied.
    seen = torch.zeros(2, VOCAB, dtype=torch.bool).scatter_(1, seen_ids, True)
    by_hand = torch.where(logits > 0, logits / 1.3, logits * 1.3)
    torch.testing.assert_close(got, torch.where(seen, by_hand, logits), rtol=0, atol=0)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_failures_are_flagged_per_row():
    logits = torch.randn(3, VOCAB)
    logits[1] = -math.inf  # nothing allowed
    params = [SamplingParams(max_new_tokens=1), sampled(), sampled(temperature=1e-45)]
    _, excluded, overflowed = choose_tokens(logits, settings_for(params)).tolist()
    assert excluded == [0, 1, 0]
    assert overflowed == [0, 0, 1]


def test_top_p_keeps_one_of_two_tied_tokens_as_transformers_does():
    logits = torch.full((1, VOCAB), -20.0)
    logits[0, :3] = torch.tensor([2.0, 2.0, 1.0])
    expected = TopPLogitsWarper(0.4)(None, logits.clone())
    assert int(torch.isfinite(expected).sum()) == 1
    tokens = draws(logits, sampled(top_p=0.4), n=200)
    assert len(set(tokens.tolist())) == 1 and int(tokens[0]) in (0, 1)
