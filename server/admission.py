"""Bounded concurrency: a few requests generate, a bounded queue waits, the rest get 429."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.errors import Overloaded
from server.metrics import Metrics


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, metrics: Metrics) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_queue = max_queue
        self._waiting = 0
        self._metrics = metrics

    async def acquire(self) -> None:
        if self._slots.locked() and self._waiting >= self._max_queue:
            raise Overloaded("too many requests are queued; retry shortly", retry_after=5)
        self._waiting += 1
        self._metrics.queued.set(self._waiting)
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self._metrics.queued.set(self._waiting)
        self._metrics.in_flight.inc()

    def release(self) -> None:
        self._slots.release()
        self._metrics.in_flight.dec()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
