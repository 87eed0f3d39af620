"""Start ``fusion-server serve`` on a free loopback port for a benchmark, and stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def start_server(
    config: str, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[subprocess.Popen[bytes], str]:
    """The server process and its base URL, once ``/health`` answers 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "--log-level", "WARNING", "serve"]
    proc = subprocess.Popen(
        [*cmd, "--config", config, "--port", str(port)], env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        if proc.poll() is not None:
            raise SystemExit(f"the server exited during start-up (code {proc.returncode})")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
