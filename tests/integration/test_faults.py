"""A hung, returning and flapping member, on loopback (issue 26): SmolLM2 on its own real
vLLM OpenAI server (``engine: vllm-remote``, through a loopback proxy the tests control),
fused with Gemma in-process (llama.cpp) in one ``fusion-server serve``.

The tests run in order and share the servers (vLLM takes about 45 s to start here):
the member is paused with SIGSTOP mid-stream, comes back after SIGCONT, then answers 500
on every other call."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from bench.fault_proxy import FaultProxy
from tests.fixtures.processes import free_port, launch

pytestmark = pytest.mark.integration
REMOTE, LOCAL = "smollm2-135m", "gemma3-270m"
FLOOR = 3.0  # the deadline floor these tests configure (the default is 5 s)
ASK = {
    "model": "fusion",
    "messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
    "max_tokens": 12,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def proxy(smollm_vllm) -> Iterator[FaultProxy]:
    with FaultProxy(smollm_vllm.url) as p:
        yield p


@pytest.fixture(scope="module")
def fused(proxy, model_dirs, tmp_path_factory) -> Iterator[str]:
    config = {
        "server": {"keepalive_seconds": 0.5},
        "models": [
            {
                "name": REMOTE,
                "source": str(model_dirs[REMOTE]),
                "engine": "vllm-remote",
                "options": {"url": proxy.url, "retries": 0},
            },
            {"name": LOCAL, "source": "pip:gemma3-270m", "engine": "llamacpp"},
        ],
        "fusion": {
            "selection": {"rule": "mean_ppl"},
            "faults": {"deadline_floor_seconds": FLOOR, "eject_seconds": 1.0},
        },
    }
    path = Path(tmp_path_factory.mktemp("fused")) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc, url = launch(["server", "serve", "--config", str(path), "--port", str(port)], port)
    try:
        for _ in range(2):  # each member learns its usual call times
            r = httpx.post(f"{url}/v1/chat/completions", json=ASK, timeout=300)
            assert r.status_code == 200, r.text
            assert "dropped" not in r.json()["usage"]["models"][REMOTE]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


def wait_up(url: str, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if health(url)["engines"][REMOTE]["state"] == "up":
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{REMOTE} not back within {within} s: {health(url)}")


def test_a_member_paused_mid_stream_costs_its_deadline_and_the_stream_keeps_alive(
    fused, smollm_vllm
):
    body = {**ASK, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 24}
    chunks, comments_after_pause, usage = 0, 0, None
    paused_at = None
    try:
        with httpx.stream("POST", f"{fused}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(":"):
                    comments_after_pause += paused_at is not None
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                chunks += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunks == 2 and paused_at is None:
                    smollm_vllm.pause()
                    paused_at = time.monotonic()
        took = time.monotonic() - paused_at if paused_at else None
        # the answer after the pause: the floor (3 s) or 5x the member's usual time, plus
        # the rest of the answer from Gemma alone
        assert took is not None and took < 45, took
        assert usage is not None and "deadline" in usage["models"][REMOTE]["dropped"]
        assert comments_after_pause >= 1  # keep-alives every 0.5 s while it waited
        assert health(fused)["engines"][REMOTE]["state"] == "ejected"
        # the next fused request does not wait for the paused member at all
        started = time.monotonic()
        r = httpx.post(f"{fused}/v1/chat/completions", json=ASK, timeout=120)
        assert r.status_code == 200
        assert r.json()["usage"]["models"][REMOTE]["dropped"].startswith("ejected since")
        assert time.monotonic() - started < FLOOR + 10
    finally:
        smollm_vllm.resume()
    back = wait_up(fused, within=30)
    r = httpx.post(f"{fused}/v1/chat/completions", json=ASK, timeout=120)
    assert r.status_code == 200
    assert "dropped" not in r.json()["usage"]["models"][REMOTE], r.json()["usage"]
    assert r.json()["usage"]["models"][REMOTE]["generated_tokens"] > 0
    print(f"answered {took:.1f} s after the pause; back {back:.1f} s after SIGCONT")


def test_a_member_failing_every_other_call_is_ejected_and_no_request_fails(fused, proxy):
    metrics = httpx.get(f"{fused}/metrics", timeout=30).text
    before = _ejections(metrics)
    proxy.fail_every(2)
    try:
        for _ in range(4):
            r = httpx.post(f"{fused}/v1/chat/completions", json=ASK, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
    finally:
        proxy.pass_through()
    assert proxy.requests_failed > 0
    assert _ejections(httpx.get(f"{fused}/metrics", timeout=30).text) > before
    wait_up(fused, within=30)


def _ejections(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("fusion_model_ejections_total") and f'source="{REMOTE}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
