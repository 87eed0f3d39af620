"""The FastAPI app: ``create_app(config, models=...)`` builds everything, routes stay thin.

Engines load in the background at start-up, so ``/health`` answers 503 ("loading")
until every source model is ready. Streaming uses sse-starlette: a first chunk with the
role, one chunk per selected segment, a final chunk with ``finish_reason``, the usage
chunk when asked, then ``[DONE]``; an error after the first byte becomes one error event
followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from fusion.models import SourceModel
from server.admission import Admission
from server.config import AppConfig
from server.errors import (
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    error_response,
    install_error_handlers,
    to_api_error,
)
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import FusionService, Job

PLAYGROUND = Path(__file__).parent / "static" / "playground"

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerState:
    config: AppConfig
    metrics: Metrics = field(default_factory=Metrics)
    service: FusionService | None = None
    models: list[SourceModel] = field(default_factory=list)
    load_error: str | None = None
    admission: Admission | None = None

    def ready_service(self) -> FusionService:
        if self.service is None:
            why = self.load_error or "the source models are still loading"
            raise Unavailable(f"service unavailable: {why}", retry_after=10)
        return self.service


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413 (declared or actual size)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        try:
            await self.app(scope, limited, send)
        except PayloadTooLarge as exc:
            await error_response(exc)(scope, receive, send)


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


def create_app(config: AppConfig, models: list[SourceModel] | None = None) -> FastAPI:
    """The app; ``models`` injects already running source models (tests), else the
    configured ones are loaded at start-up and shut down at exit."""
    state = ServerState(config)
    state.admission = Admission(
        config.server.max_concurrent, config.server.max_queue, state.metrics
    )
    keys = config.all_api_keys()
    if models is not None:  # already running: serve at once
        state.models = models
        state.service = FusionService(config, models, state.metrics)

    async def load() -> None:
        from server.engines import load_models

        if models is not None:
            return
        try:
            loaded = await load_models(config)
        except Exception as exc:
            state.load_error = f"loading the source models failed: {exc}"
            log.error("%s", state.load_error)
            return
        state.models = loaded
        state.service = FusionService(config, loaded, state.metrics)
        log.info(
            "ready: %d source models (%s); fused model %r; playground: http://%s:%d/playground",
            len(loaded),
            ", ".join(m.name for m in loaded),
            config.fusion.name,
            config.server.host,
            config.server.port,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.ensure_future(load())
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if models is None:
                state.service = None
                from server.engines import shutdown_models

                await shutdown_models(state.models)

    app = FastAPI(title="fusion-server", version="0.1.0", lifespan=lifespan)
    app.state.fusion = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.server.max_body_bytes)
    if config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.server.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    async def require_key(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare against every key, always, so timing says nothing about which matched
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(given, key.encode())
        if not ok:
            raise Unauthorized("invalid or missing API key (Authorization: Bearer <key>)")

    v1 = [Depends(require_key)]

    @app.get("/health")
    async def health() -> Response:
        service = state.service
        if service is None:
            why = state.load_error or "loading"
            return JSONResponse({"status": why}, status_code=503)
        unhealthy = await _engine_health()
        if unhealthy:
            return JSONResponse({"status": "unhealthy", "engines": unhealthy}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _engine_health() -> dict[str, str]:
        unhealthy = {}
        for m in state.models:
            try:
                await m.engine.check_health()
                state.metrics.engine_up.labels(m.name).set(1)
            except Exception as exc:
                state.metrics.engine_up.labels(m.name).set(0)
                unhealthy[m.name] = str(exc)
        return unhealthy

    @app.get("/metrics")
    async def metrics() -> Response:
        await _engine_health()
        for m in state.models:
            open_states = getattr(m.engine, "open_states", None)
            if open_states is not None:
                state.metrics.open_states.labels(m.name).set(open_states)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/fusion/stats", dependencies=v1)
    async def fusion_stats() -> dict[str, Any]:
        """Per source model, over fused segments since start: share won, perplexity, latency."""
        return state.metrics.source_stats()

    @app.get("/playground", include_in_schema=False)
    async def playground_page() -> Response:
        return RedirectResponse("/playground/")

    app.mount("/playground/", StaticFiles(directory=PLAYGROUND, html=True), name="playground")

    @app.get("/v1/models", dependencies=v1)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": state.ready_service().model_cards()}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def get_model(model_id: str) -> dict[str, Any]:
        return state.ready_service().model_card(model_id)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        service = state.ready_service()
        return await _answer(service, service.chat_job(req), request, "chat")

    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        service = state.ready_service()
        return await _answer(service, service.completion_job(req), request, "completions")

    async def _answer(
        service: FusionService, job: Job, request: Request, endpoint: str
    ) -> Response:
        assert state.admission is not None
        await state.admission.acquire()
        if job.stream:
            events = _stream(service, job, endpoint)
            return EventSourceResponse(
                events,
                # When the client leaves, sse-starlette cancels the sending task and drops
                # the iterator, possibly suspended at a yield: closing it here runs the
                # fusion run's cleanup (engine releases) instead of leaving it to the GC.
                background=BackgroundTask(events.aclose),
                ping=config.server.keepalive_seconds,
                headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
                # on SIGTERM a stream may finish within the grace period (uvicorn's own
                # graceful-shutdown timeout is the same grace, plus a second)
                shutdown_grace_period=config.server.shutdown_grace_seconds,
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
            _finish(service, job, endpoint, status, started)

    async def _stream(
        service: FusionService, job: Job, endpoint: str
    ) -> AsyncIterator[dict[str, str]]:
        assert state.admission is not None
        status = "200"
        started = time.monotonic()
        try:
            for choice in job.choices:
                if job.kind == "chat":
                    yield _data(service.chunk(job, choice.index, "", role=True))
                # aclosing: when the client leaves, this generator is closed at a yield,
                # and only an explicit close reaches the fusion run's engine release
                async with contextlib.aclosing(service.segments(choice)) as segments:
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
            _finish(service, job, endpoint, status, started)
        yield {"data": "[DONE]"}

    def _finish(
        service: FusionService, job: Job, endpoint: str, status: str, started: float
    ) -> None:
        elapsed = time.monotonic() - started
        state.metrics.requests.labels(endpoint, job.model, status).inc()
        state.metrics.latency.labels(endpoint).observe(elapsed)
        service.log_done(job, elapsed, status)

    return app


def _data(obj: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(obj, ensure_ascii=False)}


def serve(config: AppConfig) -> int:
    """Run the server with uvicorn until SIGINT/SIGTERM."""
    return serve_app(config, None)


def serve_app(config: AppConfig, models: list[SourceModel] | None) -> int:
    """Serve ``create_app(config, models)``. SIGTERM stops accepting connections, lets
    in-flight requests and streams finish within ``shutdown_grace_seconds``, then closes
    every engine in the app's lifespan."""
    import uvicorn

    app = create_app(config, models)
    host, port = config.server.host, config.server.port
    log.info(
        "serving http://%s:%d/v1 (fused model %r; /health answers 200 once the models are loaded)"
        "; playground: http://%s:%d/playground",
        host,
        port,
        config.fusion.name,
        host,
        port,
    )
    # uvicorn logs at the level given to the CLI (--log-level), access lines included
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=level if level in ("debug", "info", "warning", "error") else "info",
        timeout_graceful_shutdown=int(config.server.shutdown_grace_seconds) + 1,
    )
    return 0
