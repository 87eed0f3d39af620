"""The llama.cpp engine's prefix cache as a data structure (no model needed)."""

from __future__ import annotations

from fusion.engines.llamacpp_prefix import PrefixCache


def cache(**kw) -> tuple[PrefixCache, list[int]]:
    freed: list[int] = []
    opts = {"max_entries": 4, "max_tokens": 1000, "min_tokens": 4} | kw
    return PrefixCache(freed.append, **opts), freed


def test_lookup_finds_the_longest_shared_prefix():
    c, _ = cache()
    c.keep(1, [1, 2, 3, 4, 5, 6, 7, 8])
    c.keep(2, [1, 2, 3, 4, 5, 9, 9, 9, 9])
    assert c.lookup([1, 2, 3, 4, 5, 6, 7, 0, 0]) == (1, 7)
    assert c.lookup([1, 2, 3, 4, 5, 9, 9, 1]) == (2, 7)
    assert c.hit_tokens == 14


def test_the_prompts_last_token_is_always_left_to_decode():
    c, _ = cache()
    c.keep(1, [1, 2, 3, 4, 5, 6])
    assert c.lookup([1, 2, 3, 4, 5, 6]) == (1, 5)  # its row is what generation needs


def test_short_matches_are_not_worth_a_copy():
    c, _ = cache(min_tokens=4)
    c.keep(1, [1, 2, 3, 4, 5, 6])
    assert c.lookup([1, 2, 3, 9, 9, 9]) is None
    assert c.lookup([7, 8, 9, 9, 9, 9]) is None


def test_a_context_already_covered_is_given_back():
    c, freed = cache()
    c.keep(1, [1, 2, 3, 4, 5, 6])
    c.keep(2, [1, 2, 3, 4, 5])
    assert freed == [2] and len(c) == 1


def test_a_longer_context_replaces_the_entry_it_extends():
    c, freed = cache()
    c.keep(1, [1, 2, 3, 4, 5])
    c.keep(2, [1, 2, 3, 4, 5, 6, 7])
    assert freed == [1] and len(c) == 1
    assert c.lookup([1, 2, 3, 4, 5, 6, 7, 8]) == (2, 7)


def test_least_recently_used_goes_first():
    c, freed = cache(max_entries=2)
    c.keep(1, [1, 1, 1, 1, 1])
    c.keep(2, [2, 2, 2, 2, 2])
    assert c.lookup([1, 1, 1, 1, 1, 0]) is not None  # 1 used: 2 is now the oldest
    c.keep(3, [3, 3, 3, 3, 3])
    assert freed == [2]
    assert c.evict() and freed == [2, 1]


def test_the_token_budget_evicts_too():
    c, freed = cache(max_tokens=10)
    c.keep(1, [1] * 6)
    c.keep(2, [2] * 6)
    assert freed == [1] and c.tokens == 6
    c.keep(3, [3] * 11)  # larger than the whole budget: never kept
    assert freed == [1, 3]


def test_off_keeps_nothing():
    c, freed = cache(max_entries=0)
    c.keep(1, [1, 2, 3, 4, 5, 6])
    assert freed == [1] and len(c) == 0 and c.lookup([1, 2, 3, 4, 5, 6, 7]) is None
