"""The prefix KV store: longest-prefix lookup, budget, LRU eviction, disabling."""

import torch

from langchain_baichuan2.prefix_cache import PrefixCache, common_prefix_length


def kv_for(ids, layers=2):
    """Fake per-layer keys/values whose values encode the token ids."""
    t = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
    return [(t.clone() + layer, -t.clone()) for layer in range(layers)]


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_lookup_returns_the_longest_stored_prefix_and_its_slices():
    cache = PrefixCache(100)
    cache.store([1, 2, 3, 4], kv_for([1, 2, 3, 4]))
    cache.store([1, 2, 9, 9, 9], kv_for([1, 2, 9, 9, 9]))
    reused, kv = cache.lookup([1, 2, 3, 7, 8])
    assert reused == 3
    assert kv[0][0].flatten().tolist() == [1, 2, 3]
    assert kv[1][0].flatten().tolist() == [2, 3, 4]  # layer 1 is offset by 1
    assert kv[0][1].flatten().tolist() == [-1, -2, -3]


def test_at_least_one_token_is_left_to_prefill():
    cache = PrefixCache(100)
    cache.store([5, 6, 7], kv_for([5, 6, 7]))
    assert cache.lookup([5, 6, 7])[0] == 2
    assert cache.lookup([8, 9]) == (0, None)


def test_the_budget_is_never_exceeded_and_eviction_is_lru():
    cache = PrefixCache(10)
    cache.store([1, 1, 1, 1], kv_for([1, 1, 1, 1]))
    cache.store([2, 2, 2, 2], kv_for([2, 2, 2, 2]))
    cache.lookup([1, 1, 1, 5])  # touches the first entry
    cache.store([3, 3, 3, 3], kv_for([3, 3, 3, 3]))
    assert cache.stored_tokens <= 10
    assert cache.entries() == [(1, 1, 1, 1), (3, 3, 3, 3)]  # 2,2,2,2 was least recent
    cache.store(list(range(11)), kv_for(list(range(11))))  # larger than the budget
    assert (tuple(range(11))) not in cache.entries()


def test_a_longer_sequence_replaces_its_stored_prefixes():
    cache = PrefixCache(100)
    cache.store([1, 2], kv_for([1, 2]))
    cache.store([1, 2, 3, 4], kv_for([1, 2, 3, 4]))
    assert cache.entries() == [(1, 2, 3, 4)]


def test_a_prefix_of_a_stored_sequence_only_refreshes_it():
    cache = PrefixCache(100)
    cache.store([1, 2, 3, 4], kv_for([1, 2, 3, 4]))
    cache.store([7, 7], kv_for([7, 7]))
    cache.store([1, 2], kv_for([1, 2]))
    assert cache.entries() == [(7, 7), (1, 2, 3, 4)]
    assert cache.stored_tokens == 6


def test_stored_tensors_are_copies():
    cache = PrefixCache(100)
    kv = kv_for([1, 2, 3])
    cache.store([1, 2, 3], kv)
    kv[0][0].zero_()
    assert cache.lookup([1, 2, 3, 4])[1][0][0].flatten().tolist() == [1, 2, 3]


def test_a_zero_budget_disables_and_empties_the_store():
    cache = PrefixCache(100)
    cache.store([1, 2, 3], kv_for([1, 2, 3]))
    cache.resize(0)
    assert cache.entries() == []
    cache.store([1, 2, 3], kv_for([1, 2, 3]))
    assert cache.lookup([1, 2, 3, 4]) == (0, None)
