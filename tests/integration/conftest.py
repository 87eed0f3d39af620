"""Fixtures of the integration tier: `fusion-server serve` as `make serve` runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
