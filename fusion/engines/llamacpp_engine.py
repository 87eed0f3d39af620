"""llama.cpp backend of the engine protocol: GGUF weights, many requests per decode.

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
Gemma): committing the first ``k`` look-ahead tokens makes it the new ``ctx_row``.

Scoring branches the context: each candidate gets a sequence that shares the committed
cells (a metadata copy) and decodes the candidate on it. With ``ctx_row`` known the
branch shares ``[0, n_past)`` and decodes ``candidate``: its first token's log-prob is
read from ``ctx_row``, its rows give the rest and the row after it. Otherwise it shares
``[0, n_past - 1)`` and decodes ``[last_id, *candidate]``, one more token per candidate.
All candidates (and any undecoded look-ahead) go in one decode. Committing a scored
candidate copies its branch's cells into the request's sequence: no recomputation.
Committing this model's own candidate moves ``n_past`` over its look-ahead.

``tokens`` is the whole committed context (``tokens[:n_past]`` is in the cells, the rest
is ``pending``). A released state's cells ``[0, n_past)`` go to the prefix cache
(``llamacpp_prefix``); a new state whose prompt starts the same way copies them and
decodes only the rest.

``commit`` only does bookkeeping on the caller's thread; the cache operations it implies
(``ops``) run on the decode thread at the start of the state's next call, so a commit
never waits behind other requests' decodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusion.engine import GREEDY, EngineError, Generation, Sampling, StopCheck
from fusion.engines.llamacpp_runtime import (
    Feed,
    Job,
    LlamaError,
    LlamaRuntime,
    log_softmax,
    logsumexp,
)

log = logging.getLogger(__name__)

# Look-ahead rows kept per request, for the last positions: a candidate ends where a word
# boundary showed, usually one or two tokens before its model's look-ahead does.
AHEAD_ROWS = 4

PROBE_TEXT = "Natalia sold clips to 48 of her friends in April.\n  Größe: 3.5 km²; 你好! <b>"


@dataclass(frozen=True)
class _Branch:
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
    branches: list[_Branch] = field(default_factory=list)
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


class LlamaCppEngine:
    """Engine protocol on llama.cpp (llama-cpp-python's low-level API)."""

    def __init__(
        self,
        name: str,
        gguf: str | Path,
        tokenizer_dir: str | Path,
        *,
        threads: int = 1,
        n_ctx: int = 16384,
        max_requests: int = 16,
        branches_per_request: int = 3,
        n_batch: int = 512,
        prefix_cache: int = 8,
        score_from_ctx_row: bool = True,
    ) -> None:
        self.name = name
        self.gguf = Path(gguf)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.threads = threads
        self.n_ctx = n_ctx
        self.max_requests = max_requests
        self.branches = branches_per_request
        self.n_batch = n_batch
        self.prefix_cache = prefix_cache
        # off: every branch re-decodes the last context token (tests compare the two)
        self.score_from_ctx_row = score_from_ctx_row
        self.max_model_len = 0
        self.open_states = 0
        self.rt: LlamaRuntime | None = None
        self._slots: asyncio.Semaphore | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.rt = await asyncio.to_thread(self._load)
        self._slots = asyncio.Semaphore(self.max_requests)

    def _load(self) -> LlamaRuntime:
        started = time.monotonic()
        rt = LlamaRuntime(
            self.gguf,
            threads=self.threads,
            n_ctx=self.n_ctx,
            n_seq_max=min(256, self.max_requests * (1 + self.branches)),
            n_batch=self.n_batch,
            name=self.name,
            prefix_entries=self.prefix_cache,
        )
        try:
            check_vocabulary(rt, self.tokenizer_dir, self.name)
        except BaseException:
            rt.close()
            raise
        self.max_model_len = min(rt.n_ctx_train or rt.n_ctx, rt.n_ctx)
        log.info(
            "engine %s: llama.cpp loaded %s in %.1f s (%d threads, %d sequences, %d KV cells)",
            self.name,
            self.gguf.name,
            time.monotonic() - started,
            self.threads,
            rt.n_seq_max,
            rt.n_ctx,
        )
        return rt

    async def shutdown(self) -> None:
        rt, self.rt = self.rt, None
        if rt is not None:
            await asyncio.to_thread(rt.close)

    async def check_health(self) -> None:
        if self.rt is None:
            raise EngineError(f"engine {self.name} is not loaded")
        if not self.rt.alive:
            raise EngineError(f"engine {self.name}: its decode thread stopped")

    # -- protocol -----------------------------------------------------------------------
    async def open(self, request_id: str, prompt_ids: Sequence[int]) -> LlamaState:
        if self.rt is None or self._slots is None:
            raise EngineError(f"engine {self.name} is not loaded")
        if not prompt_ids:
            raise EngineError(f"engine {self.name}: empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise EngineError(
                f"engine {self.name}: prompt of {len(prompt_ids)} tokens leaves no room "
                f"in its {self.max_model_len}-token context"
            )
        await self._slots.acquire()  # back-pressure: wait for a free request slot
        self.open_states += 1
        return LlamaState(request_id=request_id, pending=list(prompt_ids), tokens=list(prompt_ids))

    async def generate(
        self,
        state: LlamaState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling = GREEDY,
    ) -> Generation:
        job = self._generate(state, max_tokens, stop_ids, should_stop, sampling)
        result: Generation = await self._submit(state, job)
        return result

    async def score(
        self, state: LlamaState, candidates: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        if not candidates:
            return []
        job = self._score(state, [tuple(c) for c in candidates])
        result: list[list[float]] = await self._submit(state, job)
        return result

    async def commit(self, state: LlamaState, ids: Sequence[int]) -> None:
        _commit(state, tuple(ids))

    async def release(self, state: LlamaState) -> None:
        if state.cancelled:
            return
        state.cancelled = True  # its running call stops at the next tick
        self.open_states -= 1
        if self._slots is not None:
            self._slots.release()
        rt = self.rt
        if rt is not None:  # freed on the decode thread, not waited for
            rt.run_soon(lambda: _free(rt, state))

    # -- jobs (run on the decode thread) ---------------------------------------------------
    async def _submit(self, state: LlamaState, job: Job) -> Any:
        if self.rt is None:
            raise EngineError(f"engine {self.name} is not loaded")
        if state.cancelled:
            raise EngineError(f"engine {self.name}: request {state.request_id} was released")
        stop = False
        future = self.rt.submit(job, lambda: stop or state.cancelled)
        try:
            result = await future
        except asyncio.CancelledError:
            stop = True  # a timed-out or abandoned call stops at the next tick
            raise
        except LlamaError as exc:
            raise EngineError(f"engine {self.name}: {exc}") from exc
        state.check()
        return result

    def _ready(self, st: LlamaState) -> Generator[list[Feed], list[np.ndarray], None]:
        """Prelude of every call: a sequence, the deferred cache operations, no branches,
        and the pending context decoded (in chunks)."""
        rt = self.rt
        assert rt is not None
        while st.seq is None:
            st.seq = rt.take_seq()
            if st.seq is None:
                yield []  # every sequence is busy: wait a tick
            elif st.n_past == 0:
                _reuse_prefix(rt, st)
        for op in st.ops:
            op(rt)
        st.ops.clear()
        _drop_branches(rt, st)
        yield from self._decode_pending(st)

    def _decode_pending(self, st: LlamaState) -> Generator[list[Feed], list[np.ndarray], None]:
        """Decode the pending context in chunks; its last row is ``tail`` and ``ctx_row``."""
        rt = self.rt
        assert rt is not None and st.seq is not None
        chunk = max(1, rt.n_batch // 2)
        while st.pending:
            piece, rest = st.pending[:chunk], st.pending[chunk:]
            rows = yield [Feed(st.seq, st.n_past, tuple(piece), "none" if rest else "last")]
            st.n_past += len(piece)
            st.last_id = piece[-1]
            st.pending = rest
            if not rest:
                st.tail = st.ctx_row = log_softmax(rows[0][-1])

    def _generate(
        self,
        st: LlamaState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling,
    ) -> Generator[list[Feed], list[np.ndarray], Generation]:
        yield from self._ready(st)
        assert st.seq is not None
        out: list[int] = []
        lps: list[float] = []
        stopped_on: int | None = None
        kept = len(st.ahead)  # look-ahead from an earlier call, replayed first
        while len(out) < max_tokens:
            i = len(out)
            if i >= len(st.ahead):
                if st.tail is None:
                    yield from self._decode_ahead(st)
                row = st.tail
                assert row is not None
                tok = _pick(st, row, sampling)
                _keep_row(st, row)
                st.ahead.append(tok)
                st.ahead_lp.append(float(row[tok]))
                st.tail = None
            out.append(st.ahead[i])
            lps.append(st.ahead_lp[i])
            if out[-1] in stop_ids:
                stopped_on = out[-1]
                break
            if should_stop(out):
                break
        return Generation(
            ids=tuple(out),
            logprobs=tuple(lps),
            stopped_on=stopped_on,
            reused=min(kept, len(out)),
        )

    def _decode_ahead(self, st: LlamaState) -> Generator[list[Feed], list[np.ndarray], None]:
        """Make ``tail`` known: decode the look-ahead not in the cache yet (or, with none,
        take ``ctx_row``, or failing that decode the last committed token again)."""
        rt = self.rt
        assert rt is not None and st.seq is not None
        todo = st.ahead[st.ahead_fed :]
        if not todo:
            assert not st.ahead, "look-ahead decoded without its row"
            if st.ctx_row is not None:
                st.tail = st.ctx_row
                return
            # The last context token goes back to pending, so that a call cut short here
            # leaves a state that says its cell is gone (n_past - 1 is never a hole).
            rt.drop_from(st.seq, st.n_past - 1)
            st.n_past -= 1
            st.pending = [st.last_id]
            st.last_id = st.tokens[st.n_past - 1] if st.n_past else -1
            yield from self._decode_pending(st)
            return
        rows = yield [Feed(st.seq, st.n_past + st.ahead_fed, tuple(todo), "last")]
        st.ahead_fed = len(st.ahead)
        st.tail = log_softmax(rows[0][-1])

    def _score(
        self, st: LlamaState, candidates: list[tuple[int, ...]]
    ) -> Generator[list[Feed], list[np.ndarray], list[list[float]]]:
        yield from self._ready(st)
        rt = self.rt
        assert rt is not None and st.seq is not None
        results: list[list[float]] = [[] for _ in candidates]
        todo = list(range(len(candidates)))
        ctx = st.ctx_row if self.score_from_ctx_row else None
        while todo:
            want = min(len(todo), self.branches)
            seqs: list[int] = []
            while len(seqs) < want:  # all or nothing: never hold some and wait for more
                if rt.free_seqs >= want:
                    seqs = [s for s in (rt.take_seq() for _ in range(want)) if s is not None]
                else:
                    yield []
            _drop_branches(rt, st)  # an earlier round's (only the last round's are kept)
            now, todo = todo[:want], todo[want:]
            try:
                streams = [
                    _branch_off(rt, st, ctx, seq, i, candidates[i], results[i])
                    for i, seq in zip(now, seqs)
                ]
                yield from self._decode_streams(st, streams, candidates, results)
            except BaseException:  # stopped between decodes: its branches are no one's yet
                for seq in seqs:
                    rt.give_seq(seq)
                raise
            for x in streams:
                assert x.after is not None
                st.branches.append(_Branch(candidates[x.index], x.seq, x.after))
        return results

    def _decode_streams(
        self,
        st: LlamaState,
        streams: list[_Stream],
        candidates: list[tuple[int, ...]],
        results: list[list[float]],
    ) -> Generator[list[Feed], list[np.ndarray], None]:
        """Decode one round's candidates on their branches, with any undecoded look-ahead
        riding along (its row for free)."""
        rt = self.rt
        assert rt is not None and st.seq is not None
        while any(x.left for x in streams):
            feeds: list[Feed] = []
            owners: list[_Stream | None] = []
            room = rt.n_batch
            extra = st.ahead[st.ahead_fed :]
            if extra and len(extra) <= room:
                feeds.append(Feed(st.seq, st.n_past + st.ahead_fed, tuple(extra), "last"))
                owners.append(None)
                room -= len(extra)
            for x in streams:  # long candidates (Rerank) go in batch-sized pieces
                if x.left and room:
                    piece, x.left = x.left[:room], x.left[room:]
                    feeds.append(Feed(x.seq, x.pos, tuple(piece), "all"))
                    owners.append(x)
                    x.pos += len(piece)
                    room -= len(piece)
            rows = yield feeds
            for owner, r in zip(owners, rows):
                if owner is None:
                    st.ahead_fed = len(st.ahead)
                    st.tail = log_softmax(r[-1])
                else:
                    owner.take(r, candidates[owner.index], results[owner.index])


def _branch_off(
    rt: LlamaRuntime,
    st: LlamaState,
    ctx: np.ndarray | None,
    seq: int,
    index: int,
    cand: tuple[int, ...],
    out: list[float],
) -> _Stream:
    """Branch the context into ``seq`` for one candidate: with the row after the context
    (``ctx``) the branch shares all of it and decodes only the candidate, whose first
    log-prob comes from that row; without, it decodes ``[last_id, *candidate]``."""
    assert st.seq is not None
    if ctx is None:
        rt.copy_span(st.seq, seq, 0, st.n_past - 1)
        return _Stream(index, seq, st.n_past - 1, [st.last_id, *cand])
    rt.copy_span(st.seq, seq, 0, st.n_past)
    if not cand:
        return _Stream(index, seq, st.n_past, [], after=ctx)
    out.append(float(ctx[cand[0]]))
    return _Stream(index, seq, st.n_past, list(cand), done=1)


@dataclass
class _Stream:
    """One candidate being scored on its branch: ``left`` is still to decode, from ``pos``;
    ``done`` counts the rows of the candidate known so far (the first one may be
    ``ctx_row``): the next row received predicts ``cand[done]``."""

    index: int
    seq: int
    pos: int
    left: list[int]
    done: int = 0
    after: np.ndarray | None = None  # log-probs after the whole candidate

    def take(self, rows: np.ndarray, cand: tuple[int, ...], out: list[float]) -> None:
        """Log-probs of the candidate tokens these rows predict, and the row after it."""
        lse = logsumexp(rows)
        for r in range(len(rows)):
            k = self.done + r
            if k < len(cand):
                out.append(float(rows[r, cand[k]] - lse[r]))
            else:
                self.after = log_softmax(rows[r])
        self.done += len(rows)


def _commit(st: LlamaState, ids: tuple[int, ...]) -> None:
    """Bookkeeping of a commit; its cache operations are queued in ``st.ops``."""
    n = len(ids)
    if n == 0:
        return
    st.tokens.extend(ids)
    branch = next((b for b in st.branches if b.ids == ids), None)
    seq = st.seq
    if not st.pending and tuple(st.ahead[:n]) == ids:
        kept = min(st.ahead_fed, n)
        st.n_past += kept
        st.ahead_fed -= kept
        if kept:
            st.last_id = ids[kept - 1]
        # the row after the candidate: the one the next look-ahead token was picked from
        row = st.tail if n == len(st.ahead) else st.ahead_rows.get(n)
        st.ctx_row = row if kept == n else None
        if n > kept:  # the last generated token was never decoded
            st.pending = list(ids[kept:])
        st.ahead, st.ahead_lp = st.ahead[n:], st.ahead_lp[n:]
        st.ahead_rows = {k - n: r for k, r in st.ahead_rows.items() if k > n}
    elif branch is not None and not st.pending and seq is not None:
        start, src = st.n_past, branch.seq

        def adopt(rt: LlamaRuntime) -> None:  # the branch's cells become the context's
            rt.drop_from(seq, start)
            rt.copy_span(src, seq, start, start + n)

        st.ops.append(adopt)
        st.n_past += n
        st.last_id = ids[-1]
        st.tail = st.ctx_row = branch.after
        st.ahead, st.ahead_lp, st.ahead_fed, st.ahead_rows = [], [], 0, {}
    else:
        if seq is not None:
            start = st.n_past
            st.ops.append(lambda rt: rt.drop_from(seq, start))
        st.pending.extend(ids)
        st.ahead, st.ahead_lp, st.ahead_fed, st.ahead_rows = [], [], 0, {}
        st.tail = st.ctx_row = None
    # unused branches go back at the next call (after any copy out of them)
    st.check()


def _keep_row(st: LlamaState, row: np.ndarray) -> None:
    """Keep the row the next look-ahead token is picked from: the first one's is the row
    after the context; of the others only the last ``AHEAD_ROWS`` are kept."""
    k = len(st.ahead)
    if k == 0:
        st.ctx_row = row
        return
    st.ahead_rows[k] = row
    while len(st.ahead_rows) > AHEAD_ROWS:
        del st.ahead_rows[min(st.ahead_rows)]


def _drop_branches(rt: LlamaRuntime, st: LlamaState) -> None:
    for b in st.branches:
        rt.give_seq(b.seq)
    st.branches = []


def _reuse_prefix(rt: LlamaRuntime, st: LlamaState) -> None:
    """Start a fresh state from the prefix cache's longest match of its prompt."""
    assert st.seq is not None
    hit = rt.prefix.lookup(st.pending)
    if hit is None:
        return
    src, n = hit
    # At least the prompt's last token is left pending: its decode gives ``ctx_row``, which
    # a fresh state lacks. (With none left, the re-decode of ``last_id`` would cover it.)
    rt.copy_span(src, st.seq, 0, n)
    st.n_past = n
    st.last_id = st.pending[n - 1]
    st.pending = st.pending[n:]


def _free(rt: LlamaRuntime, st: LlamaState) -> None:
    """Release a state's sequences; its decoded context goes to the prefix cache."""
    seq, st.seq = st.seq, None
    try:
        for op in st.ops:  # a commit's pending copy out of a branch
            op(rt)
        ok = seq is not None
    except LlamaError:
        ok = False
    st.ops.clear()
    _drop_branches(rt, st)
    st.tail = st.ctx_row = None
    st.ahead_rows = {}
    if seq is None:
        return
    if ok and st.n_past:
        rt.drop_from(seq, st.n_past)  # look-ahead is not context
        # a call cut short can leave the last cell undecoded: keep only whole contexts
        ok = rt.seq_end(seq) == st.n_past
    if ok and st.n_past:
        rt.prefix.keep(seq, st.tokens[: st.n_past])
    else:
        rt.give_seq(seq)


def _pick(st: LlamaState, row: np.ndarray, sampling: Sampling) -> int:
    if sampling.greedy:
        return int(np.argmax(row))
    if st.rng is None:
        st.rng = np.random.default_rng(sampling.seed)
    logits = row.astype(np.float64) / sampling.temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < sampling.top_p
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_probs[keep]
        probs /= probs.sum()
    return int(st.rng.choice(len(probs), p=probs))


def check_vocabulary(rt: LlamaRuntime, tokenizer_dir: Path, name: str) -> None:
    """The GGUF's vocabulary must be the one alignment and templates use (HF tokenizer)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    size = tok.get_vocab_size(with_added_tokens=True)
    ours = tok.encode(PROBE_TEXT, add_special_tokens=False).ids
    theirs = rt.tokenize(PROBE_TEXT)
    if size > rt.n_vocab or ours != theirs:
        raise EngineError(
            f"engine {name}: the GGUF's vocabulary ({rt.n_vocab} tokens) does not match the "
            f"tokenizer in {tokenizer_dir} ({size} tokens); a probe text encodes as "
            f"{theirs[:12]} in llama.cpp and {ours[:12]} in the tokenizer. Use the tokenizer "
            "made from the same GGUF file."
        )
