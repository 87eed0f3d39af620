"""The source models of the fused model, and their lifecycle within one request: open a
state in every engine, run work on every model at once (dropping a model that fails or
times out), and release every state, also when the request is cancelled."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from fusion.engine import EngineError, StateHandle
from fusion.models import SourceModel
from fusion.run import FusionError, Run, prompt_ids, room
from fusion.types import each_once
from tokenizers_align import IncrementalCodec

log = logging.getLogger(__name__)
T = TypeVar("T")


class Members:
    """The fused model's source models, by name, in the server's order."""

    def __init__(self, models: Sequence[SourceModel], window_pieces: int = 4) -> None:
        self.models = {m.name: m for m in models}
        self.window_pieces = window_pieces
        self._releasing: set[asyncio.Future[None]] = set()  # releases outliving their request

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
            if run.prompt.messages is not None:
                codec = IncrementalCodec(m.tokenizer, "", self.window_pieces)
            else:
                codec = IncrementalCodec.after_prompt(m.tokenizer, run.prompt.text or "")
            run.codecs[m.name] = codec
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
    ) -> dict[str, T]:
        """Run ``work(model)`` for every active model concurrently (each within its step
        timeout); drop models that fail."""
        models = list(run.models)

        async def timed(m: SourceModel) -> T:
            started = time.perf_counter()
            try:
                return await (bounded(m, work(m)) if bounded_by_step else work(m))
            finally:
                run.clock.add_busy(m.name, time.perf_counter() - started)

        results = await asyncio.gather(*(timed(m) for m in models), return_exceptions=True)
        out: dict[str, T] = {}
        for m, res in zip(models, results):
            if isinstance(res, asyncio.CancelledError):
                raise res
            if isinstance(res, BaseException):
                self.drop(run, m, res)
            else:
                out[m.name] = res
        if not run.models:
            raise FusionError(
                "every source model failed: "
                + "; ".join(f"{n}: {u.dropped}" for n, u in run.outcome.usage.items() if u.dropped)
            )
        return out

    def drop(self, run: Run, m: SourceModel, exc: BaseException) -> None:
        if not isinstance(exc, Exception):
            raise exc
        log.warning("source model %s dropped from request: %s", m.name, exc)
        run.outcome.usage[m.name].dropped = str(exc) or type(exc).__name__
        run.models = [x for x in run.models if x.name != m.name]
        # released now: a call still running for it (a timed-out one) stops at its next
        # token instead of holding the engine until the request ends
        state = run.states.pop(m.name, None)
        if state is not None:
            run.releases.append(self.start_release(m.name, state))


async def bounded(m: SourceModel, work: Awaitable[T]) -> T:
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
