"""Bounded concurrency in two lanes: a few choices generate, a bounded queue waits, the
rest get 429.

Capacity is counted in choices (fusion runs), not requests: a request with k choices
takes k units of its lane (all of them if k is larger; it then runs alone). Requests
that run one source model (``model`` set to a source's name, e.g. a chat UI's title or
tag task) have a lane of their own, so they never queue behind fused requests that hold
every slot. Each lane is first come, first served.
"""

from __future__ import annotations

from fusion.capacity import Pool
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
    """A first-come-first-served pool of choices with a bounded queue of waiting requests."""

    def __init__(self, name: str, capacity: int, max_queue: int, metrics: Metrics) -> None:
        self.name = name
        self.capacity = capacity
        self.max_queue = max_queue
        self._pool = Pool(capacity)
        self._metrics = metrics

    @property
    def free(self) -> int:
        return self._pool.free

    @property
    def waiting(self) -> int:
        return self._pool.waiting

    async def acquire(self, choices: int) -> Permit:
        units = max(1, min(choices, self.capacity))
        if not self._pool.take_now(units):
            if self._pool.waiting >= self.max_queue:
                raise Overloaded("too many requests are queued; retry shortly", retry_after=5)
            self._metrics.queued.inc()
            try:
                await self._pool.take(units)
            finally:
                self._metrics.queued.dec()
        self._metrics.in_flight.inc()
        return Permit(self, units)

    def _give_back(self, units: int) -> None:
        self._metrics.in_flight.dec()
        self._pool.give(units)


class Admission:
    """The fused lane and the single-model lane."""

    def __init__(self, metrics: Metrics, *, fused: int, single: int, max_queue: int) -> None:
        self.fused = Lane("fused", fused, max_queue, metrics)
        self.single = Lane("single", single, max_queue, metrics)

    async def acquire(self, choices: int, *, single: bool) -> Permit:
        """Wait for ``choices`` units in the request's lane (429 when its queue is full)."""
        return await (self.single if single else self.fused).acquire(choices)
