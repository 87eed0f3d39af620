"""The source models of the fused model, and their lifecycle within one request: open a
state in every engine, run work on every model at once (dropping a model that fails or
misses its deadline), and release every state, also when the request is cancelled.
Across requests: leave ejected models out and probe them back (``fusion.health``)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fusion.engine import EngineError, RequestRejected, StateHandle
from fusion.health import CallTimes, FaultEvent, FaultListener, FaultPolicy, MemberHealth, probe
from fusion.models import SourceModel
from fusion.run import FusionError, Run, prompt_ids, room
from fusion.types import each_once
from tokenizers_align import IncrementalCodec

log = logging.getLogger(__name__)
T = TypeVar("T")
# refused requests in a row (a remote's 4xx) that eject a model: every request's input
# cannot be wrong, so the model (its server, its version) is
REFUSALS_TO_EJECT = 3


class Members:
    """The fused model's source models, by name, in the server's order."""

    def __init__(
        self,
        models: Sequence[SourceModel],
        window_pieces: int = 4,
        policy: FaultPolicy | None = None,
        listener: FaultListener | None = None,
    ) -> None:
        self.models = {m.name: m for m in models}
        self.window_pieces = window_pieces
        self.policy = policy or FaultPolicy()
        self.listener = listener  # told of every drop, ejection and return (metrics)
        self.health = {name: MemberHealth(self.policy) for name in self.models}
        self.times = {name: CallTimes(self.policy.window_calls) for name in self.models}
        self.inflight: dict[str, int] = {}  # calls running on each model, all requests
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._releasing: set[asyncio.Future[None]] = set()  # releases outliving their request
        self._opening: dict[str, asyncio.Lock] = {}

    def select(self, names: Sequence[str] | None) -> list[SourceModel]:
        """The named models in the order named (all of them without names)."""
        if not names:
            return list(self.models.values())
        each_once(list(names))
        return [self.models[n] for n in names]

    async def open(self, run: Run, request_id: str | None = None, whole: bool = False) -> None:
        """A fresh state in every engine of the run (releasing any it held), on the
        prompt, with a codec per model and the usage's prompt counts. ``whole``: the
        models will write and score whole answers (Rerank), which needs more room."""
        rid = request_id or uuid.uuid4().hex
        await self.release(run)
        ids: dict[str, list[int]] = {}
        for m in run.models:
            ids[m.name] = prompt_ids(run.prompt, m)
            run.codecs[m.name] = self.codec(run, m)
            run.outcome.usage[m.name].prompt_tokens = len(ids[m.name])
            run.fused_logprobs[m.name] = []
        run.encoded.clear()
        run.written = ""
        run.context_tokens = len(ids[run.models[0].name]) if run.models else 0
        extra = room(run, whole)

        async def open_one(m: SourceModel) -> StateHandle:
            state = await m.engine.open(f"{rid}-{m.name}", ids[m.name], extra)
            # recorded at once: a request cancelled while others still open must release it
            run.states[m.name] = state
            return state

        await self.open_in_order(run, open_one)

    def codec(self, run: Run, m: SourceModel) -> IncrementalCodec:
        """A codec for an answer of ``m`` after the run's prompt (nothing committed)."""
        if run.prompt.messages is not None:
            return IncrementalCodec(m.tokenizer, "", self.window_pieces)
        return IncrementalCodec.after_prompt(m.tokenizer, run.prompt.text or "")

    def opening(self, name: str) -> asyncio.Lock:
        """Held while one request opens several states of model ``name`` at once (vote's
        samples): two requests each holding some of the engine's sequences while waiting
        for the rest would wait for ever."""
        return self._opening.setdefault(name, asyncio.Lock())

    async def open_in_order(
        self, run: Run, open_one: Callable[[SourceModel], Awaitable[T]]
    ) -> dict[str, T]:
        """``open_one`` for every model of the run, one after the other, always in the
        server's model order: an engine may make a request wait for cache room, and two
        requests that each held one engine while waiting for the other's would wait for
        ever. Waiting in line is not a hang, so no step timeout applies here."""
        order = [m for m in self.models.values() if m in run.models]
        opened = {m.name: asyncio.Event() for m in order}

        async def in_turn(m: SourceModel) -> T:
            at = order.index(m)
            try:
                if at:
                    await opened[order[at - 1].name].wait()
                return await open_one(m)
            finally:
                opened[m.name].set()

        return await self.each(run, in_turn, bounded_by_step=False)

    async def release(self, run: Run) -> None:
        """Release every engine state of the run, even while the request is cancelled.

        A disconnect cancels the request through anyio (sse-starlette), where every later
        await in the cancelled scope raises again; the releases therefore run in their
        own shielded task and finish whatever happens to the caller."""
        states, run.states = run.states, {}
        tasks = [*run.releases, *(self.start_release(n, s) for n, s in states.items())]
        run.releases = []
        if tasks:
            await asyncio.shield(asyncio.gather(*tasks))

    def start_release(self, name: str, state: StateHandle) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self._release_one(name, state))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def _release_one(self, name: str, state: StateHandle) -> None:
        try:
            await self.models[name].engine.release(state)
        except Exception:  # releasing must never mask the request's own outcome
            log.warning("releasing state of %s failed", name, exc_info=True)

    async def each(
        self,
        run: Run,
        work: Callable[[SourceModel], Awaitable[T]],
        bounded_by_step: bool = True,
        kind: Callable[[SourceModel], str] | str = "call",
        units: Callable[[SourceModel], int] | int = 1,
        done: Callable[[SourceModel, T], int] | None = None,
        at_least: Callable[[SourceModel], tuple[str, int] | None] | None = None,
    ) -> dict[str, T]:
        """Run ``work(model)`` for every active model concurrently; drop models that fail
        or, ``bounded_by_step``, miss their deadline (a call of ``kind`` over at most
        ``units`` of work, 0: none, such as a proposal made already; ``fusion.health``);
        their late results are discarded. ``done`` counts the work a result did, when it
        may be less than ``units`` (a segment that ended early); ``at_least``: a call of
        another kind over other units that this call takes at least as long as (a
        request's first generation: generating its tokens, whatever its prompt)."""
        models = list(run.models)
        calls = []
        for m in models:
            size = units(m) if callable(units) else units
            what = kind(m) if callable(kind) else kind
            floor = at_least(m) if at_least is not None else None
            work_done = (lambda r, m=m: done(m, r)) if done is not None else None
            call = _Call(m, what, size, self.inflight.get(m.name, 0), work(m), work_done, floor)
            calls.append(call)
            self.inflight[m.name] = self.inflight.get(m.name, 0) + 1
        try:
            late = await self._until_done_or_late(calls, bounded_by_step)
        finally:
            for c in calls:
                self.inflight[c.model.name] -= 1
                run.clock.add_busy(c.model.name, c.took())
                if not c.task.done():  # late, or the request was cancelled
                    c.task.cancel()
                    c.task.add_done_callback(_forget)
        out: dict[str, T] = {}
        for c in calls:
            m = c.model
            if m.name in late:
                self.drop(run, m, EngineError(late[m.name]), fault="dropped_late", since=c.at)
                continue
            exc = c.task.exception()
            if exc is None:
                out[m.name] = c.task.result()
                if bounded_by_step and c.units:  # model work answered (not an open)
                    self.health[m.name].refusals = 0
                did = c.did()
                if bounded_by_step and c.units and did:
                    # the whole call, time behind the calls it found running included: an
                    # engine that batches them (vLLM) takes about as long alone
                    self.times[m.name].observe(c.kind, did, c.took())
            elif isinstance(exc, RequestRejected) and bounded_by_step:
                # the request's input, not the model; unless every request is refused
                h = self.health[m.name]
                h.refusals += 1
                eject = h.refusals >= REFUSALS_TO_EJECT
                self.drop(run, m, exc, fault="dropped_failed", since=c.at, eject=eject)
            else:
                # a failure while opening (waiting in line, not bounded) ejects nothing
                self.drop(run, m, exc, fault="dropped_failed", since=c.at, eject=bounded_by_step)
        if not run.models:
            raise FusionError(
                "every source model failed: "
                + "; ".join(f"{n}: {u.dropped}" for n, u in run.outcome.usage.items() if u.dropped)
            )
        return out

    async def _until_done_or_late(self, calls: list[_Call], bounded: bool) -> dict[str, str]:
        """Wait for every call; the late ones (by name, with why) are left running. A call
        is late past its step timeout, or past its deadline once its peers are done."""
        late: dict[str, str] = {}
        pending = {c.model.name: c for c in calls}
        while pending:
            now = time.perf_counter()
            wake = math.inf
            for name, c in list(pending.items()):
                limit, why = self._limit(c, calls, pending) if bounded else (math.inf, "")
                if limit <= now:
                    late[name] = why
                    del pending[name]
                else:
                    wake = min(wake, limit)
            if not pending:
                break
            tasks = [c.task for c in pending.values()]
            timeout = None if wake == math.inf else max(0.0, wake - now)
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for name, c in list(pending.items()):
                if c.task.done():
                    c.ended = time.perf_counter()
                    del pending[name]
        return late

    def _limit(self, c: _Call, calls: list[_Call], pending: dict[str, _Call]) -> tuple[float, str]:
        """When ``c`` is late (perf_counter) and why: its step timeout, and its deadline
        once a peer has finished (or it has none), scaled by how much slower than usual
        the finished peers were. Until then a slow step may be everyone's."""
        m, p = c.model, self.policy
        hard = math.inf if m.step_timeout is None else c.started + m.step_timeout
        hard_why = f"engine {m.name}: no answer within its step timeout ({m.step_timeout} s)"
        usual = self._usual(c)
        peers = [x for x in calls if x is not c]
        finished = [x for x in peers if x.model.name not in pending]  # (or had no work)
        if usual is None or not c.units or (peers and not finished):
            return hard, hard_why
        load = max([1.0, *(x.slowdown(self._usual(x)) for x in finished if x.units)])
        allowed = max(p.deadline_floor_seconds, p.deadline_factor * usual * c.queued * load)
        if c.started + allowed >= hard:
            return hard, hard_why
        why = (
            f"engine {m.name}: no answer within its deadline ({allowed:.1f} s: "
            f"{p.deadline_factor:g}x its usual {usual:.2f} s for this {c.kind} call)"
        )
        return c.started + allowed, why

    def _usual(self, c: _Call) -> float | None:
        """What ``c`` usually takes over its units: the model's recent calls of its kind,
        and at least its ``at_least`` call; until calls of its kind are known, a first
        generation or a whole answer borrows the time of its units as generated tokens
        (generous: reading a prompt costs less per token)."""
        times, warmup = self.times[c.model.name], self.policy.warmup_calls
        usual = times.usual(c.kind, c.units, warmup)
        if usual is None and c.kind in ("first", "answer"):
            usual = times.usual("generate", c.units, warmup)
        if c.at_least is not None and usual is not None:
            kind, floor_units = c.at_least
            floor = times.usual(kind, floor_units, warmup)
            usual = max(usual, floor or 0.0)
        return usual

    def drop(
        self,
        run: Run,
        m: SourceModel,
        exc: BaseException,
        fault: FaultEvent | None = None,
        since: float | None = None,
        eject: bool = True,
    ) -> None:
        """Drop ``m`` from the request; a ``fault`` (a late or failed call, started at
        ``since``, monotonic) is counted and, with ``eject``, ejects it."""
        if not isinstance(exc, Exception):
            raise exc
        why = str(exc) or type(exc).__name__
        log.warning("source model %s dropped from request: %s", m.name, why)
        run.outcome.usage[m.name].dropped = why
        run.models = [x for x in run.models if x.name != m.name]
        # released now: a call still running for it (a timed-out one) stops at its next
        # token instead of holding the engine until the request ends
        state = run.states.pop(m.name, None)
        if state is not None:
            run.releases.append(self.start_release(m.name, state))
        if fault is not None:
            self._notify(fault, m.name)
            if eject:
                self.fault(m.name, why, since)

    # -- health across requests ----------------------------------------------------------
    def admit(self, run: Run) -> None:
        """Leave the ejected models out of a new request (recorded in its usage)."""
        out = self.ejected([m.name for m in run.models])
        for name, why in out.items():
            run.outcome.usage[name].dropped = why
        run.models = [m for m in run.models if m.name not in out]
        if not run.models:
            raise FusionError(unavailable(out))

    def ejected(self, names: Sequence[str]) -> dict[str, str]:
        """Which of ``names`` are ejected now, with since when and why."""
        out = {}
        for name in names:
            e = self.health[name].ejection
            if e is not None:
                since = time.strftime("%H:%M:%S", time.gmtime(e.since))
                out[name] = f"ejected since {since} UTC: {e.why}"
        return out

    def retry_in(self, names: Sequence[str]) -> int:
        """Whole seconds until the first of ``names`` is probed again (at least 1)."""
        now = time.monotonic()
        waits = [e.retry_at - now for n in names if (e := self.health[n].ejection) is not None]
        return max(1, math.ceil(min(waits, default=1.0)))

    def fault(self, name: str, why: str, since: float | None = None) -> None:
        """Eject ``name`` and start its probe (a fault while ejected, or of a call that
        started before its return, changes nothing but the reason)."""
        if self.health[name].fault(why, since):
            log.warning("source model %s ejected: %s", name, why)
            self._notify("ejected", name)
        if name not in self._probes and self.health[name].ejection is not None:
            self._probes[name] = asyncio.ensure_future(self._probe_until_back(name))

    async def _probe_until_back(self, name: str) -> None:
        h, m = self.health[name], self.models[name]
        try:
            while h.ejection is not None:
                await asyncio.sleep(max(0.0, h.ejection.retry_at - time.monotonic()))
                try:
                    await probe(m, self.policy.probe_timeout_seconds)
                except Exception as exc:
                    h.probe_failed(str(exc) or type(exc).__name__)
                    continue
                h.restore()
                log.warning("source model %s is back (its probe answered)", name)
                self._notify("returned", name)
        finally:
            self._probes.pop(name, None)

    def _notify(self, event: FaultEvent, name: str) -> None:
        if self.listener is not None:
            self.listener(event, name)

    def report(self) -> dict[str, dict[str, object]]:
        """Each model's health, as ``/health`` shows it."""
        return {name: h.report() for name, h in self.health.items()}

    async def close(self) -> None:
        """Stop the probes (at shutdown)."""
        probes = list(self._probes.values())
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)


class _Call:
    """One model's call within ``Members.each``: its work, size and timing."""

    def __init__(
        self,
        model: SourceModel,
        kind: str,
        units: int,
        queued: int,
        work: Awaitable[Any],
        done: Callable[[Any], int] | None = None,
        at_least: tuple[str, int] | None = None,
    ) -> None:
        self.model, self.kind, self.units = model, kind, units
        self.queued = 1 + queued  # its own and the calls it found running on the model
        self.at_least = at_least
        self._done = done
        self.started = time.perf_counter()
        self.at = time.monotonic()
        self.ended: float | None = None
        self.task: asyncio.Future[Any] = asyncio.ensure_future(work)

    def took(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def did(self) -> int:
        """The work its result did (its ``units`` unless told; 0 before a result)."""
        if not self.task.done() or self.task.cancelled() or self.task.exception():
            return 0
        return self.units if self._done is None else self._done(self.task.result())

    def slowdown(self, usual: float | None) -> float:
        """How much slower than ``usual`` (for all its units) this finished call was,
        for the work it did (1 when unknown)."""
        did = self.did()
        if self.ended is None or not usual or not did:
            return 1.0
        return self.took() / (usual * did / max(1, self.units) * self.queued)


def unavailable(ejected: dict[str, str]) -> str:
    """Why a request has no model to answer it."""
    return "no source model can answer: " + "; ".join(f"{n}: {w}" for n, w in ejected.items())


def _forget(task: asyncio.Future[Any]) -> None:
    """Retrieve a cancelled late call's outcome, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()
