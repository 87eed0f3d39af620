"""The OpenAI endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

A request is validated into a job (400s before any work), admitted (its choices count
against its lane's capacity), then answered. Streaming uses sse-starlette: per choice a
first chunk with the role, one chunk per selected segment and a final chunk with
``finish_reason`` (choices run concurrently, their chunks interleave), the usage chunk
when asked, then ``[DONE]``; an error after the first byte becomes one error event
followed by ``[DONE]``. However a request ends, its admission permit is given back once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from server.admission import Permit
from server.errors import to_api_error
from server.jobs import Job, response, usage_chunk
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import FusionService
from server.state import ServerState, require_key, server_state

T = TypeVar("T")
CLOSE_TIMEOUT_SECONDS = 30.0

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
State = Annotated[ServerState, Depends(server_state)]


@router.get("/models")
async def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": state.ready_service().model_cards()}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> dict[str, Any]:
    return state.ready_service().model_card(model_id)


@router.post("/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request, state: State) -> Response:
    service = state.ready_service()
    return await answer(state, service, service.chat_job(req), request, "chat")


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, state: State) -> Response:
    service = state.ready_service()
    return await answer(state, service, service.completion_job(req), request, "completions")


class _Admitted:
    """One admitted request's end: its permit given back and the request counted, once,
    whichever path gets there first (the handler, the stream's generator, its close)."""

    def __init__(
        self, state: ServerState, service: FusionService, job: Job, endpoint: str, permit: Permit
    ) -> None:
        self.state, self.service, self.job, self.endpoint = state, service, job, endpoint
        self.permit = permit
        self.started = time.monotonic()
        self.done = False

    def finish(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        self.permit.release()
        elapsed = time.monotonic() - self.started
        self.state.metrics.requests.labels(self.endpoint, self.job.model, status).inc()
        self.state.metrics.latency.labels(self.endpoint).observe(elapsed)
        self.service.log_done(self.job, elapsed, status)


class _ClosingEventSource(EventSourceResponse):
    """An event stream whose ``on_close`` runs however the response ends. sse-starlette
    runs ``background`` only after a complete response and never starts the iterator when
    the client is gone before the first event, so neither the generator's ``finally`` nor
    a background task alone is guaranteed to run."""

    def __init__(
        self,
        content: AsyncGenerator[dict[str, str], None],
        on_close: Callable[[], Awaitable[None]],
        **kw: Any,
    ) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # shielded: a cancelled response must still close; bounded: a hung engine
            # release must not hold the connection's task for ever
            with anyio.move_on_after(CLOSE_TIMEOUT_SECONDS, shield=True):
                await self._on_close()


# a streamed answer's SSE events; it gives the request's admission back (``finish``)
StreamEvents = Callable[[FusionService, Job, _Admitted], AsyncGenerator[dict[str, str], None]]


async def answer(
    state: ServerState,
    service: FusionService,
    job: Job,
    request: Request,
    endpoint: str,
    *,
    body: Callable[[Job], dict[str, Any]] = response,
    stream_events: StreamEvents | None = None,
) -> Response:
    """Admit ``job``, run it and answer: ``body`` makes the JSON answer, ``stream_events``
    the event stream (chat and completions objects by default; /v1/responses gives its
    own, server/routers/responses.py)."""
    service.check_available(job)
    permit = await state.admission.acquire(len(job.choices), single=job.single)
    admitted = _Admitted(state, service, job, endpoint, permit)
    if job.stream:
        events = (stream_events or _stream)(service, job, admitted)

        async def close() -> None:
            try:
                # the client may have left with the iterator suspended at a yield:
                # closing it runs the fusion runs' cleanup (engine releases)
                await events.aclose()
            finally:
                admitted.finish("499")  # a no-op unless the stream never finished

        server = state.config.server
        try:
            return _ClosingEventSource(
                events,
                close,
                ping=server.keepalive_seconds,
                headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
                # on SIGTERM a stream may finish within the grace period (uvicorn's own
                # graceful-shutdown timeout is the same grace, plus a second)
                shutdown_grace_period=server.shutdown_grace_seconds,
            )
        except BaseException:
            admitted.finish("500")
            raise
    status = "499"
    try:
        await _until_disconnected(request, service.run_all(job))
        status = "200"
        return JSONResponse(body(job))
    except _ClientGone:
        # nobody reads this answer; returning it (rather than raising) keeps a client
        # that leaves out of the error log
        return Response(status_code=499)
    except Exception as exc:
        err = to_api_error(exc)
        status = str(err.status)
        raise err from exc
    finally:
        admitted.finish(status)


async def _stream(
    service: FusionService, job: Job, admitted: _Admitted
) -> AsyncGenerator[dict[str, str], None]:
    status = "200"
    try:
        async with contextlib.aclosing(service.chunks(job)) as chunks:
            async for chunk in chunks:
                yield _data(chunk)
        if job.include_usage:
            yield _data(usage_chunk(job))
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # the client went away; the fusion runs released their engines
        raise
    except Exception as exc:
        err = to_api_error(exc)
        status = str(err.status)
        yield _data(err.body())
    finally:
        admitted.finish(status)
    yield {"data": "[DONE]"}


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer."""


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it (and its engine work) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _data(obj: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(obj, ensure_ascii=False)}
