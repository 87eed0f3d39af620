"""Shared fixtures: the real tokenizers and model folders (from pip packages / npm)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings

from fusion.models import ChatTemplate, SourceModel
from fusion.sources import resolve_source
from server.app import create_app
from server.config import load_config
from tests.fixtures import extra_tokenizers
from tests.fusion.fake_engine import ScriptedEngine
from tokenizers_align import TokenizerAdapter

# Property tests draw the same examples on every run (CI must not fail on one machine's
# luck); HYPOTHESIS_PROFILE=explore draws new ones, to look for what they have not seen.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SCRIPT = "The cat sat on the mat. It was warm."
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"

DEFAULT_SOURCES = {
    "smollm2-135m": "pip:smollm2-135m-instruct",
    "gemma3-270m": "pip:gemma3-270m",
    "qwen2.5-0.5b": "pip:qwen2.5-coder-0.5b-instruct",
}


def scripted_model(
    name: str,
    adapter: TokenizerAdapter,
    script: str,
    engine_type: type[ScriptedEngine] = ScriptedEngine,
    **engine_kw: Any,
) -> SourceModel:
    """A source model with a real tokenizer and a scripted engine (the engine boundary)."""
    end_id = adapter.eos_ids[0]
    engine = engine_type(name, adapter, script, end_id=end_id, **engine_kw)
    return SourceModel(
        name=name,
        engine=engine,
        tokenizer=adapter,
        chat_template=ChatTemplate(TEMPLATE),
        chat_end_id=end_id,
    )


def make_scripted_models(
    adapters: dict[str, TokenizerAdapter], script: str, **engine_kw: Any
) -> list[SourceModel]:
    """The default trio's tokenizers, each with a scripted engine writing ``script``."""
    names = ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")
    return [scripted_model(n, adapters[n], script, **engine_kw) for n in names]


@pytest.fixture(scope="session")
def model_dirs() -> dict[str, Path]:
    """HF folders of the three default models (converted once, then cached)."""
    return {name: resolve_source(src) for name, src in DEFAULT_SOURCES.items()}


@pytest.fixture(scope="session")
def default_adapters(model_dirs: dict[str, Path]) -> dict[str, TokenizerAdapter]:
    return {name: TokenizerAdapter.from_dir(d, name=name) for name, d in model_dirs.items()}


@pytest.fixture(scope="session")
def all_adapters(default_adapters: dict[str, TokenizerAdapter]) -> dict[str, TokenizerAdapter]:
    """The default trio plus Llama-3 and Llama-2."""
    extra = {
        name: TokenizerAdapter.from_dir(extra_tokenizers.install(name), name=name)
        for name in extra_tokenizers.PACKAGES
    }
    return {**default_adapters, **extra}


@pytest.fixture(scope="session")
def real_models(model_dirs: dict[str, Path]):
    """The three default models on the transformers engine, loaded once per test session."""
    import asyncio

    from fusion.engines.transformers_engine import TransformersEngine
    from fusion.models import build_source_model

    async def load():
        models = []
        for name, folder in model_dirs.items():
            engine = TransformersEngine(name, folder, threads=1)
            await engine.start()
            models.append(build_source_model(name, engine, folder))
        return models

    return {m.name: m for m in asyncio.run(load())}


@pytest.fixture
def make_model(default_adapters: dict[str, TokenizerAdapter]) -> Callable[..., SourceModel]:
    """A source model with a real tokenizer and a scripted engine."""

    def make(
        tokenizer: str, script: str, name: str | None = None, **engine_kw: object
    ) -> SourceModel:
        return scripted_model(name or tokenizer, default_adapters[tokenizer], script, **engine_kw)

    return make


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
        models = models if models is not None else trio()
        app = create_app(make_config(**server), models=models)
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
