"""Tokenizers for the alignment tests: the default trio, Llama-3 and Llama-2 from their
tokenizer.json, and two model folders without one, loaded through transformers (a
SentencePiece tokenizer.model, Mistral-7B-v0.1's; a tiktoken-format tokenizer.model,
Llama-3's)."""

from __future__ import annotations

import pytest

from fusion.tokenizer_loading import load_tokenizer
from tests.fixtures import extra_tokenizers
from tokenizers_align import TokenizerAdapter

SLOW = ("mistral-spm", "llama3-tiktoken")


@pytest.fixture(scope="session")
def slow_adapters() -> dict[str, TokenizerAdapter]:
    return {name: load_tokenizer(extra_tokenizers.install(name), name) for name in SLOW}


@pytest.fixture(scope="session")
def aligned_adapters(
    all_adapters: dict[str, TokenizerAdapter], slow_adapters: dict[str, TokenizerAdapter]
) -> dict[str, TokenizerAdapter]:
    return {**all_adapters, **slow_adapters}
