"""A first-come-first-served pool of units: request slots in the server's admission lanes,
KV cells in the llama.cpp engine.

A waiter takes its units only when it is first in line and they are free (no overtaking,
so a large request is not starved by small ones). Cancelling a waiter never loses units:
a task's future is cancelled at once but the task resumes later, and a release in
between must pass the units on rather than hand them to the cancelled waiter.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Pool:
    def __init__(self, capacity: int) -> None:
        self.free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take_now(self, units: int) -> bool:
        """Take ``units`` if nobody waits and they are free."""
        if self._waiters or self.free < units:
            return False
        self.free -= units
        return True

    async def take(self, units: int) -> None:
        """Wait in line for ``units`` and take them (the caller caps them at the
        capacity: more would never come free)."""
        if self.take_now(units):
            return
        entry = (units, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.give(units)  # granted just as the caller left: pass it on
            else:
                if entry in self._waiters:  # else _wake already dropped it
                    self._waiters.remove(entry)
                self._wake()  # it may have been first in line: the next may fit now
            raise

    def give(self, units: int) -> None:
        self.free += units
        self._wake()

    def _wake(self) -> None:
        """Grant waiters in order while the first one fits."""
        while self._waiters:
            units, fut = self._waiters[0]
            if fut.done():  # cancelled, its task not yet resumed: it takes nothing
                self._waiters.popleft()
                continue
            if units > self.free:
                break
            self._waiters.popleft()
            self.free -= units
            fut.set_result(None)
