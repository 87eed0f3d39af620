"""Per-request state of the transformers engine: its KV cache and what was computed past
the committed context, with the layout written down and checked (see ``TransformersState``).

A state is touched by one engine-thread call at a time (``lock``); ``release`` may come
from the event loop at any moment and frees it at once, or leaves that to the running call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from fusion.engines.kv_arena import ArenaCache


@dataclass
class Block:
    ids: tuple[int, ...]
    start: int  # first cache slot
    after: torch.Tensor  # log-probs of the next token after the block (one row of its own)


@dataclass
class TransformersState:
    """Per-request state: the cache plus what was computed past the committed context.

    Cache layout, by slot::

        [0, fed)                          committed context ``ids[:fed]``, at positions = slots
        [fed, fed + ahead_fed)            look-ahead ``ahead[:ahead_fed]``, right after it
        [fed + ahead_fed, cache.length)   scoring blocks (``blocks``), each seeing the context
                                          only; dropped by the next generate/score/commit

    ``ids[fed:]`` is committed text not fed yet ("pending"); it is fed by the next forward,
    and while any is pending no look-ahead has KV (``ahead_fed == 0``). ``next_lp`` is the
    distribution after ``ids`` (only when nothing is pending; ``None`` means "not kept":
    the next scoring pass derives it). ``ahead_next`` is the distribution after the whole
    look-ahead, kept exactly when all of it is fed. Distributions are single rows with
    storage of their own, never views that pin a whole ``[rows, vocab]`` forward output.
    ``check`` asserts all this at the end of every engine call.
    """

    request_id: str
    cache: ArenaCache
    ids: list[int]  # the committed context (prompt + committed answer)
    fed: int = 0  # ids[:fed] have KV in the cache
    next_lp: torch.Tensor | None = None  # log-probs after ``ids``
    ahead: list[int] = field(default_factory=list)  # tokens generated after ``ids``
    ahead_lp: list[float] = field(default_factory=list)
    ahead_fed: int = 0  # ahead[:ahead_fed] have KV right after the context
    ahead_next: torch.Tensor | None = None  # log-probs after all of ``ahead``
    blocks: list[Block] = field(default_factory=list)
    cancelled: bool = False  # released: calls stop at their next token or forward
    generator: torch.Generator | None = None  # sampling RNG, seeded once per request
    forwards: int = 0
    fed_tokens: int = 0
    # held by the engine thread during a call; release frees the state only when free
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pending(self) -> list[int]:
        return self.ids[self.fed :]

    @property
    def context_len(self) -> int:
        return len(self.ids)

    def check(self) -> None:
        """Raise ``AssertionError`` if the cursors disagree with the layout above."""
        problems = [
            what
            for ok, what in (
                (0 <= self.fed <= len(self.ids), "fed outside the context"),
                (len(self.ahead_lp) == len(self.ahead), "look-ahead log-probs out of step"),
                (0 <= self.ahead_fed <= len(self.ahead), "fed look-ahead beyond look-ahead"),
                (self.fed == len(self.ids) or self.ahead_fed == 0, "look-ahead fed over pending"),
                (self.fed == len(self.ids) or self.next_lp is None, "next_lp while pending"),
                (
                    (self.ahead_next is not None) == (0 < self.ahead_fed == len(self.ahead)),
                    "ahead_next not matching a fully fed look-ahead",
                ),
                (
                    self.cache.length == self.fed + self.ahead_fed
                    if not self.blocks
                    else all(
                        self.fed + self.ahead_fed <= b.start
                        and b.start + len(b.ids) <= self.cache.length
                        for b in self.blocks
                    ),
                    "cache length or scoring blocks outside the scoring region",
                ),
                (
                    all(is_own_row(t) for t in self._rows()),
                    "a kept distribution is a view of a larger tensor",
                ),
            )
            if not ok
        ]
        if problems:
            raise AssertionError(f"state {self.request_id}: " + "; ".join(problems))

    def _rows(self) -> list[torch.Tensor]:
        rows = [b.after for b in self.blocks]
        return rows + [t for t in (self.next_lp, self.ahead_next) if t is not None]

    def held_bytes(self) -> int:
        """Bytes held by the state: its KV buffers plus every tensor storage it keeps."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in self._rows()}
        return self.cache.nbytes + sum(s.nbytes() for s in storages.values())

    def free(self) -> None:
        self.cache.free()
        self.next_lp = self.ahead_next = None
        self.blocks = []
        self.ahead, self.ahead_lp, self.ahead_fed = [], [], 0


def is_own_row(t: torch.Tensor) -> bool:
    return t.dim() == 1 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def free_if_released(st: TransformersState) -> None:
    """Free a released state now unless a call holds it (that call frees it as it ends)."""
    if st.cancelled and st.lock.acquire(blocking=False):
        try:
            st.free()
        finally:
            st.lock.release()
