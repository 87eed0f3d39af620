"""The FastAPI app: ``create_app(config, models=...)`` builds everything and mounts the
routers (``server/routers/``: OpenAI endpoints, the Responses API, operations,
playground).

Engines load in the background at start-up, so ``/health`` answers 503 ("loading")
until every source model is ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from fusion.models import SourceModel
from server.admission import Admission
from server.config import AppConfig
from server.errors import PayloadTooLarge, error_response, install_error_handlers
from server.metrics import Metrics
from server.routers import openai, ops, playground, responses
from server.serving import FusionService
from server.state import ServerState

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413, by their declared size or, for
    a chunked body, by what arrives: the body is read here (at most ``max_bytes``) and
    handed on whole, since a failure raised inside the app's own read would come out as
    a 400 "error parsing the body"."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_response(PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes"))
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        whole: list[Any] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> Any:
            # the body once, then the connection's own messages (a disconnect)
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)


def create_app(config: AppConfig, models: list[SourceModel] | None = None) -> FastAPI:
    """The app; ``models`` injects already running source models (tests), else the
    configured ones are loaded at start-up and shut down at exit."""
    metrics = Metrics()
    state = ServerState(
        config,
        Admission(
            metrics,
            fused=config.server.max_concurrent,
            single=config.server.max_concurrent_single,
            max_queue=config.server.max_queue,
        ),
        metrics,
        api_keys=config.all_api_keys(),
    )
    if models is not None:  # already running: serve at once
        state.models = models
        state.service = FusionService(config, models, state.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if models is not None:  # injected: the caller starts and stops them
            try:
                yield
            finally:
                if state.service is not None:
                    await state.service.fuser.close()  # its probes of ejected models
            return
        loader = asyncio.ensure_future(_load(state))
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.service is not None:
                await state.service.fuser.close()
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
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    playground.install(app)
    return app


async def _load(state: ServerState) -> None:
    """Load the configured source models; on failure keep the reason for ``/health``."""
    from server.engines import load_models

    config = state.config
    try:
        loaded = await load_models(config)
    except Exception as exc:
        state.load_error = f"loading the source models failed: {exc}"
        log.error("%s", state.load_error)
        if state.on_load_error is not None:
            state.on_load_error()
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
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=level if level in ("debug", "info", "warning", "error") else "info",
            timeout_graceful_shutdown=int(config.server.shutdown_grace_seconds) + 1,
        )
    )
    state: ServerState = app.state.fusion

    def stop() -> None:
        server.should_exit = True

    state.on_load_error = stop  # a start that cannot load its models fails, as vLLM's does
    server.run()
    return 1 if state.load_error else 0
