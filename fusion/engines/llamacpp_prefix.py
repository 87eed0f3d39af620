"""Prefix cache of the llama.cpp engine: finished contexts kept as sequences.

A request's context stays in the KV cache after the request ends, as a sequence owned
by this cache. A new prompt that starts with the same tokens (the same few-shot
examples, system prompt or earlier chat turns) copies those cells into its own sequence
(``llama_memory_seq_cp``, a metadata copy in the unified cache) and decodes only the
rest: vLLM's automatic prefix caching, per sequence instead of per block.

Entries cost sequences and KV cells, both shared with live requests; live requests come
first. The runtime evicts the least recently used entry when it needs a sequence, and
clears the cache when a decode finds no room in the KV cache. Decode thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np


class PrefixCache:
    """Least-recently-used finished contexts, by sequence id."""

    def __init__(
        self,
        give_back: Callable[[int], None],
        *,
        max_entries: int,
        max_tokens: int,
        min_tokens: int = 16,
    ) -> None:
        self._give_back = give_back  # frees a sequence's cells and returns its id
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, np.ndarray] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens served from the cache (stats)
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self._entries.values())

    def lookup(self, prompt: Sequence[int]) -> tuple[int, int] | None:
        """The entry sharing the longest prefix with ``prompt`` and that length, capped
        so that at least the prompt's last token is left to decode (its row is needed);
        None below ``min_tokens``."""
        self.lookups += 1
        if not self._entries or len(prompt) <= self.min_tokens:
            return None
        want = np.asarray(prompt[:-1], dtype=np.int64)
        best, best_n = -1, 0
        for seq, toks in self._entries.items():
            n = _common_prefix(want, toks)
            if n > best_n:
                best, best_n = seq, n
        if best_n < self.min_tokens:
            return None
        self._entries.move_to_end(best)
        self.hit_tokens += best_n
        return best, best_n

    def keep(self, seq: int, tokens: Sequence[int]) -> None:
        """Take ``seq`` (its cells hold exactly ``tokens`` at positions 0..n-1) as an entry,
        or give it back when it adds nothing. Entries it extends are dropped."""
        toks = np.asarray(tokens, dtype=np.int64)
        if self.max_entries <= 0 or len(toks) < self.min_tokens or len(toks) > self.max_tokens:
            self._give_back(seq)
            return
        for other, have in list(self._entries.items()):
            n = _common_prefix(toks, have)
            if n == len(toks):  # already cached, as this or a longer context
                self._entries.move_to_end(other)
                self._give_back(seq)
                return
            if n == len(have):  # the new context extends it
                self.drop(other)
        self._entries[seq] = toks
        while len(self._entries) > self.max_entries or self.tokens > self.max_tokens:
            self.evict()

    def drop(self, seq: int) -> None:
        del self._entries[seq]
        self._give_back(seq)

    def evict(self) -> bool:
        """Free the least recently used entry; False when there is none."""
        if not self._entries:
            return False
        self.drop(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        while self.evict():
            pass


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n
