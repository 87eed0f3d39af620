"""Per-request state of the llama.cpp engine: one llama.cpp sequence, the shared
bookkeeping of what is in it (``ledger.Ledger``) and the cache operations still to run.

Each request state is one llama.cpp sequence. Its cells in the (unified) KV cache, by
position, are the ledger's layout: ``[0, done)`` the committed context, then
``ahead_done`` look-ahead tokens. The ledger's rows are log-prob rows (numpy, 4 bytes
per vocabulary entry, 1 MB on Gemma), kept for the row after the context, the tail and
the last ``AHEAD_ROWS`` look-ahead positions; a row that is not kept is made again by
decoding the last context token once more (``redo_last``).

A branch's handle is the sequence it was scored on: it shares the context's cells (a
metadata copy) and holds the candidate's; adopting it copies those into the request's
sequence, and every other branch is given back.

``commit`` only does bookkeeping on the caller's thread; the cache operations it implies
(``ops``) run on the decode thread at the start of the state's next call (or its
release), so a commit never waits behind other requests' decodes. Every method taking
the runtime runs on the decode thread.

A released state's cells ``[0, done)`` go to the prefix cache (``llamacpp_prefix``); a
new state whose prompt starts the same way copies them and decodes only the rest, which
gives it its first row after the context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fusion.engines.ledger import Commit, Ledger
from fusion.engines.llamacpp_runtime import LlamaError, LlamaRuntime
from fusion.engines.sampler import History

# Look-ahead rows kept per request, for the last positions: a candidate ends where a word
# boundary showed, usually one or two tokens before its model's look-ahead does.
AHEAD_ROWS = 4

Book = Ledger[int, np.ndarray]  # branch handle: the sequence it was scored on


@dataclass
class LlamaState:
    """Per-request state (layout in the module docstring)."""

    request_id: str
    book: Book
    seq: int | None = None  # taken on the decode thread at the first call
    ops: list[Callable[[LlamaRuntime], None]] = field(default_factory=list)
    rng: np.random.Generator | None = None
    history: History = field(default_factory=History)  # what penalties count
    cancelled: bool = False
    cells: int = 0  # KV cells reserved for it at open (given back at release)

    @classmethod
    def opened(cls, request_id: str, prompt: Sequence[int]) -> LlamaState:
        return cls(request_id, Ledger(list(prompt), max_rows=AHEAD_ROWS))

    def check(self) -> None:
        self.book.check()

    def commit(self, ids: Sequence[int]) -> None:
        """Bookkeeping of a commit; its cache operations are queued in ``ops``."""
        self.queue(self.book.commit(ids))
        self.book.check()

    def queue(self, plan: Commit[int, np.ndarray]) -> None:
        """Run ``plan``'s cache operations at the state's next call. A state without a
        sequence has nothing in the cache to cut or adopt into."""
        seq = self.seq
        if seq is None and not plan.free:
            return

        def apply(rt: LlamaRuntime) -> None:
            try:
                if seq is not None and plan.cut is not None:
                    rt.drop_from(seq, plan.cut)
                if seq is not None and plan.adopt is not None:
                    b = plan.adopt
                    rt.copy_span(b.handle, seq, b.start, b.start + len(b.ids))
            finally:  # the branches' sequences come back even if a cache operation fails
                for b in [*([plan.adopt] if plan.adopt else []), *plan.free]:
                    rt.give_seq(b.handle)

        self.ops.append(apply)

    def run_ops(self, rt: LlamaRuntime) -> None:
        """Every queued operation, each one even if an earlier one failed (the first
        failure is raised after the rest ran: none of them leaks its sequences)."""
        ops, self.ops = self.ops, []
        failed: Exception | None = None
        for op in ops:
            try:
                op(rt)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def redo_last(self, rt: LlamaRuntime) -> None:
        """With no row after the context kept (and nothing pending, no look-ahead), put the
        last context token back to pending: decoding it gives the row. Its cell goes now,
        so that a call cut short before that decode leaves a state that says the cell is
        gone (the context never has a hole)."""
        assert self.seq is not None
        rt.drop_from(self.seq, self.book.unfeed_last())

    def drop_branches(self, rt: LlamaRuntime) -> None:
        for b in self.book.take_branches():
            rt.give_seq(b.handle)

    def reuse_prefix(self, rt: LlamaRuntime) -> None:
        """Start a fresh state from the prefix cache's longest match of its prompt."""
        assert self.seq is not None and self.book.done == 0
        hit = rt.prefix.lookup(self.book.pending)
        if hit is None:
            return
        src, n = hit
        # At least the prompt's last token is left pending: its decode gives the row
        # after the context, which a fresh state lacks.
        rt.copy_span(src, self.seq, 0, n)
        self.book.restored(n)

    def free(self, rt: LlamaRuntime) -> None:
        """Release the state's sequences; its decoded context goes to the prefix cache."""
        seq, self.seq = self.seq, None
        try:
            self.run_ops(rt)  # a commit's copy out of a branch, branches given back
            ok = seq is not None
        except LlamaError:
            ok = False
        self.ops.clear()
        self.drop_branches(rt)
        book = self.book
        book.rows = {}
        if seq is None:
            return
        if ok and book.done:
            rt.drop_from(seq, book.done)  # look-ahead is not context
            # a call cut short can leave the last cell undecoded: keep only whole contexts
            ok = rt.seq_end(seq) == book.done
        if ok and book.done:
            rt.prefix.keep(seq, book.ids[: book.done])
        else:
            rt.give_seq(seq)
