"""The Cool-Fusion loop: propose, score, select, commit (paper §2), and Rerank / Cool+R.

``Fuser.run`` is an async generator of ``Segment``s. For ``cool`` / ``cool_shortest`` it
yields one per selected segment as soon as it is chosen; ``rerank`` and ``cool_rerank``
can only choose at the end and yield the whole answer as one segment. A model whose
engine fails is dropped from the request (recorded in the usage) while others remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fusion.clock import StepClock
from fusion.engine import EngineError, Sampling, StateHandle
from fusion.models import SourceModel
from fusion.proposals import Proposal, propose
from fusion.selection import Scored, Selection, gate_confident, nll, packllm_weights, select
from fusion.stops import StopStringTracker
from fusion.types import (
    FinishReason,
    FusionOutcome,
    FusionParams,
    ModelUsage,
    Prompt,
    Rule,
    ScoredCandidate,
    Segment,
    StepKind,
    StepTimings,
    each_once,
    perplexity,
)
from tokenizers_align import IncrementalCodec

log = logging.getLogger(__name__)
T = TypeVar("T")


class FusionError(RuntimeError):
    """No source model is left to continue the request."""


WRITTEN_KEPT = 64  # characters of the committed answer kept for turn markers spanning it


@dataclass
class _Run:
    """Per-request working state of every model still taking part."""

    params: FusionParams
    prompt: Prompt
    models: list[SourceModel]
    states: dict[str, StateHandle] = field(default_factory=dict)
    codecs: dict[str, IncrementalCodec] = field(default_factory=dict)
    outcome: FusionOutcome = field(default_factory=FusionOutcome)
    # per scoring model: log-probs of every committed winner, for Cool+R
    fused_logprobs: dict[str, list[float]] = field(default_factory=dict)
    # this step's candidate encodings per (model, text): scoring and committing share them
    encoded: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    clock: StepClock = field(default_factory=StepClock)  # the current step's timings
    context_tokens: int = 0  # the first model's prompt + committed answer tokens
    releases: list[asyncio.Future[None]] = field(default_factory=list)  # of dropped models
    ended: bool = False  # the last chosen candidate ended the answer (Cool+R's fused text)
    prompt_weights: dict[str, float] | None = None  # PackLLM's, once per request
    written: str = ""  # the end of the committed answer, where a turn marker may start

    def wrote(self, text: str) -> None:
        self.written = (self.written + text)[-WRITTEN_KEPT:]

    def close_step(self) -> StepTimings:
        timings = self.clock.timings()
        self.outcome.add_timings(timings)
        return timings

    def encode(self, model: str, text: str) -> list[int]:
        key = (model, text)
        if key not in self.encoded:
            started = time.perf_counter()
            self.encoded[key] = self.codecs[model].encode_next(text)
            self.clock.add_align(time.perf_counter() - started)
        return self.encoded[key]


@dataclass(frozen=True)
class _Candidate:
    text: str
    ended: bool
    proposals: tuple[Proposal, ...]


FUSED = "fusion"  # the proposer name of Cool+R's fused answer in traces


@dataclass(frozen=True)
class _FusedAnswer:
    """Cool+R's extra candidate: the answer the Cool pass wrote, judged by the log-probs
    every model gave the segments it chose, and what that answer already counted."""

    text: str
    logprobs: tuple[tuple[str, tuple[float, ...]], ...]  # (scoring model, log-probs)
    tokens: int
    finish: FinishReason
    ended: bool  # its last segment ended the answer (an end token or a turn marker)


@dataclass(frozen=True)
class _Step:
    """One Cool step's outcome: the winner and how every candidate was judged."""

    win: _Candidate
    scored: tuple[ScoredCandidate, ...]
    kind: StepKind
    rule: Rule


class Fuser:
    """Runs fused generation over a fixed set of source models."""

    def __init__(self, models: Sequence[SourceModel], window_pieces: int = 4) -> None:
        self.models = {m.name: m for m in models}
        self.window_pieces = window_pieces
        self._releasing: set[asyncio.Future[None]] = set()  # releases outliving their request

    def select(self, names: Sequence[str] | None) -> list[SourceModel]:
        if not names:
            return list(self.models.values())
        each_once(list(names))
        return [self.models[n] for n in names]

    async def run(
        self, prompt: Prompt, params: FusionParams, outcome: FusionOutcome | None = None
    ) -> AsyncGenerator[Segment, None]:
        run = _Run(params, prompt, self.select(params.models), outcome=outcome or FusionOutcome())
        run.outcome.usage = {m.name: ModelUsage() for m in run.models}
        try:
            await self._open(run)
            if params.method in ("cool", "cool_shortest"):
                async with contextlib.aclosing(self._cool(run, emit=True)) as segments:
                    async for seg in segments:
                        yield seg
            elif params.method == "rerank":
                yield await self._rerank(run, fused=None)
            else:
                async with contextlib.aclosing(self._cool(run, emit=False)) as segments:
                    async for _ in segments:
                        pass
                fused = _FusedAnswer(
                    text=run.outcome.text,
                    logprobs=tuple((n, tuple(v)) for n, v in run.fused_logprobs.items()),
                    tokens=run.outcome.completion_tokens,
                    finish=run.outcome.finish_reason or "length",
                    ended=run.ended,
                )
                yield await self._rerank(run, fused=fused)
        finally:
            await self._release(run)

    # -- set-up ---------------------------------------------------------------------------
    async def _open(self, run: _Run, request_id: str | None = None) -> None:
        rid = request_id or uuid.uuid4().hex
        await self._release(run)
        prompt_ids: dict[str, list[int]] = {}
        for m in run.models:
            if run.prompt.messages is not None:
                prompt_ids[m.name] = m.chat_prompt_ids(run.prompt.messages)
                codec = IncrementalCodec(m.tokenizer, "", self.window_pieces)
            else:
                prompt_ids[m.name] = m.completion_prompt_ids(run.prompt.text or "")
                codec = IncrementalCodec.after_prompt(m.tokenizer, run.prompt.text or "")
            run.codecs[m.name] = codec
            run.outcome.usage[m.name].prompt_tokens = len(prompt_ids[m.name])
            run.fused_logprobs[m.name] = []
        run.encoded.clear()
        run.written = ""
        run.context_tokens = len(prompt_ids[run.models[0].name]) if run.models else 0

        # Opened one after the other, always in the server's model order: an engine may
        # make a request wait for cache room, and two requests that each held one engine
        # while waiting for the other's would wait for ever.
        order = [m for m in self.models.values() if m in run.models]
        opened = {m.name: asyncio.Event() for m in order}

        async def open_one(m: SourceModel) -> StateHandle:
            at = order.index(m)
            try:
                if at:
                    await opened[order[at - 1].name].wait()
                state = await m.engine.open(f"{rid}-{m.name}", prompt_ids[m.name], _room(run))
            finally:
                opened[m.name].set()
            # recorded at once: a request cancelled while others still open must release it
            run.states[m.name] = state
            return state

        await self._each(run, open_one)

    async def _release(self, run: _Run) -> None:
        """Release every engine state of the run, even while the request is cancelled.

        A disconnect cancels the request through anyio (sse-starlette), where every later
        await in the cancelled scope raises again; the releases therefore run in their
        own shielded task and finish whatever happens to the caller."""
        states, run.states = run.states, {}
        tasks = [*run.releases, *(self._start_release(n, s) for n, s in states.items())]
        run.releases = []
        if tasks:
            await asyncio.shield(asyncio.gather(*tasks))

    def _start_release(self, name: str, state: StateHandle) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self._release_one(name, state))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def _release_one(self, name: str, state: StateHandle) -> None:
        try:
            await self.models[name].engine.release(state)
        except Exception:  # releasing must never mask the request's own outcome
            log.warning("releasing state of %s failed", name, exc_info=True)

    async def _each(self, run: _Run, work: Callable[[SourceModel], Awaitable[T]]) -> dict[str, T]:
        """Run ``work(model)`` for every active model concurrently; drop models that fail."""
        models = list(run.models)

        async def timed(m: SourceModel) -> T:
            started = time.perf_counter()
            try:
                return await _bounded(m, work(m))
            finally:
                run.clock.add_busy(m.name, time.perf_counter() - started)

        results = await asyncio.gather(*(timed(m) for m in models), return_exceptions=True)
        out: dict[str, T] = {}
        for m, res in zip(models, results):
            if isinstance(res, asyncio.CancelledError):
                raise res
            if isinstance(res, BaseException):
                self._drop(run, m, res)
            else:
                out[m.name] = res
        if not run.models:
            raise FusionError(
                "every source model failed: "
                + "; ".join(f"{n}: {u.dropped}" for n, u in run.outcome.usage.items() if u.dropped)
            )
        return out

    def _drop(self, run: _Run, m: SourceModel, exc: BaseException) -> None:
        if not isinstance(exc, Exception):
            raise exc
        log.warning("source model %s dropped from request: %s", m.name, exc)
        run.outcome.usage[m.name].dropped = str(exc) or type(exc).__name__
        run.models = [x for x in run.models if x.name != m.name]
        # released now: a call still running for it (a timed-out one) stops at its next
        # token instead of holding the engine until the request ends
        state = run.states.pop(m.name, None)
        if state is not None:
            run.releases.append(self._start_release(m.name, state))

    # -- Cool -----------------------------------------------------------------------------
    async def _cool(self, run: _Run, emit: bool) -> AsyncGenerator[Segment, None]:
        params = run.params
        tracker = StopStringTracker(params.stop)
        index = 0
        strip_leading = run.prompt.is_chat
        while True:
            run.clock.start()
            context = run.context_tokens
            budget = params.max_tokens - run.outcome.completion_tokens
            if budget <= 0:
                run.outcome.finish_reason = "length"
                break
            cap = min(params.max_segment_tokens, budget)
            step = await self._step(run, cap, budget)
            if step is None:
                run.outcome.finish_reason = "stop"
                break
            win = step.win
            lead = win.proposals[0]
            tokens = _content_tokens(run, lead)
            run.outcome.completion_tokens += tokens
            run.outcome.usage[lead.model].segments_won += 1
            finish: FinishReason | None = None
            run.ended = win.ended
            if win.ended:
                finish = "stop"
            elif lead.hit_cap and cap == budget:
                finish = "length"
            else:
                await self._commit_all(run, win)
                run.clock.lap("commit")
            piece = tracker.feed(win.text)
            if tracker.stopped:
                finish = "stop"
            if finish is not None:
                piece += tracker.flush()
            if strip_leading:
                stripped = piece.lstrip()
                strip_leading = not stripped
                piece = stripped
            run.outcome.text += piece
            run.outcome.segments += 1
            timings = run.close_step()
            if emit:
                yield Segment(
                    index=index,
                    text=piece,
                    winner=lead.model,
                    candidates=step.scored,
                    tokens=tokens,
                    finish_reason=finish,
                    timings=timings,
                    context_tokens=context,
                    step=step.kind,
                    rule=step.rule,
                )
            index += 1
            if finish is not None:
                run.outcome.finish_reason = finish
                break

    async def _step(self, run: _Run, cap: int, budget: int) -> _Step | None:
        """Propose, score and select one segment (None: no model has anything to add).
        Under the ``gate`` rule the leader proposes first and may decide alone."""
        given: dict[str, Proposal] = {}
        leader = _gate_leader(run)
        if leader is not None:
            own = await self._propose_all(run, cap, budget, only=leader)
            p = own[0].proposals[0] if own else None
            threshold = run.params.selection.gate_threshold
            if p is not None and gate_confident(p.own_logprobs, threshold):
                return await self._gated(run, own[0])
            given = {p.model: p} if p is not None else {}
        candidates = await self._propose_all(run, cap, budget, given)
        run.clock.lap("generate")
        if not candidates:
            return None
        scored, logprobs = await self._score_all(run, candidates)
        chosen = await self._select(run, _scored_inputs(scored, logprobs), run.outcome.text)
        run.clock.lap("score")
        for name, lps in logprobs.items():
            run.fused_logprobs[name].extend(lps[chosen.index])
        return _Step(candidates[chosen.index], _with_scores(scored, chosen), "fused", chosen.rule)

    async def _gated(self, run: _Run, win: _Candidate) -> _Step:
        """The confident leader's segment, taken without the others proposing. Cool+R
        still has them score it (about the cost of committing it), as its final rerank
        needs every model's log-probs of the fused text."""
        run.clock.lap("generate")
        p = win.proposals[0]
        if run.params.method == "cool_rerank":
            scored, logprobs = await self._score_all(run, [win])
            run.clock.lap("score")
            for name, lps in logprobs.items():
                run.fused_logprobs[name].extend(lps[0])
            seen = scored[0]
        else:
            own = list(p.own_logprobs or ())
            run.fused_logprobs[p.model].extend(own)
            ppl = perplexity(own, run.params.ppl_mode)
            seen = ScoredCandidate(win.text, (p.model,), win.ended, ((p.model, ppl),), ppl)
        score = dict(seen.perplexities)[p.model]
        return _Step(win, (dataclasses.replace(seen, score=score),), "gated", "gate")

    async def _select(
        self, run: _Run, inputs: list[Scored], answer: str, whole: bool = False
    ) -> Selection:
        """The step's (or, ``whole``, the final answer's) choice under the run's policy.
        Consensus counts models that proposed the same segment; whole answers (Rerank's,
        and Cool+R's fused one, proposed by no single model) are never held to it, or the
        leader's would be the only one allowed."""
        policy = run.params.selection
        if whole:
            policy = dataclasses.replace(policy, min_support=1)
        if policy.step_rule == "packllm" and run.prompt_weights is None:
            prompt_nll = await self._prompt_nlls(run)
            run.prompt_weights = packllm_weights(prompt_nll, policy.packllm_temperature)
        return select(
            inputs, policy, run.params.ppl_mode, answer=answer, prompt_weights=run.prompt_weights
        )

    async def _prompt_nlls(self, run: _Run) -> dict[str, float]:
        """Each model's mean token NLL of the prompt (PackLLM's expertise measure): a
        scratch state on the prompt's first token scores the rest, then is released."""

        async def one(m: SourceModel) -> float:
            ids = _prompt_ids(run.prompt, m)
            if len(ids) < 2:
                return math.inf
            rid = f"{uuid.uuid4().hex}-{m.name}-prompt"
            state = await m.engine.open(rid, ids[:1], room=len(ids))
            try:
                [lps] = await m.engine.score(state, [ids[1:]])
            finally:
                await asyncio.shield(self._start_release(m.name, state))
            run.outcome.usage[m.name].scored_tokens += len(ids) - 1
            return nll(lps)

        return await self._each(run, one)

    async def _propose_all(
        self,
        run: _Run,
        cap: int,
        budget: int,
        given: dict[str, Proposal] | None = None,
        only: SourceModel | None = None,
    ) -> list[_Candidate]:
        """Every model's candidate; models in ``given`` have proposed already, and with
        ``only`` that model alone proposes (the gate's leader)."""
        shortest = run.params.method == "cool_shortest"
        adapters = [m.tokenizer for m in run.models]
        known = given or {}

        async def one(m: SourceModel) -> Proposal | None:
            if m.name in known:
                return known[m.name]
            if only is not None and m is not only:
                return None
            return await propose(
                m,
                run.states[m.name],
                run.codecs[m.name],
                [m.tokenizer] if shortest else adapters,
                cap=cap,
                until_boundary=True,
                sampling=_model_sampling(run, m),
                written=run.written,
            )

        got = await self._each(run, one)
        made = {n: p for n, p in got.items() if p is not None and n not in known}
        self._proposed(run, made)
        return _group(p for m in run.models if (p := got.get(m.name)) is not None)

    def _proposed(self, run: _Run, proposals: dict[str, Proposal]) -> list[_Candidate]:
        for name, p in proposals.items():
            run.outcome.usage[name].generated_tokens += p.generated - p.reused
            run.clock.add_align(p.align_seconds)
        return _group(proposals[m.name] for m in run.models if m.name in proposals)

    async def _score_all(
        self, run: _Run, candidates: list[_Candidate]
    ) -> tuple[list[ScoredCandidate], dict[str, list[list[float]]]]:
        """Every candidate's perplexity under every model, and the log-probs behind them."""
        chat = run.prompt.is_chat

        def ids_for(m: SourceModel, c: _Candidate) -> list[int]:
            ids = run.encode(m.name, c.text) if c.text else []
            end = m.end_id(chat)
            return [*ids, end] if c.ended and end is not None else ids

        async def one(m: SourceModel) -> list[list[float]]:
            own = [_own_logprobs(c, m.name) for c in candidates]
            todo = [i for i, lp in enumerate(own) if lp is None]
            batch = [ids_for(m, candidates[i]) for i in todo]
            scores = await m.engine.score(run.states[m.name], batch) if batch else []
            run.outcome.usage[m.name].scored_tokens += sum(len(b) for b in batch)
            got = dict(zip(todo, scores))
            return [got[i] if lp is None else list(lp) for i, lp in enumerate(own)]

        per_model = await self._each(run, one)
        scored: list[ScoredCandidate] = []
        for i, c in enumerate(candidates):
            ppl = tuple(
                (name, perplexity(lps[i], run.params.ppl_mode)) for name, lps in per_model.items()
            )
            mean = sum(p for _, p in ppl) / len(ppl)
            scored.append(
                ScoredCandidate(c.text, tuple(p.model for p in c.proposals), c.ended, ppl, mean)
            )
        return scored, per_model

    async def _commit_all(self, run: _Run, win: _Candidate) -> None:
        by_model = {p.model: p for p in win.proposals}

        async def one(m: SourceModel) -> None:
            own = by_model.get(m.name)
            codec = run.codecs[m.name]
            if own is not None and own.own_ids is not None:
                ids = list(own.own_ids)
            else:
                ids = run.encode(m.name, win.text)
            await m.engine.commit(run.states[m.name], ids)
            codec.commit(win.text)
            if m is run.models[0]:
                run.context_tokens += len(ids)

        await self._each(run, one)
        run.wrote(win.text)
        run.encoded.clear()  # every codec's tail moved on

    # -- Rerank and Cool+R ----------------------------------------------------------------
    async def _rerank(self, run: _Run, fused: _FusedAnswer | None) -> Segment:
        run.clock.start()
        context = run.context_tokens
        params = run.params
        if fused is not None:
            await self._open(run)

        async def one(m: SourceModel) -> Proposal:
            return await propose(
                m,
                run.states[m.name],
                run.codecs[m.name],
                [m.tokenizer],
                cap=params.max_tokens,
                until_boundary=False,
                user_stops=params.stop,
                sampling=_model_sampling(run, m),
            )

        candidates = self._proposed(run, await self._each(run, one))
        run.clock.lap("generate")
        scored, logprobs = await self._score_all(run, candidates)
        run.clock.lap("score")
        inputs = _scored_inputs(scored, logprobs)
        if fused is not None:
            scored.append(self._score_fused(run, fused))
            lps = dict(fused.logprobs)
            mine = tuple((m.name, tuple(lps.get(m.name, ()))) for m in run.models)
            inputs.append(Scored(fused.text, (FUSED,), fused.ended, mine))
        if not scored:  # every model stopped before writing anything
            return self._answer(run, "", None, 0, "stop", (), context)
        chosen = await self._select(run, inputs, answer="", whole=True)
        best = chosen.index
        scored = list(_with_scores(scored, chosen))
        win = scored[best]
        if best < len(candidates):
            lead = candidates[best].proposals[0]
            tokens = _content_tokens(run, lead)
            finish: FinishReason = "length" if lead.hit_cap and not lead.ended else "stop"
            return self._answer(
                run, win.text, lead.model, tokens, finish, scored, context, chosen.rule
            )
        assert fused is not None
        return self._answer(
            run, fused.text, None, fused.tokens, fused.finish, scored, context, chosen.rule
        )

    def _answer(
        self,
        run: _Run,
        text: str,
        winner: str | None,
        tokens: int,
        finish: FinishReason,
        scored: Sequence[ScoredCandidate],
        context: int,
        rule: Rule = "mean_ppl",
    ) -> Segment:
        """Rerank's whole answer as one segment (``winner`` None: Cool+R's fused text)."""
        tracker = StopStringTracker(run.params.stop)
        text = tracker.feed(text) + tracker.flush()
        if tracker.stopped:
            finish = "stop"
        if run.prompt.is_chat:
            text = text.lstrip()
        run.outcome.text, run.outcome.finish_reason = text, finish
        run.outcome.completion_tokens = tokens
        run.outcome.segments = 1
        if winner is not None:
            run.outcome.usage[winner].segments_won += 1
        return Segment(
            0,
            text,
            winner or FUSED,
            tuple(scored),
            tokens,
            finish,
            timings=run.close_step(),
            context_tokens=context,
            rule=rule,
        )

    def _score_fused(self, run: _Run, fused: _FusedAnswer) -> ScoredCandidate:
        lps = dict(fused.logprobs)
        ppl = tuple(
            (m.name, perplexity(lps.get(m.name, ()), run.params.ppl_mode)) for m in run.models
        )
        mean = sum(p for _, p in ppl) / len(ppl)
        return ScoredCandidate(fused.text, (FUSED,), fused.ended, ppl, mean)


async def _bounded(m: SourceModel, work: Awaitable[T]) -> T:
    """``work`` under the model's per-step timeout: a hung model is dropped, not awaited.

    Only the await is cancelled here; the engine learns of it when the drop releases the
    model's state (at once), which stops the call at its next token or forward."""
    if m.step_timeout is None:
        return await work
    try:
        return await asyncio.wait_for(work, m.step_timeout)
    except TimeoutError:
        raise EngineError(
            f"engine {m.name}: no answer within its step timeout ({m.step_timeout:g} s)"
        ) from None


def _room(run: _Run) -> int:
    """The most tokens a request may hold in one engine beyond its prompt: its answer,
    plus a candidate per model to score (a segment each, or a whole answer each for
    Rerank and Cool+R's rerank), plus look-ahead of a segment."""
    params, n = run.params, len(run.models)
    if params.method in ("rerank", "cool_rerank"):
        return (n + 1) * params.max_tokens
    return params.max_tokens + (n + 1) * params.max_segment_tokens


def _model_sampling(run: _Run, m: SourceModel) -> Sampling:
    """The request's sampling for one model: a seed of its own, so models differ."""
    sampling = run.params.sampling
    if sampling.greedy or sampling.seed is None:
        return sampling
    offset = list(run.outcome.usage).index(m.name)
    return Sampling(sampling.temperature, sampling.top_p, sampling.seed + offset)


def _content_tokens(run: _Run, p: Proposal) -> int:
    """Tokens of a proposal's text in its proposer's tokenization: not its end token, nor
    look-ahead it generated past the text (counted once the text is committed)."""
    if p.own_ids is not None:
        return len(p.own_ids) - (1 if p.ended else 0)
    return len(run.encode(p.model, p.text)) if p.text else 0


def _own_logprobs(c: _Candidate, model: str) -> tuple[float, ...] | None:
    for p in c.proposals:
        if p.model == model and p.own_logprobs is not None:
            return p.own_logprobs
    return None


def _group(proposals: Iterable[Proposal]) -> list[_Candidate]:
    """Distinct (text, ended) candidates, in model order, each with its proposers."""
    groups: dict[tuple[str, bool], list[Proposal]] = {}
    for p in proposals:
        if not p.text and not p.ended:
            continue
        groups.setdefault((p.text, p.ended), []).append(p)
    return [_Candidate(t, e, tuple(ps)) for (t, e), ps in groups.items()]


def _gate_leader(run: _Run) -> SourceModel | None:
    """The leader whose confident segments skip fusion, when the ``gate`` rule applies."""
    policy = run.params.selection
    if policy.rule != "gate" or len(run.models) < 2:
        return None
    return next((m for m in run.models if m.name == policy.leader), None)


def _prompt_ids(prompt: Prompt, m: SourceModel) -> list[int]:
    if prompt.messages is not None:
        return m.chat_prompt_ids(prompt.messages)
    return m.completion_prompt_ids(prompt.text or "")


def _scored_inputs(
    scored: Sequence[ScoredCandidate], logprobs: dict[str, list[list[float]]]
) -> list[Scored]:
    """The selection rules' view of the candidates: every scoring model's log-probs."""
    return [
        Scored(c.text, c.proposers, c.ended, tuple((n, tuple(lp[i])) for n, lp in logprobs.items()))
        for i, c in enumerate(scored)
    ]


def _with_scores(
    scored: Sequence[ScoredCandidate], chosen: Selection
) -> tuple[ScoredCandidate, ...]:
    return tuple(
        dataclasses.replace(c, score=chosen.scores[i], excluded=chosen.excluded[i])
        for i, c in enumerate(scored)
    )
