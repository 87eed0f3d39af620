"""Per-request state of the llama.cpp engine: its sequence's layout, the log-prob rows
kept past it, and the bookkeeping of commits, branches and the prefix cache.

Each request state is one llama.cpp sequence. Its cells in the (unified) KV cache, by
position::

    [0, n_past)                       committed context, decoded
    [n_past, n_past + ahead_fed)      look-ahead: tokens generated past the last commit

``pending`` holds committed tokens not decoded yet (then there is no look-ahead); they
are decoded, in batch-sized chunks, by the next call that needs them. ``tail`` is the
log-prob row after the last decoded cell, known only while every look-ahead token is
decoded. ``last_id`` is the token at ``n_past - 1``.

``ctx_row`` is the log-prob row after the committed context (the distribution of the
token at ``n_past``), kept whenever the engine computed it: the last row of the pending
context's decode, the row the first look-ahead token was picked from, a committed
branch's row after its candidate. It is known only while nothing is pending and cell
``n_past - 1`` is in the sequence; with no look-ahead, a known ``tail`` is ``ctx_row``.
``ahead_rows[k]`` is the row look-ahead token ``k >= 1`` was picked from, kept for the
last ``AHEAD_ROWS`` positions only (a row is 4 bytes per vocabulary entry, 1 MB on
Gemma): committing the first ``k`` look-ahead tokens makes it the new ``ctx_row``. A row
that is not kept is made again by decoding the last context token once more
(``redo_last``).

``branches`` are the last scoring round's candidates, each on a sequence of its own that
shares the committed cells; committing one copies its cells into the request's sequence.

``tokens`` is the whole committed context (``tokens[:n_past]`` is in the cells, the rest
is ``pending``). A released state's cells ``[0, n_past)`` go to the prefix cache
(``llamacpp_prefix``); a new state whose prompt starts the same way copies them and
decodes only the rest, which gives it its first ``ctx_row``.

``commit`` only does bookkeeping on the caller's thread; the cache operations it implies
(``ops``) run on the decode thread at the start of the state's next call, so a commit
never waits behind other requests' decodes. Every method taking the runtime runs on the
decode thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fusion.engines.llamacpp_runtime import LlamaError, LlamaRuntime

# Look-ahead rows kept per request, for the last positions: a candidate ends where a word
# boundary showed, usually one or two tokens before its model's look-ahead does.
AHEAD_ROWS = 4


@dataclass(frozen=True)
class Branch:
    ids: tuple[int, ...]
    seq: int
    after: np.ndarray  # log-probs after the candidate


@dataclass
class LlamaState:
    """Per-request state (layout in the module docstring)."""

    request_id: str
    pending: list[int]
    tokens: list[int] = field(default_factory=list)  # the committed context
    seq: int | None = None  # taken on the decode thread at the first call
    n_past: int = 0
    last_id: int = -1
    ahead: list[int] = field(default_factory=list)
    ahead_lp: list[float] = field(default_factory=list)
    ahead_fed: int = 0
    tail: np.ndarray | None = None
    ctx_row: np.ndarray | None = None
    ahead_rows: dict[int, np.ndarray] = field(default_factory=dict)
    branches: list[Branch] = field(default_factory=list)
    ops: list[Callable[[LlamaRuntime], None]] = field(default_factory=list)
    rng: np.random.Generator | None = None
    cancelled: bool = False

    def check(self) -> None:
        """The layout's invariants (cheap; after every call)."""
        assert 0 <= self.ahead_fed <= len(self.ahead) == len(self.ahead_lp)
        assert not (self.pending and self.ahead), "look-ahead after undecoded context"
        assert self.tail is None or (self.ahead_fed == len(self.ahead) and not self.pending)
        assert len(self.tokens) == self.n_past + len(self.pending)
        assert self.ctx_row is None or not self.pending, "row after undecoded context"
        assert self.ahead or self.tail is None or self.tail is self.ctx_row
        assert len(self.ahead_rows) <= AHEAD_ROWS
        assert all(0 < k < len(self.ahead) for k in self.ahead_rows)

    def commit(self, ids: tuple[int, ...]) -> None:
        """Bookkeeping of a commit; its cache operations are queued in ``ops``."""
        n = len(ids)
        if n == 0:
            return
        self.tokens.extend(ids)
        branch = next((b for b in self.branches if b.ids == ids), None)
        seq = self.seq
        if not self.pending and tuple(self.ahead[:n]) == ids:
            kept = min(self.ahead_fed, n)
            self.n_past += kept
            self.ahead_fed -= kept
            if kept:
                self.last_id = ids[kept - 1]
            # the row after the candidate: the one the next look-ahead token was picked from
            row = self.tail if n == len(self.ahead) else self.ahead_rows.get(n)
            self.ctx_row = row if kept == n else None
            if n > kept:  # the last generated token was never decoded
                self.pending = list(ids[kept:])
            self.ahead, self.ahead_lp = self.ahead[n:], self.ahead_lp[n:]
            self.ahead_rows = {k - n: r for k, r in self.ahead_rows.items() if k > n}
        elif branch is not None and not self.pending and seq is not None:
            start, src = self.n_past, branch.seq

            def adopt(rt: LlamaRuntime) -> None:  # the branch's cells become the context's
                rt.drop_from(seq, start)
                rt.copy_span(src, seq, start, start + n)

            self.ops.append(adopt)
            self.n_past += n
            self.last_id = ids[-1]
            self.tail = self.ctx_row = branch.after
            self.ahead, self.ahead_lp, self.ahead_fed, self.ahead_rows = [], [], 0, {}
        else:
            if seq is not None:
                start = self.n_past
                self.ops.append(lambda rt: rt.drop_from(seq, start))
            self.pending.extend(ids)
            self.ahead, self.ahead_lp, self.ahead_fed, self.ahead_rows = [], [], 0, {}
            self.tail = self.ctx_row = None
        # unused branches go back at the next call (after any copy out of them)
        self.check()

    def keep_row(self, row: np.ndarray) -> None:
        """Keep the row the next look-ahead token is picked from: the first one's is the
        row after the context; of the others only the last ``AHEAD_ROWS`` are kept."""
        k = len(self.ahead)
        if k == 0:
            self.ctx_row = row
            return
        self.ahead_rows[k] = row
        while len(self.ahead_rows) > AHEAD_ROWS:
            del self.ahead_rows[min(self.ahead_rows)]

    def redo_last(self, rt: LlamaRuntime) -> None:
        """With no row after the context kept (and nothing pending, no look-ahead), put the
        last context token back to pending: decoding it gives the row. Its cell goes now,
        so that a call cut short before that decode leaves a state that says the cell is
        gone (``n_past - 1`` is never a hole)."""
        assert self.seq is not None and self.n_past > 0
        assert not (self.pending or self.ahead or self.ctx_row is not None or self.tail is not None)
        rt.drop_from(self.seq, self.n_past - 1)
        self.n_past -= 1
        self.pending = [self.last_id]
        self.last_id = self.tokens[self.n_past - 1] if self.n_past else -1

    def drop_branches(self, rt: LlamaRuntime) -> None:
        for b in self.branches:
            rt.give_seq(b.seq)
        self.branches = []

    def reuse_prefix(self, rt: LlamaRuntime) -> None:
        """Start a fresh state from the prefix cache's longest match of its prompt."""
        assert self.seq is not None and self.n_past == 0
        hit = rt.prefix.lookup(self.pending)
        if hit is None:
            return
        src, n = hit
        # At least the prompt's last token is left pending: its decode gives ``ctx_row``,
        # which a fresh state lacks. (With none left, ``redo_last`` would cover it.)
        rt.copy_span(src, self.seq, 0, n)
        self.n_past = n
        self.last_id = self.pending[n - 1]
        self.pending = self.pending[n:]

    def free(self, rt: LlamaRuntime) -> None:
        """Release the state's sequences; its decoded context goes to the prefix cache."""
        seq, self.seq = self.seq, None
        try:
            for op in self.ops:  # a commit's pending copy out of a branch
                op(rt)
            ok = seq is not None
        except LlamaError:
            ok = False
        self.ops.clear()
        self.drop_branches(rt)
        self.tail = self.ctx_row = None
        self.ahead_rows = {}
        if seq is None:
            return
        if ok and self.n_past:
            rt.drop_from(seq, self.n_past)  # look-ahead is not context
            # a call cut short can leave the last cell undecoded: keep only whole contexts
            ok = rt.seq_end(seq) == self.n_past
        if ok and self.n_past:
            rt.prefix.keep(seq, self.tokens[: self.n_past])
        else:
            rt.give_seq(seq)
