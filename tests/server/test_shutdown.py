"""SIGTERM: stop accepting, let in-flight streams finish, then exit (real process)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx

from tests.fixtures.processes import free_port, launch
from tests.fixtures.scripted_server import SCRIPT


def start(grace: float, delay: float) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    args = [
        "tests.fixtures.scripted_server",
        "--port",
        str(port),
        "--grace",
        str(grace),
        "--delay",
        str(delay),
    ]
    return launch(args, port, timeout=60)


def test_sigterm_lets_an_in_flight_stream_finish_then_exits(model_dirs):
    proc, url = start(grace=20, delay=0.02)
    body = {
        "model": "fusion",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 100,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finals[-1] == "stop"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == SCRIPT  # the whole answer arrived after SIGTERM
    # uvicorn re-raises the signal once shut down, so the exit status is "terminated"
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    try:
        httpx.get(f"{url}/health", timeout=1)
        raise AssertionError("server still accepting after SIGTERM")
    except httpx.ConnectError:
        pass


def test_streams_longer_than_the_grace_period_are_cut_and_the_server_exits(model_dirs):
    proc, url = start(grace=1, delay=0.2)
    body = {
        "model": "fusion",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 100,
        "stream": True,
    }
    started = time.monotonic()
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n == 2:
                    proc.send_signal(signal.SIGTERM)
    except httpx.HTTPError:
        pass
    # uvicorn re-raises the signal once shut down, so the exit status is "terminated"
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 20


def test_disconnected_streams_free_every_engine_state_in_a_real_server(model_dirs):
    """Regression: a client leaving mid-stream left the fusion run suspended at a yield
    (sse-starlette never closes its body iterator) and every engine state open."""
    proc, url = start(grace=5, delay=0.05)
    body = {
        "model": "fusion",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 100,
        "stream": True,
    }
    try:
        # leave after the role chunk (while engines open) and after the first content
        for marker in ('"role"', '"content": "one"', '"role"', '"content": "one"'):
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if marker in line:
                        break
        time.sleep(1.5)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        open_states = [
            ln for ln in metrics.splitlines() if ln.startswith("fusion_engine_open_states{")
        ]
        assert open_states and all(ln.endswith(" 0.0") for ln in open_states), open_states
    finally:
        proc.terminate()
        proc.wait(timeout=30)
