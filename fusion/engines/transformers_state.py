"""Per-request state of the transformers engine: its KV cache, the shared bookkeeping of
what is in it (``ledger.Ledger``) and the checks of the two against each other.

A state is touched by one engine-thread call at a time (``lock``); ``release`` may come
from the event loop at any moment and frees it at once, or leaves that to the running call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from fusion.engines.kv_arena import ArenaCache
from fusion.engines.ledger import Commit, Ledger
from fusion.engines.sampler import History, shift_of

Book = Ledger[int, torch.Tensor]  # branch handle: the first cache slot of its block


@dataclass
class TransformersState:
    """Per-request state: the cache and the ledger of what is in it.

    Cache layout, by slot (the ledger's names)::

        [0, done)                         committed context ``ids[:done]``, positions = slots
        [done, done + ahead_done)         look-ahead ``ahead[:ahead_done]``, right after it
        [done + ahead_done, cache.length) scoring blocks (the ledger's branches, handle = the
                                          block's first slot), each seeing the context only;
                                          dropped by the next generate/score/commit

    Rows are single log-prob rows with storage of their own, never views that pin a whole
    ``[rows, vocab]`` forward output, each remembering its log-normaliser (``sampler``:
    repetition_penalty needs the logits); only the row after the context and the tail are
    kept (``max_rows=0``). ``check`` asserts all this at the end of every engine call.
    """

    request_id: str
    cache: ArenaCache
    book: Book
    cancelled: bool = False  # released: calls stop at their next token or forward
    generator: torch.Generator | None = None  # sampling RNG, seeded once per request
    history: History = field(default_factory=History)  # what penalties count
    forwards: int = 0
    fed_tokens: int = 0
    # held by the engine thread during a call; release frees the state only when free
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def opened(cls, request_id: str, cache: ArenaCache, prompt: list[int]) -> TransformersState:
        return cls(request_id, cache, Ledger(prompt, max_rows=0))

    @property
    def in_cache(self) -> int:
        """Slots of context and look-ahead (the scoring region starts here)."""
        return self.book.done + self.book.ahead_done

    def apply(self, plan: Commit[int, torch.Tensor]) -> None:
        """A commit's cache operations: the adopted block's slots move into the context,
        and everything past the ledger's context and look-ahead goes."""
        if plan.adopt is not None:
            b = plan.adopt
            self.cache.move(b.handle, b.start, len(b.ids))
        self.cache.truncate(self.in_cache)

    def check(self) -> None:
        """Raise ``AssertionError`` if the cache disagrees with the ledger."""
        book = self.book
        problems = []
        try:
            book.check()
        except AssertionError as exc:
            problems.append(str(exc))
        if not book.branches and self.cache.length != self.in_cache:
            problems.append("cache length is not the context and look-ahead")
        if any(
            b.handle < self.in_cache or b.handle + len(b.ids) > self.cache.length
            for b in book.branches
        ):
            problems.append("a scoring block outside the scoring region")
        if not all(is_own_row(t) for t in self._rows()):
            problems.append("a kept distribution is a view of a larger tensor")
        if any(shift_of(t) is None for t in self._rows()):
            problems.append("a kept distribution without its log-normaliser (logits lost)")
        if problems:
            raise AssertionError(f"state {self.request_id}: " + "; ".join(problems))

    def _rows(self) -> list[torch.Tensor]:
        return [r for b in self.book.branches for r in b.rows] + list(self.book.rows.values())

    def held_bytes(self) -> int:
        """Bytes held by the state: its KV buffers plus every tensor storage it keeps."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in self._rows()}
        return self.cache.nbytes + sum(s.nbytes() for s in storages.values())

    def free(self) -> None:
        self.cache.free()
        self.book.take_branches()
        self.book.clear_ahead()
        self.book.rows = {}


def is_own_row(t: torch.Tensor) -> bool:
    return t.dim() == 1 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def free_if_released(st: TransformersState) -> None:
    """Free a released state now unless a call holds it (that call frees it as it ends)."""
    if st.cancelled and st.lock.acquire(blocking=False):
        try:
            st.free()
        finally:
            st.lock.release()
