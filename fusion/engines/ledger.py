"""What every engine's per-request state knows, written once: the committed context, the
look-ahead past it, the candidates scored after it, and what the next call must decode.

Each engine keeps its own cache (llama.cpp cells, a transformers KV arena, vLLM's prefix
cache) and applies the cache operations a commit implies (``Commit``); the bookkeeping
of which tokens are where and which distributions are known is this module's alone.

Layout of a ``Ledger`` (positions count from the start of the context ``ids``)::

    ids[:prompt_len]      the prompt the state was opened with; the rest of ``ids`` is
                          the committed answer (what answer penalties count)
    ids[:done]            committed and in the engine's cache
    ids[done:]            committed, not in the cache yet ("pending"): the next call
                          decodes them first; while any is pending there is no look-ahead
    ahead[:ahead_done]    look-ahead (tokens generated past the context) in the cache,
                          right after the context
    ahead[ahead_done:]    look-ahead generated but not in the cache yet
    ahead_top[k]          the most likely tokens at ``ahead[k]``'s position, when the
                          request reports them (OpenAI's top_logprobs; None otherwise):
                          engines whose rows are whole distributions keep only a few
                          rows, so a replayed token's alternatives are kept here
    rows[k]               the next-token distribution after ``ids + ahead[:k]`` (k = 0:
                          after the context), where kept; a row needs everything before it
                          in the cache, so ``k <= ahead_done`` and nothing is pending
    branches              candidates scored after the context: each starts at the
                          context's length when it was scored (``start``), holds the
                          engine's handle of its cached tokens, the rows after it and the
                          tokens the engine saw after it; every commit clears them

A *cacheless* ledger (vLLM: the engine resends the context with every call and its
prefix cache is its own business) has nothing pending and all look-ahead "in the cache".

``commit`` picks what the committed tokens reuse, in this order:

1. this state's own look-ahead, when the tokens are its first ones (no cache operation:
   the cells are in place; a branch of the same tokens wins only when it saw further);
2. a branch of exactly these tokens scored at this context length (its cells become the
   context's: ``Commit.adopt``);
3. nothing: the look-ahead's cells are cut (``Commit.cut``) and the tokens are pending.

Rows are opaque here (a numpy row, a torch row, a top-k dict): the ledger only keeps,
moves and drops them, at most ``max_rows`` past the first and the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fusion.engine import TopLogprobs

R = TypeVar("R")  # a distribution row, as the engine keeps it
H = TypeVar("H")  # an engine's handle of a branch's cached tokens


@dataclass(frozen=True)
class Branch(Generic[H, R]):
    """One candidate scored after the context.

    ``rows[k]`` is the distribution after ``ids + more[:k]`` (``rows[0]``: right after the
    candidate); ``more`` are tokens the engine generated after it (vLLM's scoring
    requests), with their log-probs."""

    start: int
    ids: tuple[int, ...]
    handle: H
    rows: tuple[R, ...] = ()
    more: tuple[int, ...] = ()
    more_lp: tuple[float, ...] = ()


@dataclass(frozen=True)
class Commit(Generic[H, R]):
    """The cache operations one commit implies, for the engine to apply in this order:
    drop the context's cells from ``cut`` on (None: keep them), copy ``adopt``'s cells
    into the context at ``[adopt.start, adopt.start + len(adopt.ids))``, give ``free``
    back (every branch but the adopted one)."""

    cut: int | None = None
    adopt: Branch[H, R] | None = None
    free: tuple[Branch[H, R], ...] = ()


@dataclass
class Ledger(Generic[H, R]):
    """One request's bookkeeping (layout in the module docstring)."""

    ids: list[int]
    cacheless: bool = False
    max_rows: int = 4
    done: int = 0
    ahead: list[int] = field(default_factory=list)
    ahead_lp: list[float] = field(default_factory=list)
    ahead_top: list[TopLogprobs | None] = field(default_factory=list)
    ahead_done: int = 0
    rows: dict[int, R] = field(default_factory=dict)
    branches: list[Branch[H, R]] = field(default_factory=list)

    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.ids)
        if self.cacheless:
            self.done = len(self.ids)

    # -- reading ----------------------------------------------------------------------
    @property
    def context_len(self) -> int:
        """Committed tokens, in the cache or pending."""
        return len(self.ids)

    @property
    def pending(self) -> list[int]:
        """Committed tokens the cache lacks: the next call decodes them first."""
        return self.ids[self.done :]

    @property
    def unfed(self) -> list[int]:
        """Look-ahead tokens generated but not in the cache."""
        return self.ahead[self.ahead_done :]

    @property
    def ctx_row(self) -> R | None:
        """The distribution after the committed context, if kept."""
        return self.rows.get(0)

    @property
    def tail(self) -> R | None:
        """The distribution after the whole look-ahead (where the next token is picked
        from), if kept."""
        return self.rows.get(len(self.ahead))

    @property
    def last_id(self) -> int:
        """The last token in the cache's context (-1: none)."""
        return self.ids[self.done - 1] if self.done else -1

    def tops(self, n: int) -> tuple[TopLogprobs, ...]:
        """The kept tops of the first ``n`` look-ahead tokens (a request's calls all ask
        for them or none does, so each was kept when it was picked)."""
        tops = self.ahead_top[:n]
        if any(t is None for t in tops):
            raise AssertionError("look-ahead without the top log-probs its request asks for")
        return tuple(t for t in tops if t is not None)

    def check(self) -> None:
        """The layout's invariants (cheap; engines call it after every call)."""
        problems = [
            what
            for ok, what in (
                (0 <= self.done <= len(self.ids), "done outside the context"),
                (len(self.ahead_lp) == len(self.ahead), "look-ahead log-probs out of step"),
                (len(self.ahead_top) == len(self.ahead), "look-ahead tops out of step"),
                (0 <= self.ahead_done <= len(self.ahead), "look-ahead done beyond look-ahead"),
                (not (self.pending and self.ahead), "look-ahead after pending context"),
                (not (self.pending and self.rows), "a row after pending context"),
                (all(0 <= k <= self.ahead_done for k in self.rows), "a row past the cache"),
                (len(self.rows) <= self.max_rows + 2, "more rows than kept"),
                (
                    all(b.start == len(self.ids) for b in self.branches),
                    "a branch scored at another context length",
                ),
                (
                    not self.cacheless
                    or (self.done == len(self.ids) and self.ahead_done == len(self.ahead)),
                    "a cacheless ledger with tokens outside its cache",
                ),
            )
            if not ok
        ]
        if problems:
            raise AssertionError("; ".join(problems))

    # -- what calls learn -------------------------------------------------------------
    def decoded_pending(self, row: R | None = None) -> None:
        """The pending context is in the cache now; ``row`` is the distribution after it."""
        self.done = len(self.ids)
        if row is not None:
            self.rows[0] = row

    def keep_ctx_row(self, row: R) -> None:
        """The distribution after the context, derived when it was not kept."""
        assert not self.pending
        self.rows[0] = row

    def restored(self, n: int) -> None:
        """The first ``n`` context tokens were copied in from elsewhere (a prefix cache);
        the rest stays pending. Only a fresh state restores."""
        assert self.done == 0 and not self.ahead and 0 <= n <= len(self.ids)
        self.done = n

    def unfeed_last(self) -> int:
        """Make the last context token pending again, so that decoding it gives the row
        after the context (which was not kept). Returns the position of its cell, which
        the engine drops now (a call cut short before the decode leaves no hole)."""
        assert not (self.pending or self.ahead or self.rows) and self.done > 0
        self.done -= 1
        return self.done

    def push(
        self, tok: int, lp: float, row: R | None = None, top: TopLogprobs | None = None
    ) -> None:
        """A look-ahead token picked from ``row`` (the distribution after the look-ahead
        so far, kept as such), with the most likely tokens there when reported."""
        assert not self.pending
        if row is not None:
            self.rows[len(self.ahead)] = row
        self.ahead.append(tok)
        self.ahead_lp.append(lp)
        self.ahead_top.append(top)
        if self.cacheless:
            self.ahead_done = len(self.ahead)
        self._trim()

    def fed_ahead(self, row: R | None = None) -> None:
        """Every look-ahead token is in the cache now; ``row`` follows the last one."""
        self.ahead_done = len(self.ahead)
        if row is not None:
            self.rows[len(self.ahead)] = row
        self._trim()

    def clear_ahead(self) -> Commit[H, R]:
        """Forget the look-ahead (its cells are cut) and the rows past the context."""
        cut = None if self.cacheless or not self.ahead_done else self.done
        self.ahead, self.ahead_lp, self.ahead_top, self.ahead_done = [], [], [], 0
        self.rows = {0: self.rows[0]} if 0 in self.rows else {}
        return Commit(cut=cut)

    def add_branch(self, branch: Branch[H, R]) -> None:
        assert branch.start == len(self.ids), "a branch is scored after the whole context"
        self.branches.append(branch)

    def take_branches(self) -> list[Branch[H, R]]:
        """Every branch, now the engine's to give back (a new scoring round's start)."""
        out, self.branches = self.branches, []
        return out

    # -- commit -----------------------------------------------------------------------
    def commit(self, ids: Sequence[int]) -> Commit[H, R]:
        """Append ``ids`` to the context (the order of choices is in the module
        docstring); every branch leaves the ledger, to be adopted or given back."""
        new = tuple(ids)
        n, start = len(new), len(self.ids)
        branches, self.branches = self.branches, []
        if n == 0:
            return Commit(free=tuple(branches))
        own = not self.pending and tuple(self.ahead[:n]) == new
        branch = next(
            (b for b in branches if b.start == start and b.ids == new and not self.pending), None
        )
        if own and (branch is None or len(self.ahead) - n >= len(branch.more)):
            self._commit_own(new)
            return Commit(free=tuple(branches))
        if branch is not None:
            self._adopt(branch)
            return Commit(
                cut=start, adopt=branch, free=tuple(b for b in branches if b is not branch)
            )
        cut = None if self.cacheless else self.done
        self.ids.extend(new)
        if self.cacheless:
            self.done = len(self.ids)
        self._drop_ahead()
        return Commit(cut=cut, free=tuple(branches))

    def _commit_own(self, new: tuple[int, ...]) -> None:
        n = len(new)
        kept = min(self.ahead_done, n)  # the rest of the tokens were never decoded
        self.ids.extend(new)
        self.done += kept
        self.ahead_done -= kept
        if kept < n:  # pending now: nothing past them is in the cache
            self._drop_ahead()
            return
        self.ahead, self.ahead_lp = self.ahead[n:], self.ahead_lp[n:]
        self.ahead_top = self.ahead_top[n:]
        self.rows = {k - n: r for k, r in self.rows.items() if k >= n}

    def _adopt(self, branch: Branch[H, R]) -> None:
        self.ids.extend(branch.ids)
        self.done = len(self.ids)
        self.ahead, self.ahead_lp = list(branch.more), list(branch.more_lp)
        self.ahead_top = [None] * len(branch.more)  # vLLM's: its rows are the tops
        self.ahead_done = len(self.ahead) if self.cacheless else 0
        self.rows = {k: r for k, r in enumerate(branch.rows) if k <= self.ahead_done}
        self._trim()

    def _drop_ahead(self) -> None:
        self.ahead, self.ahead_lp, self.ahead_top, self.ahead_done, self.rows = [], [], [], 0, {}

    def _trim(self) -> None:
        """Keep the row after the context, the tail, and the last ``max_rows`` others
        (rows may be large: 4 bytes per vocabulary entry)."""
        inner = sorted(k for k in self.rows if 0 < k < len(self.ahead))
        for k in inner[: max(0, len(inner) - self.max_rows)]:
            del self.rows[k]
