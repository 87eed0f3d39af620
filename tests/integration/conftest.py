"""Fixtures of the integration tier: `fusion-server serve` as `make serve` runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bench.server_process import VllmServer
from tests.fixtures.processes import free_port, launch


@pytest.fixture(scope="module")
def default_server_url(model_dirs) -> Iterator[str]:
    """`fusion-server serve --config config.yaml` (the three packaged models on llama.cpp)
    on a free loopback port, for one test module."""
    port = free_port()
    args = ["server", "serve", "--config", "config.yaml", "--port", str(port)]
    proc, url = launch(args, port, env=dict(os.environ))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def smollm_vllm(model_dirs, tmp_path_factory) -> Iterator[VllmServer]:
    """SmolLM2 on a real vLLM OpenAI server (core 1), for one test module; its log has a
    line per request received and aborted."""
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = VllmServer.for_model(model_dirs["smollm2-135m"], log, core="1", log_requests=True)
    try:
        server.start()
        yield server
    finally:
        server.kill()
