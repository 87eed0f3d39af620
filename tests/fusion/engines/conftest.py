"""Fixtures of the vLLM engines' unit tests: the tokenizer and the fake server."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion.sources import resolve_gguf
from tests.fusion.engines.vllm_fakes import FakeVllm


@pytest.fixture(scope="module")
def tok_dir() -> Path:
    return resolve_gguf("pip:smollm2-135m-instruct").tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture
def fake(tokenizer) -> FakeVllm:
    return FakeVllm(tokenizer)
