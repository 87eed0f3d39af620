"""The OpenAI endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Streaming uses sse-starlette: a first chunk with the role, one chunk per selected
segment, a final chunk with ``finish_reason``, the usage chunk when asked, then
``[DONE]``; an error after the first byte becomes one error event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from server.errors import to_api_error
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import FusionService, Job
from server.state import ServerState, require_key, server_state

T = TypeVar("T")

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
    return await _answer(state, service, service.chat_job(req), request, "chat")


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, state: State) -> Response:
    service = state.ready_service()
    return await _answer(state, service, service.completion_job(req), request, "completions")


async def _answer(
    state: ServerState, service: FusionService, job: Job, request: Request, endpoint: str
) -> Response:
    await state.admission.acquire()
    if job.stream:
        events = _stream(state, service, job, endpoint)
        server = state.config.server
        return EventSourceResponse(
            events,
            # When the client leaves, sse-starlette cancels the sending task and drops
            # the iterator, possibly suspended at a yield: closing it here runs the
            # fusion run's cleanup (engine releases) instead of leaving it to the GC.
            background=BackgroundTask(events.aclose),
            ping=server.keepalive_seconds,
            headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
            # on SIGTERM a stream may finish within the grace period (uvicorn's own
            # graceful-shutdown timeout is the same grace, plus a second)
            shutdown_grace_period=server.shutdown_grace_seconds,
        )
    started = time.monotonic()
    status = "499"
    try:
        await _until_disconnected(request, service.run_all(job))
        status = "200"
        return JSONResponse(service.response(job))
    except Exception as exc:
        err = to_api_error(exc)
        status = str(err.status)
        raise err from exc
    finally:
        state.admission.release()
        _finish(state, service, job, endpoint, status, started)


async def _stream(
    state: ServerState, service: FusionService, job: Job, endpoint: str
) -> AsyncGenerator[dict[str, str], None]:
    status = "200"
    started = time.monotonic()
    try:
        for choice in job.choices:
            if job.kind == "chat":
                yield _data(service.chunk(job, choice.index, "", role=True))
            # aclosing: when the client leaves, this generator is closed at a yield,
            # and only an explicit close reaches the fusion run's engine release
            async with contextlib.aclosing(service.segments(job, choice)) as segments:
                async for seg in segments:
                    if seg.text or job.trace:
                        yield _data(service.chunk(job, choice.index, seg.text, seg=seg))
            yield _data(service.chunk(job, choice.index, finish=choice.outcome.finish_reason))
        if job.include_usage:
            yield _data(service.usage_chunk(job))
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # the client went away; the fusion run released its engines
        raise
    except Exception as exc:
        err = to_api_error(exc)
        status = str(err.status)
        yield _data(err.body())
    finally:
        state.admission.release()
        _finish(state, service, job, endpoint, status, started)
    yield {"data": "[DONE]"}


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it (and its engine work) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _finish(
    state: ServerState,
    service: FusionService,
    job: Job,
    endpoint: str,
    status: str,
    started: float,
) -> None:
    elapsed = time.monotonic() - started
    state.metrics.requests.labels(endpoint, job.model, status).inc()
    state.metrics.latency.labels(endpoint).observe(elapsed)
    service.log_done(job, elapsed, status)


def _data(obj: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(obj, ensure_ascii=False)}
