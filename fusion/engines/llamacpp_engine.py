"""llama.cpp backend of the engine protocol: GGUF weights, many requests per decode.

Each request state is one llama.cpp sequence; what is in it (the context, look-ahead,
rows, branches) is the shared bookkeeping of ``ledger``, and its cache operations and
the prefix cache are in ``llamacpp_state``. This module runs the calls: each is a job on the
runtime's decode thread (``llamacpp_runtime``), a generator yielding the feeds of its
next decode and receiving their rows, so that one ``llama_decode`` serves many requests.

Scoring branches the context: each candidate gets a sequence that shares the committed
cells (a metadata copy) and decodes the candidate on it. With the row after the context
kept the branch shares ``[0, done)`` and decodes ``candidate``: its first token's
log-prob is read from that row, its rows give the rest and the row after it. Otherwise
it shares ``[0, done - 1)`` and decodes ``[last_id, *candidate]``, one more token each.
All candidates (and any undecoded look-ahead) go in one decode. Committing a scored
candidate copies its branch's cells into the request's sequence: no recomputation.
Committing this model's own candidate moves the context over its look-ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion.capacity import Pool
from fusion.engine import GREEDY, EngineError, Generation, Sampling, StopCheck, TopLogprobs
from fusion.engines.ledger import Branch
from fusion.engines.llamacpp_runtime import (
    Feed,
    Job,
    LlamaError,
    LlamaRuntime,
    log_softmax,
    logsumexp,
)
from fusion.engines.llamacpp_state import LlamaState
from fusion.engines.sampler import shaped_logits, shift_of, top_of

log = logging.getLogger(__name__)

# a scoring job's answer: each candidate's log-probs, and the tops at its positions if asked
_Scores = tuple[list[list[float]], list[list[TopLogprobs]]]

PROBE_TEXT = "Natalia sold clips to 48 of her friends in April.\n  Größe: 3.5 km²; 你好! <b>"


class LlamaCppEngine:
    """Engine protocol on llama.cpp (llama-cpp-python's low-level API)."""

    constrains = True  # honours Sampling.constraint (grammars) in its own sampling

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
        split_below: int = 7,
        max_threads: int | None = None,
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
        self.split_below = split_below
        self.max_threads = max_threads
        self.max_model_len = 0
        self.open_states = 0
        self.rt: LlamaRuntime | None = None
        self._slots: asyncio.Semaphore | None = None
        self._cells: Pool | None = None  # KV cells reserved by open requests

    @property
    def kv_cells(self) -> int | None:
        """KV cells every open state shares (each reserves its prompt and room)."""
        return None if self.rt is None else self.rt.n_ctx

    @property
    def shares_prefixes(self) -> bool:
        """A released state's context stays for a new state on the same prompt."""
        return self.prefix_cache > 0

    @property
    def free_sequences(self) -> int | None:
        """Sequences a new request can take now (free ones and kept prefix contexts)."""
        return None if self.rt is None else self.rt.free_seqs

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.rt = await asyncio.to_thread(self._load)
        self._slots = asyncio.Semaphore(self.max_requests)
        self._cells = Pool(self.rt.n_ctx)

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
            split_below=self.split_below,
            max_threads=self.max_threads,
        )
        try:
            check_vocabulary(rt, self.tokenizer_dir, self.name)
        except BaseException:
            rt.close()
            raise
        self.max_model_len = min(rt.n_ctx_train or rt.n_ctx, rt.n_ctx)
        log.info(
            "engine %s: llama.cpp loaded %s in %.1f s (%d to %d threads, %d sequences, "
            "%d KV cells)",
            self.name,
            self.gguf.name,
            time.monotonic() - started,
            self.threads,
            rt.max_threads,
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
    async def open(
        self, request_id: str, prompt_ids: Sequence[int], room: int | None = None
    ) -> LlamaState:
        if self.rt is None or self._slots is None or self._cells is None:
            raise EngineError(f"engine {self.name} is not loaded")
        if not prompt_ids:
            raise EngineError(f"engine {self.name}: empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise EngineError(
                f"engine {self.name}: prompt of {len(prompt_ids)} tokens leaves no room "
                f"in its {self.max_model_len}-token context"
            )
        # back-pressure: wait for a free request slot, then for the KV cells the request
        # may fill (every request shares the n_ctx cells; one alone always fits)
        if room is None:  # unknown: a fair share of the cells, or the prompt if longer
            cells = max(len(prompt_ids), self.rt.n_ctx // self.max_requests)
        else:
            cells = min(len(prompt_ids) + room, self.rt.n_ctx)
        await self._slots.acquire()
        try:
            await self._cells.take(cells)
        except BaseException:
            self._slots.release()
            raise
        self.open_states += 1
        state = LlamaState.opened(request_id, prompt_ids)
        state.cells = cells
        return state

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
        result: _Scores = await self._submit(state, job)
        return result[0]

    async def score_top(
        self, state: LlamaState, ids: Sequence[int], n: int
    ) -> tuple[list[float], list[TopLogprobs]]:
        if not ids:
            return [], []
        job = self._score(state, [tuple(ids)], top=n)
        result: _Scores = await self._submit(state, job)
        return result[0][0], result[1][0]

    async def commit(self, state: LlamaState, ids: Sequence[int]) -> None:
        state.commit(tuple(ids))

    async def release(self, state: LlamaState) -> None:
        if state.cancelled:
            return
        state.cancelled = True  # its running call stops at the next tick
        self.open_states -= 1
        if self._slots is not None:
            self._slots.release()
        if self._cells is not None:
            self._cells.give(state.cells)
        rt = self.rt
        if rt is not None:  # freed on the decode thread, not waited for
            rt.run_soon(lambda: state.free(rt))

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
            elif st.book.done == 0:
                st.reuse_prefix(rt)
        st.run_ops(rt)
        st.drop_branches(rt)
        yield from self._decode_pending(st)

    def _decode_pending(self, st: LlamaState) -> Generator[list[Feed], list[np.ndarray], None]:
        """Decode the pending context in chunks; its last row is the row after it."""
        rt, book = self.rt, st.book
        assert rt is not None and st.seq is not None
        chunk = max(1, rt.n_batch // 2)
        while book.pending:
            piece = book.pending[:chunk]
            last = len(piece) == len(book.pending)
            rows = yield [Feed(st.seq, book.done, tuple(piece), "last" if last else "none")]
            if last:
                book.decoded_pending(log_softmax(rows[0][-1]))
            else:
                book.done += len(piece)

    def _generate(
        self,
        st: LlamaState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling,
    ) -> Generator[list[Feed], list[np.ndarray], Generation]:
        yield from self._ready(st)
        book = st.book
        out: list[int] = []
        lps: list[float] = []
        stopped_on: int | None = None
        kept = len(book.ahead)  # look-ahead from an earlier call, replayed first
        grammar = sampling.constraint
        while len(out) < max_tokens:
            i = len(out)
            if i >= len(book.ahead):
                if book.tail is None:
                    yield from self._decode_ahead(st)
                row = book.tail
                assert row is not None
                tok = _pick(st, row if grammar is None else grammar.mask(row), sampling)
                top = top_of(row, sampling.top_logprobs) if sampling.top_logprobs else None
                book.push(tok, float(row[tok]), row, top)  # raw: as the others score it
            if grammar is not None and not grammar.take(book.ahead[i]):
                break  # the grammar allows nothing more (or look-ahead it refuses)
            out.append(book.ahead[i])
            lps.append(book.ahead_lp[i])
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
            top=book.tops(len(out)) if sampling.top_logprobs else (),
        )

    def _decode_ahead(self, st: LlamaState) -> Generator[list[Feed], list[np.ndarray], None]:
        """Make the tail known: decode the look-ahead not in the cache yet (or, with none,
        decode the last committed token again: the row after the context was not kept)."""
        rt, book = self.rt, st.book
        assert rt is not None and st.seq is not None
        todo = book.unfed
        if not todo:
            assert not book.ahead, "look-ahead decoded without its row"
            st.redo_last(rt)
            yield from self._decode_pending(st)
            return
        rows = yield [Feed(st.seq, book.done + book.ahead_done, tuple(todo), "last")]
        book.fed_ahead(log_softmax(rows[0][-1]))

    def _score(
        self, st: LlamaState, candidates: list[tuple[int, ...]], top: int = 0
    ) -> Generator[list[Feed], list[np.ndarray], _Scores]:
        """Every candidate's log-probs (and with ``top``, the most likely tokens at each
        of its positions)."""
        yield from self._ready(st)
        rt = self.rt
        assert rt is not None and st.seq is not None
        results: list[list[float]] = [[] for _ in candidates]
        tops: list[list[TopLogprobs]] = [[] for _ in candidates]
        todo = list(range(len(candidates)))
        ctx = st.book.ctx_row if self.score_from_ctx_row else None
        while todo:
            want = min(len(todo), self.branches)
            seqs: list[int] = []
            while len(seqs) < want:  # all or nothing: never hold some and wait for more
                if rt.free_seqs >= want:
                    seqs = [s for s in (rt.take_seq() for _ in range(want)) if s is not None]
                else:
                    yield []
            st.drop_branches(rt)  # an earlier round's (only the last round's are kept)
            now, todo = todo[:want], todo[want:]
            try:
                streams = [
                    _branch_off(rt, st, ctx, seq, i, candidates[i], results[i], top, tops[i])
                    for i, seq in zip(now, seqs)
                ]
                yield from self._decode_streams(st, streams, candidates, results)
            except BaseException:  # stopped between decodes: its branches are no one's yet
                for seq in seqs:
                    rt.give_seq(seq)
                raise
            for x in streams:
                assert x.after is not None
                branch = Branch(st.book.context_len, candidates[x.index], x.seq, (x.after,))
                st.book.add_branch(branch)
        return results, tops

    def _decode_streams(
        self,
        st: LlamaState,
        streams: list[_Stream],
        candidates: list[tuple[int, ...]],
        results: list[list[float]],
    ) -> Generator[list[Feed], list[np.ndarray], None]:
        """Decode one round's candidates on their branches, with any undecoded look-ahead
        riding along (its row for free)."""
        rt, book = self.rt, st.book
        assert rt is not None and st.seq is not None
        while any(x.left for x in streams):
            feeds: list[Feed] = []
            owners: list[_Stream | None] = []
            room = rt.n_batch
            extra = book.unfed
            if extra and len(extra) <= room:
                feeds.append(Feed(st.seq, book.done + book.ahead_done, tuple(extra), "last"))
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
                    book.fed_ahead(log_softmax(r[-1]))
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
    top: int = 0,
    tops: list[TopLogprobs] | None = None,
) -> _Stream:
    """Branch the context into ``seq`` for one candidate: with the row after the context
    (``ctx``) the branch shares all of it and decodes only the candidate, whose first
    log-prob comes from that row; without, it decodes ``[last_id, *candidate]``."""
    assert st.seq is not None
    n = st.book.done
    if ctx is None:
        rt.copy_span(st.seq, seq, 0, n - 1)
        return _Stream(index, seq, n - 1, [st.book.last_id, *cand], top=top, tops=tops)
    rt.copy_span(st.seq, seq, 0, n)
    if not cand:
        return _Stream(index, seq, n, [], after=ctx)
    out.append(float(ctx[cand[0]]))
    if top and tops is not None:
        tops.append(top_of(ctx, top))
    return _Stream(index, seq, n, list(cand), done=1, top=top, tops=tops)


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
    top: int = 0  # the most likely tokens to report at each position (``score_top``)
    tops: list[TopLogprobs] | None = None

    def take(self, rows: np.ndarray, cand: tuple[int, ...], out: list[float]) -> None:
        """Log-probs of the candidate tokens these rows predict, and the row after it."""
        lse = logsumexp(rows)
        for r in range(len(rows)):
            k = self.done + r
            if k < len(cand):
                out.append(float(rows[r, cand[k]] - lse[r]))
                if self.top and self.tops is not None:
                    self.tops.append(top_of(rows[r] - lse[r], self.top))
            else:
                self.after = log_softmax(rows[r])
        self.done += len(rows)


def _pick(st: LlamaState, row: np.ndarray, sampling: Sampling) -> int:
    """The next token from ``row``, the tail's log-probs: the request's penalties, bias
    and cuts first (``sampler``), then greedy, or temperature, top_p and a draw from the
    state's RNG."""
    shift = shift_of(row)
    if shift is None:  # a grammar's masked copy of the tail: its logits are the tail's
        shift = shift_of(st.book.tail)
    shaped = shaped_logits(row, sampling, st.book, st.history, shift)
    if shaped is not None:
        row = shaped
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
