"""Fusion with one member on its own vLLM server vs the same member in-process, in one run.

Starts a vLLM ``--enable-scale-out`` server of one member (``--remote``, default
SmolLM2; the CPU command of docs/DEPLOYMENT.md, ``bench/server_process.VllmServer``,
bound to that model's core) and loads the config's models on the in-process ``vllm``
engine (``config.vllm-cpu.yaml``: the trio). Two fused systems share the other members'
engines: A has the member in-process, B has it remote (``engine: vllm-remote``, its HTTP
client counted by a transport wrapper). Each run asks a question with a fresh tag, so no
run reads another's answer from a prefix cache; A and B alternate which goes first.
Prints:

1. fused speed, A vs B (median s/token and s/step over the runs) and their ratio;
2. prefill tokens per scoring call of the remote member (prompt - cached: the cache is
   read);
3. what crosses the network per fused step: HTTP requests by kind and status, request
   and response bytes (bodies and HTTP heads; TCP/IP overhead not counted);
4. the cost of resending the context's token ids: one scoring call (one candidate, the
   context in the cache) at ~4k tokens of context vs 128, remote and in-process; the
   request and answer bytes, JSON encode/decode time on the fusion server, and the
   time the remote's extra takes over the in-process one's.

Writes ``bench/results/vllm_remote_speed.json``. Small check::

    PYTHONPATH=. .venv/bin/python bench/vllm_remote_speed.py --max-tokens 16 --runs 1 \\
        --questions 1 --models smollm2-135m,qwen2.5-0.5b --context 1024 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.server_process import VllmServer
from fusion.engine import Engine
from fusion.engines.vllm_logprobs import LookAhead
from fusion.engines.vllm_remote_client import GENERATE
from fusion.engines.vllm_remote_engine import VllmRemoteEngine
from fusion.engines.vllm_requests import LOOKAHEAD_TOKENS, score_fields
from fusion.loop import Fuser
from fusion.models import SourceModel, build_source_model
from fusion.sources import resolve_source
from fusion.types import FusionOutcome, FusionParams, Prompt
from server.config import AppConfig, ModelConfig, load_config
from server.engines import load_models, shutdown_models

QUESTIONS = [
    "Explain in a short paragraph why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "What are three tips for staying focused while studying?",
]
LONG_TEXT = "The river runs past the old mill, where the miller keeps his books in order. "
NEVER = lambda ids: False  # noqa: E731


class _Counted(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, wire: Wire) -> None:
        self.inner, self.wire = inner, wire

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.wire.received += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class Wire(httpx.AsyncBaseTransport):
    """An HTTP transport that counts requests (by kind and status) and bytes."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.reset()

    def reset(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.status: Counter[int] = Counter()
        self.sent = 0
        self.received = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        self.kinds[_kind(request.url.path, body)] += 1
        self.sent += len(body) + _head_bytes(request.method, request.url.raw_path, request.headers)
        r = await self.inner.handle_async_request(request)
        self.status[r.status_code] += 1
        self.received += _head_bytes("HTTP/1.1", str(r.status_code).encode(), r.headers)
        assert isinstance(r.stream, httpx.AsyncByteStream)
        return httpx.Response(
            r.status_code,
            headers=r.headers,
            stream=_Counted(r.stream, self),
            extensions=r.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def _kind(path: str, body: bytes) -> str:
    if path != GENERATE:
        return path
    if b'"stream":true' in body:
        return "generate (SSE)"
    return "score" if b'"prompt_logprobs"' in body else "continuation"


def _head_bytes(first: str, second: bytes, headers: httpx.Headers) -> int:
    """Bytes of an HTTP/1.1 request or status line and its headers."""
    line = len(first) + len(second) + 12
    return line + sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


async def fused_run(fuser: Fuser, question: str, max_tokens: int) -> dict[str, Any]:
    """One fused answer to ``question`` under a fresh tag (no prefix-cache hits on
    another run's text)."""
    tag = uuid.uuid4().hex[:8]
    prompt = Prompt(messages=({"role": "user", "content": f"[{tag}] {question}"},))
    outcome = FusionOutcome()
    started = time.perf_counter()
    async for _ in fuser.run(prompt, FusionParams(max_tokens=max_tokens), outcome):
        pass
    wall = time.perf_counter() - started
    dropped = {n: u.dropped for n, u in outcome.usage.items() if u.dropped}
    if dropped:
        raise SystemExit(f"a model was dropped: {dropped}")
    return {"wall_s": wall, "tokens": outcome.completion_tokens, "steps": outcome.segments}


async def compare_speed(
    fusers: dict[str, Fuser], wire: Wire, remote: Engine, args: argparse.Namespace
) -> dict[str, Any]:
    """Fused runs of A and B, alternating which goes first; the wire and the remote's
    prefill log count only B's runs."""
    for f in fusers.values():
        await fused_run(f, "Hi", 4)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in fusers}
    wire.reset()
    remote.prefill_log.clear()  # type: ignore[attr-defined]
    for r in range(args.runs):
        for q in QUESTIONS[: args.questions]:
            for key in ("A", "B") if r % 2 == 0 else ("B", "A"):
                runs[key].append(await fused_run(fusers[key], q, args.max_tokens))
    b_steps = sum(x["steps"] for x in runs["B"])
    return {
        "runs": runs,
        "per_step_network": {
            "steps": b_steps,
            "requests": {k: v / b_steps for k, v in wire.kinds.items()},
            "status": dict(wire.status),
            "sent_bytes": wire.sent / b_steps,
            "received_bytes": wire.received / b_steps,
        },
        "remote_prefill": list(remote.prefill_log),  # type: ignore[attr-defined]
    }


async def scoring_call(engine: Engine, ids: list[int], repeats: int) -> list[float]:
    """Seconds of ``repeats`` scoring calls of one candidate after ``ids`` (cached by a
    generation first): one request each, the context resent every time."""
    st = await engine.open(f"resend-{uuid.uuid4().hex[:8]}", ids)
    try:
        gen = await engine.generate(st, 1, frozenset(), NEVER)  # prefill: blocks cached
        await engine.score(st, [list(gen.ids)])  # warm-up (a new connection, the tail)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await engine.score(st, [list(gen.ids)])
            times.append(time.perf_counter() - started)
        return times
    finally:
        await engine.release(st)


async def resend_cost(
    remote: VllmRemoteEngine, local: Engine, wire: Wire, ids: list[int], repeats: int
) -> dict[str, Any]:
    """A scoring call at ``len(ids)`` tokens of context vs 128, remote and in-process,
    and what the remote's request and answer weigh and cost to encode and decode."""
    out: dict[str, Any] = {"context": len(ids)}
    for label, ctx in (("short", ids[:128]), ("long", ids)):
        wire.reset()
        out[f"remote_{label}_s"] = await scoring_call(remote, ctx, repeats)
        out[f"remote_{label}_status"] = dict(wire.status)
        out[f"remote_{label}_bytes"] = (
            wire.sent / wire.kinds["score"],
            wire.received / wire.kinds["score"],
        )
        out[f"local_{label}_s"] = await scoring_call(local, ctx, repeats)
    # the same request as the engine's (vllm_requests.score_fields), by hand
    body = {
        "token_ids": [*ids, ids[-1]],
        "sampling_params": score_fields(
            LookAhead.after([]), remote.score_lookahead, use_cache=True
        ),
        "stream": False,
    }
    out["encode_s"] = _best_of(lambda: httpx.Request("POST", remote.url + GENERATE, json=body))
    async with httpx.AsyncClient(base_url=remote.url, timeout=120) as http:
        answer = (await http.post(GENERATE, json=body)).content
    out["decode_s"] = _best_of(lambda: json.loads(answer))
    out["answer_bytes"] = len(answer)
    return out


def _best_of(work: Any, n: int = 20) -> float:
    best = float("inf")
    for _ in range(n):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


async def setup(
    config: AppConfig, server: VllmServer, mc: ModelConfig, folder: Path
) -> tuple[list[SourceModel], SourceModel, VllmRemoteEngine, Wire]:
    """The local models (loaded while the remote member's server starts) and the remote
    member as a source model on a counted client."""
    started = asyncio.ensure_future(asyncio.to_thread(server.start))
    try:
        local = await load_models(config)
    finally:
        await started
    wire = Wire()
    lookahead = getattr(mc.options, "score_lookahead_tokens", LOOKAHEAD_TOKENS)
    engine = VllmRemoteEngine(
        mc.name, folder, url=server.url, transport=wire, score_lookahead_tokens=lookahead
    )
    try:
        await engine.start()
    except BaseException:
        await shutdown_models(local)
        raise
    remote = build_source_model(
        mc.name,
        engine,
        folder,
        chat_template=mc.chat_template,
        stop_strings=mc.stop,
        max_model_len=engine.max_model_len,
    )
    return local, remote, engine, wire


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(names: list[str], remote: str, speed: dict[str, Any], cost: dict[str, Any]) -> None:
    print(f"\nfused {' + '.join(names)}; {remote}: A in-process vLLM, B remote vLLM (loopback)")
    print("| system | runs | tokens | steps | s/token | s/step | tok/s |")
    print("|---|---|---|---|---|---|---|")
    per: dict[str, tuple[float, float]] = {}
    for key, runs in speed["runs"].items():
        tok = median([r["wall_s"] / max(r["tokens"], 1) for r in runs])
        step = median([r["wall_s"] / max(r["steps"], 1) for r in runs])
        per[key] = tok, step
        print(
            f"| {key} | {len(runs)} | {sum(r['tokens'] for r in runs)} | "
            f"{sum(r['steps'] for r in runs)} | {tok:.3f} | {step:.3f} | {1 / tok:.2f} |"
        )
    print(
        f"remote / in-process: {per['B'][0] / per['A'][0]:.2f}x per token, "
        f"{per['B'][1] / per['A'][1]:.2f}x per step"
    )

    log = speed["remote_prefill"]
    computed = [n - c for n, c in log]
    print(f"\nprefill per scoring call of the remote {remote} ({len(log)} calls):")
    print("| prompt tokens (median) | cached (median) | computed: median | p90 | max |")
    print("|---|---|---|---|---|")
    q = statistics.quantiles(computed, n=10)[-1] if len(computed) > 1 else computed[0]
    print(
        f"| {median([n for n, _ in log]):.0f} | {median([c for _, c in log]):.0f} | "
        f"{median(computed):.0f} | {q:.0f} | {max(computed)} |"
    )
    print(f"calls that read the cache: {sum(c > 0 for _, c in log)} of {len(log)}")

    net = speed["per_step_network"]
    print(f"\nper fused step, {remote} remote ({net['steps']} steps):")
    print("| HTTP requests | of which | request bytes | response bytes |")
    print("|---|---|---|---|")
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(net["requests"].items()))
    print(
        f"| {sum(net['requests'].values()):.2f} | {kinds} | {net['sent_bytes']:,.0f} | "
        f"{net['received_bytes']:,.0f} |"
    )
    print(f"HTTP statuses: {net['status']}")

    n = cost["context"]
    print(f"\none scoring call, context in the cache: 128 vs {n} tokens of context")
    print("| context | remote s | in-process s | remote extra | request bytes | answer bytes |")
    print("|---|---|---|---|---|---|")
    for label, ctx in (("short", 128), ("long", n)):
        r, loc = median(cost[f"remote_{label}_s"]), median(cost[f"local_{label}_s"])
        sent, got = cost[f"remote_{label}_bytes"]
        print(
            f"| {ctx} | {r * 1000:.1f} ms | {loc * 1000:.1f} ms | {(r - loc) * 1000:.1f} ms | "
            f"{sent:,.0f} | {got:,.0f} |"
        )
    print(
        f"HTTP statuses of the remote's calls: 128: {cost['remote_short_status']}, "
        f"{n}: {cost['remote_long_status']} (a 400 is retried without the cache)"
    )
    print(
        f"at {n} tokens on the fusion server: JSON-encoding the request "
        f"{cost['encode_s'] * 1000:.2f} ms, decoding the answer ({cost['answer_bytes']:,} "
        f"bytes) {cost['decode_s'] * 1000:.2f} ms"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="config.vllm-cpu.yaml")
    ap.add_argument("--remote", default="smollm2-135m", help="the member served remotely")
    ap.add_argument("--models", default="", help="comma-separated subset of the config's")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="runs per question and system")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--context", type=int, default=4096, help="long context of part 4")
    ap.add_argument("--repeats", type=int, default=5, help="scoring calls per context")
    ap.add_argument("--json", type=Path, default=Path("bench/results/vllm_remote_speed.json"))
    return ap.parse_args()


async def main() -> int:
    args = parse_args()
    config = load_config(args.config)
    if args.models:
        config.models = [m for m in config.models if m.name in args.models.split(",")]
    [mc] = [m for m in config.models if m.name == args.remote]
    folder = await asyncio.to_thread(resolve_source, mc.source)
    core = str(getattr(mc.options, "cpu_threads_bind", None) or "1")
    log_dir = Path(tempfile.mkdtemp(prefix="vllm-remote-bench-"))
    server = VllmServer.for_model(folder, log_dir / "server.log", core=core)
    try:
        local, remote, engine, wire = await setup(config, server, mc, folder)
        try:
            names = [m.name for m in local]
            swapped = [remote if m.name == args.remote else m for m in local]
            fusers = {"A": Fuser(local), "B": Fuser(swapped)}
            speed = await compare_speed(fusers, wire, engine, args)
            [member] = [m for m in local if m.name == args.remote]
            n = min(args.context, engine.max_model_len - 8)
            ids = (remote.tokenizer.encode(LONG_TEXT * (n // 8)) * 2)[:n]
            cost = await resend_cost(engine, member.engine, wire, ids, args.repeats)
        finally:
            await engine.shutdown()
            await wire.aclose()
            await shutdown_models(local)
    finally:
        server.kill()
    report(names, args.remote, speed, cost)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"speed": speed, "resend": cost}, indent=2))
    print(f"\nraw numbers: {args.json}; vLLM server log: {log_dir / 'server.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
