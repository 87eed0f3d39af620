"""Bounded concurrency in two lanes: a few choices generate, a bounded queue waits, the
rest get 429.

Capacity is counted in choices (fusion runs), not requests: a request with k choices
takes k units of its lane (all of them if k is larger; it then runs alone). Requests
that run one source model (``model`` set to a source's name, e.g. a chat UI's title or
tag task) have a lane of their own, so they never queue behind fused requests that hold
every slot. Each lane is first come, first served.
"""

from __future__ import annotations

import asyncio
from collections import deque

from server.errors import Overloaded
from server.metrics import Metrics


class Permit:
    """One admitted request's units of a lane; ``release`` gives them back exactly once,
    however often it is called (a response's close hook and its generator may both)."""

    def __init__(self, lane: Lane, units: int) -> None:
        self.lane = lane
        self.units = units
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.lane._give_back(self.units)


class Lane:
    """A weighted FIFO semaphore with a bounded queue of waiting requests."""

    def __init__(self, name: str, capacity: int, max_queue: int, metrics: Metrics) -> None:
        self.name = name
        self.capacity = capacity
        self.free = capacity
        self.max_queue = max_queue
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._metrics = metrics

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, choices: int) -> Permit:
        units = max(1, min(choices, self.capacity))
        if not self._waiters and self.free >= units:
            return self._grant(units)
        if len(self._waiters) >= self.max_queue:
            raise Overloaded("too many requests are queued; retry shortly", retry_after=5)
        entry = (units, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        self._metrics.queued.inc()
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self._give_back(units)  # granted just as the caller left: pass it on
            else:
                if entry in self._waiters:  # else _wake already dropped it
                    self._waiters.remove(entry)
                self._wake()  # it may have been first in line: the next may fit now
            raise
        finally:
            self._metrics.queued.dec()
        return Permit(self, units)

    def _grant(self, units: int) -> Permit:
        self.free -= units
        self._metrics.in_flight.inc()
        return Permit(self, units)

    def _give_back(self, units: int) -> None:
        self.free += units
        self._metrics.in_flight.dec()
        self._wake()

    def _wake(self) -> None:
        """Admit waiters in order while the first one fits (no overtaking: no starvation)."""
        while self._waiters:
            units, fut = self._waiters[0]
            if fut.done():  # cancelled, its task not yet resumed: it takes nothing
                self._waiters.popleft()
                continue
            if units > self.free:
                break
            self._waiters.popleft()
            self.free -= units
            self._metrics.in_flight.inc()
            fut.set_result(None)


class Admission:
    """The fused lane and the single-model lane."""

    def __init__(self, metrics: Metrics, *, fused: int, single: int, max_queue: int) -> None:
        self.fused = Lane("fused", fused, max_queue, metrics)
        self.single = Lane("single", single, max_queue, metrics)

    async def acquire(self, choices: int, *, single: bool) -> Permit:
        """Wait for ``choices`` units in the request's lane (429 when its queue is full)."""
        return await (self.single if single else self.fused).acquire(choices)
