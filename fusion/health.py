"""Each source model's health across requests: how long its calls normally take (from
which a call's deadline follows), whether it is ejected, and the probe that brings it
back (docs/DEPLOYMENT.md, "When a source model fails").

A deadline is the model's own: members differ in speed by far more than any fixed factor
(a remote model on a loaded CPU server may take seconds per step where an in-process one
takes tens of milliseconds), so a call is late when it takes ``deadline_factor`` times
what *this model's* recent calls of the same kind took per unit of work, scaled by the
calls it had queued at the start and by how much slower than usual its peers were in the
same step (load slows every member alike; a hang slows one). Until a model has made
``warmup_calls`` calls of a kind, only the outer limit (its ``step_timeout``) applies.

A call that fails or is late drops the model from that request and ejects it: new
requests leave it out at once, and a background probe (its ``check_health`` and a one-
token generation, since a hung process may still answer ``/health``) brings it back. The
ejection lasts ``eject_seconds`` at first and doubles each time the model fails again
within ``forgive_seconds`` of its return (a flapping model stays out longer), up to
``max_eject_seconds``."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fusion.engine import EngineError
from fusion.models import SourceModel

log = logging.getLogger(__name__)

MemberState = Literal["up", "ejected"]
# what a fault event reports: a model dropped from one request (why: late or failed), a
# model ejected, a model back after its probe
FaultEvent = Literal["dropped_late", "dropped_failed", "ejected", "returned"]
FaultListener = Callable[[FaultEvent, str], None]


@dataclass(frozen=True)
class FaultPolicy:
    """Deadlines, ejection and return (defaults measured: docs/BENCHMARKS.md, "Faults")."""

    deadline_factor: float = 5.0
    deadline_floor_seconds: float = 5.0
    warmup_calls: int = 3
    window_calls: int = 64
    eject_seconds: float = 1.0
    max_eject_seconds: float = 15.0
    forgive_seconds: float = 60.0
    probe_timeout_seconds: float = 10.0


class CallTimes:
    """One model's recent seconds per unit of work (a token to generate, score or
    commit), per kind of call."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._rates: dict[str, deque[float]] = {}

    def observe(self, kind: str, units: int, seconds: float) -> None:
        rates = self._rates.setdefault(kind, deque(maxlen=self.window))
        rates.append(seconds / max(1, units))

    def usual(self, kind: str, units: int, warmup: int) -> float | None:
        """What a call of ``units`` usually takes: the 90th percentile of recent rates
        (None until ``warmup`` calls of the kind were seen)."""
        rates = self._rates.get(kind)
        if rates is None or len(rates) < max(1, warmup):
            return None
        ordered = sorted(rates)
        return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)] * max(1, units)


@dataclass(frozen=True)
class Ejection:
    since: float  # wall clock (time.time()), for /health
    why: str
    retry_at: float  # monotonic: when the next probe runs


class MemberHealth:
    """Whether one model takes part in new requests; its ejections and their back-off."""

    def __init__(self, policy: FaultPolicy) -> None:
        self.policy = policy
        self.ejection: Ejection | None = None
        self.backoff = 0.0
        self.returned_at = -math.inf  # monotonic
        self.refusals = 0  # its requests refused in a row (Members.each)

    @property
    def state(self) -> MemberState:
        return "up" if self.ejection is None else "ejected"

    def fault(self, why: str, since: float | None = None) -> bool:
        """Eject after a fault of a call that started at ``since`` (monotonic); True when
        newly ejected. While ejected, or for a call that started before the model's
        return, only the reason changes: every request that was waiting on the model
        reports the same fault, which is one."""
        now = time.monotonic()
        e = self.ejection
        if e is not None or (since is not None and since < self.returned_at):
            if e is not None:
                self.ejection = Ejection(e.since, why, e.retry_at)
            return False
        if now - self.returned_at > self.policy.forgive_seconds:
            self.backoff = 0.0  # up long enough: a fault starts the back-off afresh
        self._eject(why, time.time(), now)
        return True

    def probe_failed(self, why: str) -> None:
        """The probe found the model still broken: eject it for twice as long."""
        since = self.ejection.since if self.ejection is not None else time.time()
        self._eject(why, since, time.monotonic())

    def _eject(self, why: str, since: float, now: float) -> None:
        p = self.policy
        self.backoff = min(p.max_eject_seconds, self.backoff * 2 or p.eject_seconds)
        self.ejection = Ejection(since, why, now + self.backoff)

    def restore(self) -> None:
        self.ejection = None
        self.returned_at = time.monotonic()

    def report(self) -> dict[str, object]:
        """The model's entry in ``/health``."""
        e = self.ejection
        if e is None:
            return {"state": "up"}
        retry = max(0.0, e.retry_at - time.monotonic())
        return {"state": "ejected", "since": e.since, "error": e.why, "retry_in": round(retry, 3)}


async def probe(m: SourceModel, timeout: float) -> None:
    """Raise unless the model answers its health check and generates one token within
    ``timeout`` seconds (a hung engine may still answer a health check)."""

    async def once() -> None:
        ids = m.tokenizer.encode_prompt("Hello")
        state = await m.engine.open(f"probe-{uuid.uuid4().hex}-{m.name}", ids, 1)
        try:
            await m.engine.generate(state, 1, frozenset(), lambda _: False)
        finally:
            await asyncio.shield(m.engine.release(state))
        # after the token: an engine that marks itself broken after failures (the
        # transformers engine) is healthy again once model work succeeds
        await m.engine.check_health()

    try:
        await asyncio.wait_for(once(), timeout)
    except TimeoutError:
        raise EngineError(f"probe of {m.name}: no token within {timeout:g} s") from None
