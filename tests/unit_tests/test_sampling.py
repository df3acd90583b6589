"""On-device token choice: filters, the exponential race, penalties, failure flags."""

import math

import pytest
import torch
import transformers.generation.logits_process as transformers_processors
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from langchain_baichuan2.engines.base import SamplingParams
from langchain_baichuan2.engines.native.sampling import (
    RowSettings,
    apply_repetition_penalty,
    choose_tokens,
    warp_logits,
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
    logits[2] *= 1e37  # over float32's range once divided by the temperature
    params = [SamplingParams(max_new_tokens=1), sampled(), sampled(temperature=0.01)]
    _, excluded, overflowed = choose_tokens(logits, settings_for(params)).tolist()
    assert excluded == [0, 1, 0]
    assert overflowed == [0, 0, 1]


def transformers_warped(logits, params):
    """Transformers' warpers in its order: temperature, top-k, top-p."""
    warped = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        warped = TopKLogitsWarper(params.top_k)(None, warped)
    if params.top_p < 1:
        warped = TopPLogitsWarper(params.top_p)(None, warped)
    return warped


class _TorchWithStableSort:
    """``torch`` as transformers' warpers see it, but with a stable ``sort``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def sort(*args, **kwargs):
        return torch.sort(*args, **kwargs, stable=True)


@pytest.fixture
def stable_transformers_sort(monkeypatch):
    """Transformers' top-p sorts ties stably, as on the GPU for Baichuan2's vocabulary.

    Its sort is unstable: on the CPU, rows over 16 tokens order ties arbitrarily; on the
    GPU, rows over 4096 (Baichuan2 has 125696) go to a stable sort. Only transformers'
    module sees the stable sort; it decides which ids of a tie that top-p cuts survive.
    """
    monkeypatch.setattr(transformers_processors, "torch", _TorchWithStableSort())


def tied(*head, vocab=8, rest=0.0):
    """One row of logits: ``head`` then ``rest`` repeated up to ``vocab``."""
    return torch.tensor([[*head] + [rest] * (vocab - len(head))])


# Vocabularies of 16 or fewer, where transformers' (unstable) CPU sort keeps ties in id
# order, as a stable sort does: when top-p cuts a tie, the lowest ids go first.
TIED_CASES = {
    "issue: top-k tie kept, top-p drops it": (tied(5.0, vocab=8, rest=1.0), 2, 0.5),
    "issue, larger vocabulary": (tied(5.0, vocab=16, rest=1.0), 2, 0.5),
    "top-k alone, tie at the k-th": (tied(3.0, 2.0, 2.0, 2.0, 1.0, vocab=12), 2, 1.0),
    "top-k alone, all equal": (tied(vocab=8), 3, 1.0),
    "top-p alone, exactly at the boundary": (tied(vocab=8, rest=1.0), 0, 0.5),
    "top-p alone, cuts a tie": (tied(2.0, 2.0, 2.0, 1.0, vocab=16, rest=-1.0), 0, 0.4),
    "top-p cuts the tie at the k-th": (tied(4.0, 3.0, 3.0, 3.0, 3.0, 3.0, vocab=16), 2, 0.6),
    "top-p cuts a tie above the k-th": (tied(3.0, 3.0, 3.0, 1.0, 1.0, vocab=16), 4, 0.5),
    "tie at the k-th, top-p keeps all": (tied(3.0, 3.0, 2.0, 2.0, 2.0, vocab=16), 3, 0.99),
    "ties cut by top-p, tie id order reversed": (tied(0.0, 1.0, 1.0, 2.0, 2.0, vocab=8), 3, 0.6),
}


@pytest.mark.parametrize("case", list(TIED_CASES), ids=list(TIED_CASES))
def test_tied_logits_keep_what_transformers_keeps(case):
    """The warped logits equal transformers' to the bit: same tokens, same values."""
    logits, top_k, top_p = TIED_CASES[case]
    params = sampled(top_k=top_k, top_p=top_p)
    vocab = logits.shape[-1]
    got = warp_logits(logits.clone(), RowSettings([params], [None], vocab, torch.device("cpu")))
    torch.testing.assert_close(got, transformers_warped(logits, params), rtol=0, atol=0)


def test_issue_example_draws_only_the_top_token():
    """Logits [5, 1, 1, ...], top_k=2, top_p=0.5: transformers' distribution is [1, 0, ...]."""
    logits = tied(5.0, vocab=8, rest=1.0)
    params = sampled(top_k=2, top_p=0.5)
    expected = transformers_warped(logits, params).softmax(-1)[0]
    assert expected.tolist() == [1.0] + [0.0] * 7
    settings = RowSettings([params] * 500, [None] * 500, 8, torch.device("cpu"))
    torch.manual_seed(0)
    assert set(choose_tokens(logits.expand(500, -1).clone(), settings)[0].tolist()) == {0}


@pytest.mark.parametrize(
    "params",
    [
        sampled(top_k=5),
        sampled(top_p=0.7),
        sampled(top_k=8, top_p=0.5, temperature=0.7),
        sampled(top_k=20, top_p=0.9, temperature=1.3),
        sampled(top_k=1, top_p=0.3),
        sampled(top_p=0.01, temperature=0.5),
    ],
    ids=["top-k", "top-p", "top-k+top-p", "wide top-k+top-p", "top-k 1", "tiny top-p"],
)
def test_warped_logits_equal_transformers_without_ties(params):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    got = warp_logits(logits.clone(), settings_for([params] * 3))
    torch.testing.assert_close(got, transformers_warped(logits, params), rtol=0, atol=0)


@pytest.mark.usefixtures("stable_transformers_sort")
def test_each_row_of_a_mixed_batch_keeps_what_transformers_keeps():
    """Rows with and without top-k or top-p, and greedy rows, share one batch."""
    generator = torch.Generator().manual_seed(6)
    logits = torch.randint(-2, 3, (7, VOCAB), generator=generator).float()  # many ties
    params = [
        sampled(top_k=3),
        sampled(),
        sampled(top_p=0.6),
        SamplingParams(max_new_tokens=1, top_k=7, top_p=0.2),  # greedy
        sampled(top_k=10, top_p=0.5, temperature=0.6),
        sampled(top_k=1),
        sampled(top_k=4, top_p=0.9),
    ]
    # With a top-p row lacking top-k (the whole vocabulary ranked), then without.
    for batch in (params, [p for p in params if not (p.top_p < 1 and p.top_k == 0)]):
        rows = [i for i, p in enumerate(params) if p in batch]
        got = warp_logits(logits[rows].clone(), settings_for(batch))
        for row, (i, p) in enumerate(zip(rows, batch, strict=True)):
            if p.temperature > 0:
                expected = transformers_warped(logits[i : i + 1], p)[0]
                torch.testing.assert_close(got[row], expected, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [0, 3], ids=["top-p", "top-k+top-p"])
def test_top_p_cuts_a_tie_as_a_stable_sort_does_in_a_large_vocabulary(top_k, monkeypatch):
    """Unpatched transformers keeps the same values; with a stable sort, the same ids."""
    vocab = 5000
    logits = torch.full((1, vocab), -20.0)
    logits[0, [10, 700, 2500, 4000, 4999]] = 2.0
    logits[0, 1234] = 3.0
    params = sampled(top_k=top_k, top_p=0.5)
    got = warp_logits(logits.clone(), RowSettings([params], [None], vocab, torch.device("cpu")))
    unpatched = transformers_warped(logits, params)
    assert sorted(got[0].tolist()) == sorted(unpatched[0].tolist())
    monkeypatch.setattr(transformers_processors, "torch", _TorchWithStableSort())
    torch.testing.assert_close(got, transformers_warped(logits, params), rtol=0, atol=0)
    # Of the five tied 2.0s the two highest ids stay.
    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [1234, 4000, 4999]
