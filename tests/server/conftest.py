"""In-process app tests: the real app and fuser, scripted engines at the engine boundary."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import load_config

SCRIPT = "The cat sat on the mat. It was warm."


@pytest.fixture
def make_config():
    def make(**server: Any):
        return load_config(
            None,
            models=[
                {"name": "smollm2-135m", "source": "pip:smollm2-135m-instruct"},
                {"name": "gemma3-270m", "source": "pip:gemma3-270m"},
                {"name": "qwen2.5-0.5b", "source": "pip:qwen2.5-coder-0.5b-instruct"},
            ],
            server=server,
        )

    return make


@pytest.fixture
def trio(make_model) -> Callable[..., list]:
    def make(script: str = SCRIPT, **engine_kw: Any):
        return [
            make_model(t, script, **engine_kw)
            for t in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")
        ]

    return make


@pytest.fixture
def client(make_config, trio):
    """``async with client(models=..., **server_settings) as http:`` a started app."""

    @asynccontextmanager
    async def make(models=None, **server: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(make_config(**server), models=models if models is not None else trio())
        async with app.router.lifespan_context(app):
            await _wait_ready(app)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                http.app = app  # type: ignore[attr-defined]
                yield http

    return make


async def _wait_ready(app) -> None:
    import asyncio

    for _ in range(200):
        if app.state.fusion.service is not None or app.state.fusion.load_error:
            return
        await asyncio.sleep(0.01)


@pytest.fixture
def live_server(make_config, trio):
    """``async with live_server(models) as base_url:`` a real uvicorn on loopback (this loop)."""
    import asyncio
    import socket

    import uvicorn

    @asynccontextmanager
    async def make(models=None, **server: Any) -> AsyncIterator[str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        app = create_app(make_config(**server), models=models if models is not None else trio())
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        srv = uvicorn.Server(config)
        task = asyncio.ensure_future(srv.serve())
        while not srv.started:
            await asyncio.sleep(0.01)
        await _wait_ready(app)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            srv.should_exit = True
            await task

    return make
