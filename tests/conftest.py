"""Shared fixtures: the real tokenizers and model folders (from pip packages / npm)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fusion.models import ChatTemplate, SourceModel
from fusion.sources import resolve_source
from tests.fixtures import extra_tokenizers
from tests.fusion.fake_engine import ScriptedEngine
from tokenizers_align import TokenizerAdapter

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"

DEFAULT_SOURCES = {
    "smollm2-135m": "pip:smollm2-135m-instruct",
    "gemma3-270m": "pip:gemma3-270m",
    "qwen2.5-0.5b": "pip:qwen2.5-coder-0.5b-instruct",
}


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
        adapter = default_adapters[tokenizer]
        end_id = adapter.eos_ids[0]
        engine = ScriptedEngine(name or tokenizer, adapter, script, end_id=end_id, **engine_kw)
        return SourceModel(
            name=name or tokenizer,
            engine=engine,
            tokenizer=adapter,
            chat_template=ChatTemplate(TEMPLATE),
            chat_end_id=end_id,
        )

    return make
