"""The engine protocol's calls on vLLM, written once for both transports.

The in-process engine (``vllm_engine.py``, vLLM's ``AsyncLLM``) and the remote one
(``vllm_remote_engine.py``, ``vllm serve --enable-scale-out`` over HTTP) do the same
things with the same requests (``vllm_requests.py``) and the same look-ahead
(``vllm_logprobs.LookAhead``): ``generate`` replays the look-ahead, then streams until
the segment is known; ``score`` sends one ``prompt_logprobs`` request per candidate,
fills positions vLLM served from its prefix cache from what the state saw before, and
recomputes a candidate without the cache when nothing can fill them; beside the scores
one request extends the state's own look-ahead. Under a grammar, where vLLM runs our
grammar processor (``constrains``, probed at start), each of these requests that
generates carries the grammar (``vllm_grammar.py``), and ``generate`` takes every token,
replayed or streamed, through the loop's grammar state. Each engine supplies only its
transport:

- ``_stream(st, prompt, fields)``: one streaming request, yielding what arrives
  (``Chunk``: the tokens with their top log-probs, and the cached prompt tokens when
  reported), ended early by closing it (vLLM aborts the request);
- ``_once(st, prompt, fields, n)``: one non-streamed request (``Answer``, with the
  prompt-logprob entries of its last ``n`` positions);
- ``_call(st, work)``: how a call runs (the remote runs it as a task ``release`` can
  cancel), and ``_retry_without_cache(exc)``: whether a failed scoring request is worth
  one more try without reading the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fusion.engine import (
    GREEDY,
    EngineError,
    Generation,
    Sampling,
    StopCheck,
    TokenConstraint,
    TopLogprobs,
)
from fusion.engines.vllm_grammar import PROCESSOR, constraint_fields, processor_answers
from fusion.engines.vllm_logprobs import LookAhead, Taker, Top, ranked
from fusion.engines.vllm_requests import (
    generate_fields,
    score_and_extend,
    score_fields,
    score_top_fields,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class VllmState:
    """Per-request state: the context and what is known past it live here (``look``);
    vLLM keeps only its prefix cache."""

    request_id: str
    look: LookAhead
    live: set[Any] = field(default_factory=set)  # running requests (ids or tasks)
    cancelled: bool = False
    counter: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]
    prefill: list[tuple[int, int]] = field(default_factory=list)  # (prompt len, cached)
    # the grammar of the last ``generate`` when vLLM constrains (vllm_grammar.py): the
    # scoring and continuation requests generate their look-ahead under it too
    constraint: TokenConstraint | None = None

    @classmethod
    def opened(cls, request_id: str, prompt: Sequence[int]) -> VllmState:
        return cls(request_id, LookAhead.after(prompt))

    @property
    def ids(self) -> list[int]:
        """The committed context, resent with every request."""
        return self.look.context

    @property
    def ahead(self) -> list[int]:
        """Tokens generated past the committed context (look-ahead)."""
        return self.look.ids

    def next_rid(self) -> str:
        return f"{self.request_id}-{next(self.counter)}"


@dataclass(frozen=True)
class Chunk:
    """What one streamed answer delivers at a time."""

    tokens: list[tuple[int, Top]]  # generated tokens with the top log-probs at each
    cached: int | None = None  # prompt tokens read from the prefix cache, when reported


@dataclass(frozen=True)
class Answer:
    """One non-streamed answer."""

    cached: int | None  # prompt tokens read from the prefix cache (None: not reported)
    entries: list[Top | None]  # prompt-logprob entries of the last positions asked for
    ids: list[int]  # generated tokens
    tops: list[Top]  # the top log-probs at each


class VllmCalls:
    """``generate``, ``score`` and ``commit`` over an engine's transport (module doc)."""

    name: str
    score_lookahead: int
    read_cache: bool = True  # False: the remote does not say what it read from its cache
    constrains: bool = False  # vLLM runs our grammar processor (set at start)
    shares_prefixes = True  # vLLM's automatic prefix caching (on in ours, vLLM's default)
    prefill_log: deque[tuple[int, int]]  # (prompt, cached) of recent requests, for benches

    # -- the transport (each engine's) ------------------------------------------------
    def _stream(
        self, st: VllmState, prompt: list[int], fields: dict[str, Any]
    ) -> AsyncGenerator[Chunk, None]:
        raise NotImplementedError

    async def _once(
        self, st: VllmState, prompt: list[int], fields: dict[str, Any], n: int
    ) -> Answer:
        raise NotImplementedError

    async def _call(self, st: VllmState, work: Coroutine[Any, Any, T]) -> T:
        if st.cancelled:
            work.close()
            raise asyncio.CancelledError()
        result = await work
        if st.cancelled:  # released mid-way: vLLM ends an aborted request quietly
            raise asyncio.CancelledError()
        return result

    def _retry_without_cache(self, exc: EngineError) -> bool:
        return False

    # -- the protocol -----------------------------------------------------------------
    async def commit(self, state: VllmState, ids: Sequence[int]) -> None:
        state.look.commit(ids)

    async def generate(
        self,
        state: VllmState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling = GREEDY,
    ) -> Generation:
        st = state
        # a greedy scoring pass's look-ahead is the model's plain argmax: replayed only
        # for requests whose picks are that too (no penalty, no bias)
        plain = sampling.greedy and not sampling.shapes_logits
        st.constraint = sampling.constraint if self.constrains else None
        top, grammar = sampling.top_logprobs, sampling.constraint
        taker = Taker(st.look, max_tokens, stop_ids, should_stop, plain, top, constraint=grammar)
        if taker.replay():
            return taker.result()
        prompt = st.ids + st.look.ids
        fields = self._under(st, prompt, generate_fields(taker, sampling, len(st.ids)))
        st.look.sampled = True
        await self._call(st, self._pump(st, prompt, fields, taker))
        return taker.result()

    def _under(self, st: VllmState, prompt: list[int], fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` with the state's grammar over the tokens the request generates (its
        processor's matcher starts after the answer's tokens in ``prompt``)."""
        if st.constraint is None:
            return fields
        return {**fields, **constraint_fields(st.constraint, prompt[st.look.book.prompt_len :])}

    async def _detect_grammar(self, adapter: Any, unfit: str | None = None) -> None:
        """Set ``constrains``: whether vLLM runs our grammar processor for this model (a
        probe request obeys a grammar; ``adapter``: the model's ``TokenizerAdapter``).
        ``unfit``: why it cannot (no probe then)."""
        if unfit is None:
            st = VllmState.opened(f"{self.name}-grammar-probe", [0])

            async def generate(prompt: list[int], fields: dict[str, Any]) -> list[int]:
                return (await self._once(st, prompt, fields, 0)).ids

            try:
                self.constrains = await processor_answers(
                    generate, adapter.encode, adapter.decode, adapter.eos_ids
                )
            except EngineError as exc:
                self.constrains = False
                log.warning("engine %s: the grammar probe failed: %s", self.name, exc)
            if self.constrains:
                return
            unfit = f"its vLLM does not run the grammar processor (--logits-processors {PROCESSOR})"
        self.constrains = False
        log.warning(
            "engine %s: %s; under a grammar, its candidates are cut to their longest valid "
            "prefix instead",
            self.name,
            unfit,
        )

    async def _pump(
        self, st: VllmState, prompt: list[int], fields: dict[str, Any], taker: Taker
    ) -> None:
        """Push streamed tokens into the look-ahead until ``taker`` has its segment;
        leaving closes the stream (vLLM aborts the request)."""
        logged = False
        async with contextlib.aclosing(self._stream(st, prompt, fields)) as stream:
            async for chunk in stream:
                if not logged and chunk.cached is not None:
                    logged = True
                    self._log_prefill(st, len(prompt), chunk.cached)
                done = False
                for tok, top in chunk.tokens:
                    lp = st.look.push(tok, top)
                    done = done or taker.take(tok, lp)
                if done:
                    return

    async def score(
        self, state: VllmState, candidates: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        st = state

        async def one(cand: list[int], use_cache: bool) -> list[float]:
            prompt = st.ids + cand
            fields = self._under(st, prompt, score_fields(st.look, self.score_lookahead, use_cache))
            try:
                ans = await self._call(st, self._once(st, prompt, fields, len(cand)))
            except EngineError as exc:
                if not (use_cache and self._retry_without_cache(exc)):
                    raise
                return await one(cand, use_cache=False)
            # not reported: count it all as cached (the state's knowledge fills it in)
            cached = (len(prompt) if ans.cached is None else ans.cached) if use_cache else 0
            self._log_prefill(st, len(prompt), cached)
            scores = st.look.read_scored(cand, ans.entries, cached, ans.ids, ans.tops)
            if scores is not None:
                return scores
            if not use_cache:
                raise EngineError(f"engine {self.name}: no prompt log-probs for a candidate")
            return await one(cand, use_cache=False)  # a cached gap nothing else fills

        async def fetch(prompt: list[int], fields: dict[str, Any]) -> tuple[list[int], list[Top]]:
            ans = await self._call(st, self._once(st, prompt, self._under(st, prompt, fields), 0))
            if ans.cached is not None:
                self._log_prefill(st, len(prompt), ans.cached)
            return ans.ids, ans.tops

        scoring = asyncio.gather(*(one(list(c), self.read_cache) for c in candidates))
        return await score_and_extend(
            self.name, st.look, st.ids, self.score_lookahead, scoring, fetch
        )

    async def score_top(
        self, state: VllmState, ids: Sequence[int], n: int
    ) -> tuple[list[float], list[TopLogprobs]]:
        if not ids:
            return [], []
        prompt = state.ids + list(ids)
        fields = score_top_fields(n)
        ans = await self._call(state, self._once(state, prompt, fields, len(ids)))
        self._log_prefill(state, len(prompt), 0)
        entries = ans.entries
        if len(entries) != len(ids) or any(e is None or t not in e for t, e in zip(ids, entries)):
            raise EngineError(f"engine {self.name}: no prompt log-probs for a sequence")
        lps = [e[t] for t, e in zip(ids, entries) if e is not None]
        return lps, [ranked(e, n) for e in entries if e is not None]

    def _log_prefill(self, st: VllmState, prompt_len: int, cached: int) -> None:
        st.prefill.append((prompt_len, cached))
        self.prefill_log.append(st.prefill[-1])
