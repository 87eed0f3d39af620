"""The shared commit bookkeeping (``fusion.engines.ledger``), driven as engines drive it.

A toy engine keeps a "cache" of token cells and "rows" that name what they follow, and
applies each ``Commit`` the way llama.cpp does (cut, copy the adopted branch's cells in,
give the others back). Random sequences of generate / score / commit / gated commit /
release then check, after every call, the ledger's invariants, that the cache holds
exactly the context and look-ahead the ledger says, and that every kept row follows what
the ledger says it follows. The same kind of sequences run on the real llama.cpp engine in
test_llamacpp_engine.py (test_random_steps_keep_every_decode_valid).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.engines.ledger import Branch, Commit, Ledger

Row = tuple[int, ...]  # a toy row: the tokens it is the distribution after


@dataclass
class ToyEngine:
    """An engine at the boundary: cells per sequence, rows that say what they follow."""

    book: Ledger[int, Row]
    cells: list[int] = field(default_factory=list)  # the request's sequence
    handles: dict[int, list[int]] = field(default_factory=dict)  # branch seq -> cells
    next_handle: int = 0
    decoded: int = 0
    cacheless: bool = False

    def apply(self, plan: Commit[int, Row]) -> None:
        if plan.cut is not None:
            del self.cells[plan.cut :]
        if plan.adopt is not None:
            b = plan.adopt
            assert len(self.cells) == b.start, "a branch adopted where the context does not end"
            self.cells += self.handles.pop(b.handle)[b.start : b.start + len(b.ids)]
        for b in plan.free:
            del self.handles[b.handle]

    def row_after(self) -> Row:
        return tuple(self.cells)

    def decode_pending(self) -> None:
        book = self.book
        assert self.cells == book.ids[: book.done]
        self.cells += book.pending
        self.decoded += len(book.pending)
        book.decoded_pending(self.row_after())

    def generate(self, n: int, pick: int) -> list[int]:
        book = self.book
        for b in book.take_branches():
            del self.handles[b.handle]
        if book.pending:
            self.decode_pending()
        out = []
        for i in range(n):
            if i >= len(book.ahead):
                if book.tail is None:
                    if book.unfed:
                        self.cells += book.unfed
                        self.decoded += len(book.unfed)
                        book.fed_ahead(self.row_after())
                    else:
                        del self.cells[book.unfeed_last() :]
                        self.decode_pending()
                row = book.tail
                assert row is not None
                book.push((pick + i) % 7 + 10, -1.0, row)
            out.append(book.ahead[i])
        return out

    def score(self, cands: list[tuple[int, ...]]) -> None:
        book = self.book
        for b in book.take_branches():
            del self.handles[b.handle]
        if book.pending:
            self.decode_pending()
        if book.unfed:  # rides along, as on llama.cpp and transformers
            self.cells += book.unfed
            book.fed_ahead(self.row_after())
        for c in cands:
            h = self.next_handle
            self.next_handle += 1
            self.handles[h] = book.ids[: book.done] + list(c)
            book.add_branch(Branch(book.context_len, c, h, (tuple(self.handles[h]),)))

    def check(self) -> None:
        book = self.book
        book.check()
        assert self.cells == book.ids[: book.done] + book.ahead[: book.ahead_done]
        for k, row in book.rows.items():
            assert row == tuple(book.ids + book.ahead[:k]), f"row {k} follows other tokens"
        assert {b.handle for b in book.branches} == set(self.handles)


token = st.integers(0, 12)
candidate = st.lists(token, min_size=1, max_size=4).map(tuple)
step = st.one_of(
    st.tuples(st.just("generate"), st.integers(1, 5), st.integers(0, 6)),
    st.tuples(st.just("score"), st.lists(candidate, min_size=1, max_size=3)),
    st.tuples(st.just("commit_own"), st.integers(1, 5)),
    st.tuples(st.just("commit_scored"), st.integers(0, 2)),
    st.tuples(st.just("commit_other"), candidate),
    st.tuples(st.just("gated_commit_of_an_old_candidate"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(prompt=st.lists(token, min_size=1, max_size=5), steps=st.lists(step, max_size=25))
def test_random_calls_keep_the_cache_and_rows_what_the_ledger_says(prompt, steps):
    eng = ToyEngine(Ledger(list(prompt), max_rows=2))
    last_scored: list[tuple[int, ...]] = []
    old_scored: list[tuple[int, ...]] = []
    for kind, *args in steps:
        if kind == "generate":
            eng.generate(args[0], args[1])
        elif kind == "score":
            eng.score(args[0])
            old_scored, last_scored = last_scored, list(args[0])
        elif kind == "commit_own" and eng.book.ahead:
            eng.apply(eng.book.commit(eng.book.ahead[: args[0]]))
        elif kind == "commit_scored" and last_scored:
            eng.apply(eng.book.commit(last_scored[args[0] % len(last_scored)]))
            last_scored = []
        elif kind == "commit_other":
            eng.apply(eng.book.commit(args[0]))
        elif kind == "gated_commit_of_an_old_candidate" and old_scored:
            # the gate commits without scoring: an earlier step's candidate must not be
            # taken for this step's (issue 21, item 1)
            eng.apply(eng.book.commit(old_scored[0]))
        eng.check()
    # release: every branch goes back
    eng.apply(Commit(free=tuple(eng.book.take_branches())))
    assert eng.handles == {}


def test_a_commit_adopts_only_a_branch_scored_after_the_whole_context():
    """Regression (issue 21, item 1): a gated step commits text equal to a candidate
    scored in an earlier step; adopting that branch put its cells at the wrong positions
    (a hole in the sequence, then llama_decode failing for every request in the batch)."""
    eng = ToyEngine(Ledger([1, 2, 3]))
    eng.generate(2, 0)
    eng.score([(5, 6), (7,)])
    eng.apply(eng.book.commit((5, 6)))  # a fused step
    eng.check()
    plan = eng.book.commit((7,))  # a gated step: no call since the last scoring
    assert plan.adopt is None and plan.free == ()
    eng.apply(plan)
    eng.check()
    eng.generate(1, 0)
    eng.check()
    assert eng.cells[:6] == [1, 2, 3, 5, 6, 7]


def test_committing_its_own_look_ahead_keeps_the_cells_and_the_row_after_them():
    eng = ToyEngine(Ledger([1, 2]))
    ahead = eng.generate(3, 0)
    eng.score([tuple(ahead[:2])])  # the look-ahead's last token rides along
    before = eng.decoded
    eng.apply(eng.book.commit(ahead[:2]))
    eng.check()
    assert eng.book.pending == [] and eng.book.ahead == ahead[2:]
    assert eng.book.ctx_row == (1, 2, *ahead[:2])
    eng.generate(1, 0)
    assert eng.decoded == before  # replayed, nothing decoded


def test_a_cacheless_ledger_adopts_the_tokens_a_scoring_request_saw_further():
    book: Ledger[None, Row] = Ledger([1], cacheless=True)
    book.push(5, -0.1, (1,))
    book.add_branch(Branch(1, (5,), None, ((9,), (10,)), more=(6, 7), more_lp=(-0.2, -0.3)))
    plan = book.commit((5,))
    assert plan.adopt is not None and book.ahead == [6, 7] and book.ids == [1, 5]
    assert book.rows == {0: (9,), 1: (10,)}
    book.check()


def test_look_ahead_keeps_the_most_likely_tokens_of_each_position_it_replays():
    """A request that reports top log-probs replays look-ahead whose rows a few-row ledger
    no longer keeps: the tops stay with the tokens, through a commit of the first ones."""
    book: Ledger[int, Row] = Ledger([1, 2], max_rows=0)
    book.decoded_pending((1, 2))
    for k, tok in enumerate((5, 6, 7)):
        book.push(tok, -0.1 * k, (1, 2, *range(k)), ((tok, -0.1 * k), (0, -3.0)))
    book.fed_ahead((9,))
    book.check()
    assert book.tops(3) == (((5, 0.0), (0, -3.0)), ((6, -0.1), (0, -3.0)), ((7, -0.2), (0, -3.0)))
    book.commit((5,))
    book.check()
    assert book.ahead == [6, 7] and book.tops(2)[0] == ((6, -0.1), (0, -3.0))
    book.commit((8,))  # not its own: the look-ahead and its tops go
    assert book.ahead == book.ahead_top == []
    book.decoded_pending((1, 2, 5, 8))
    book.push(4, -0.5)  # a request that reports none
    with pytest.raises(AssertionError, match="top log-probs"):
        book.tops(1)
