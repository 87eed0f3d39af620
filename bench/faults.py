"""What a hung or slow source model costs a fused answer, and that normal load drops none.

One run, two set-ups, never both at once (the machine has 2 cores):

1. Remote: SmolLM2 on a real vLLM OpenAI server (``bench/server_process.VllmServer``,
   core 1) behind a ``bench/fault_proxy.FaultProxy``, as ``engine: vllm-remote`` pointing
   at the proxy, fused with Gemma in-process (its entry of ``config.yaml``) in one
   ``fusion-server serve`` (``config.yaml``'s server limits, the paper's ``mean_ppl``
   rule, the default ``fusion.faults``). After 2 warm-up answers, each round times one
   fused chat answer (temperature 0) in three cases, in this order:

   - normal;
   - paused: the member hangs ~0.3 s into the request (``--pause proxy``: the proxy holds
     every request and byte, connections open; ``--pause sigstop``: SIGSTOP to vLLM's
     process group) and is resumed when the answer is back;
   - slowed: the proxy makes each of its exchanges take 2x as long (within the deadline
     factor, 5: it should stay), then 10x (beyond it: it should be dropped).

   After a fault the next case waits until ``/health`` says the member is up (at most
   60 s); "back after" is that wait, from the resume (or the end of the slowing).
   Then ``--load-requests`` requests at ``--concurrency`` (below) on this set-up.
2. The default trio (``config.yaml``, its own server, started after the remote set-up
   is stopped) under the same load.

The load: chat and completions requests at random (fixed seed), max_tokens drawn from
16..128, temperature 0, after 2 warm-up answers. Per set-up: requests OK, the drops and
ejections ``/metrics`` counted meanwhile (``fusion_model_dropped_total{source,reason}``,
``fusion_model_ejections_total``), the answers whose ``usage.models`` name a dropped
model, and the wall time. Under normal load no model may be dropped: the exit code is 1
when one was, or when a request failed.

    .venv/bin/python bench/faults.py                      # 3 rounds, 16 tokens, 16 requests
    .venv/bin/python bench/faults.py --rounds 1 --load-requests 8 --max-tokens 8   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fault_proxy import FaultProxy
from bench.server_process import VllmServer, start_server, stop_server
from fusion.sources import resolve_source

TRIO = Path(__file__).resolve().parent.parent / "config.yaml"
REMOTE, LOCAL = "smollm2-135m", "gemma3-270m"
QUESTION = "Name three colours of the rainbow."
PROMPTS = [
    "Explain in a short paragraph why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "What are three tips for staying focused while studying?",
    "List the planets of the solar system.",
    "The old lighthouse keeper climbed the stairs and",
    "def fibonacci(n):",
]
PAUSE_AFTER = 0.3  # seconds into the request: the member hangs mid-answer
SLOW_FACTORS = (2.0, 10.0)  # within the deadline factor (5), and beyond it
BACK_WITHIN = 60.0
TIMEOUT = 600.0
Hook = Callable[[], None]
COUNTERS = re.compile(r"^fusion_model_(dropped|ejections|returns)_total\{([^}]*)\} (\S+)$")


@dataclass
class Sample:
    """One fused answer of the fault rounds."""

    case: str
    seconds: float
    status: int
    dropped: str | None  # usage.models.<REMOTE>.dropped
    faulted: bool = True  # the fault took effect before the answer was back
    back_s: float | None = 0.0  # until /health said "up" again; None: not within 60 s


@dataclass
class Load:
    """One set-up under concurrent load."""

    setup: str
    requests: int
    ok: int = 0
    wall_s: float = 0.0
    dropped: dict[str, float] = field(default_factory=dict)  # "source/reason" -> count
    ejections: dict[str, float] = field(default_factory=dict)
    answers_with_drop: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --- HTTP helpers ------------------------------------------------------------------------


def ask(url: str, max_tokens: int) -> tuple[float, int, str | None]:
    """One fused chat answer: seconds, HTTP status, why the remote member was dropped."""
    body = {
        "model": "fusion",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    took = time.perf_counter() - started
    if r.status_code != 200:
        return took, r.status_code, f"HTTP {r.status_code}: {r.text[:200]}"
    return took, 200, r.json()["usage"]["models"].get(REMOTE, {}).get("dropped")


def member_state(url: str) -> str:
    engines = httpx.get(f"{url}/health", timeout=30).json().get("engines", {})
    return str(engines.get(REMOTE, {}).get("state", "missing"))


def wait_up(url: str) -> float | None:
    """Seconds until ``/health`` says the remote member is up (0: it was), or None."""
    started = time.monotonic()
    while time.monotonic() - started < BACK_WITHIN:
        if member_state(url) == "up":
            return time.monotonic() - started
        time.sleep(0.25)
    print(f"warning: {REMOTE} not back within {BACK_WITHIN:g} s", file=sys.stderr)
    return None


def counters(text: str) -> dict[str, float]:
    """The drop, ejection and return counters of a /metrics scrape, keyed
    ``kind:source[/reason]``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = COUNTERS.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
            key = "/".join(v for v in (labels.get("source"), labels.get("reason")) if v)
            out[f"{m[1]}:{key}"] = float(m[3])
    return out


# --- part 1: the fault rounds -------------------------------------------------------------


def paused(url: str, max_tokens: int, how: str, pause: Hook, resume: Hook) -> Sample:
    """An answer during which the member hangs ``PAUSE_AFTER`` s in, until it is back."""
    fired = threading.Event()

    def hang() -> None:
        pause()
        fired.set()

    timer = threading.Timer(PAUSE_AFTER, hang)
    timer.start()
    try:
        took, status, dropped = ask(url, max_tokens)
    finally:
        timer.cancel()
        timer.join()
        resume()
    return Sample(f"paused ({how})", took, status, dropped, fired.is_set(), wait_up(url))


def slowed(url: str, max_tokens: int, proxy: FaultProxy, factor: float) -> Sample:
    proxy.slow(factor)
    try:
        took, status, dropped = ask(url, max_tokens)
    finally:
        proxy.pass_through()
    return Sample(f"slowed {factor:g}x", took, status, dropped, back_s=wait_up(url))


def fault_rounds(
    url: str, proxy: FaultProxy, vllm: VllmServer, args: argparse.Namespace
) -> list[Sample]:
    hooks = {"proxy": (proxy.pause, proxy.resume), "sigstop": (vllm.pause, vllm.resume)}
    pause, resume = hooks[args.pause]
    samples: list[Sample] = []
    for r in range(args.rounds):
        took, status, dropped = ask(url, args.max_tokens)
        samples.append(Sample("normal", took, status, dropped, faulted=False))
        samples.append(paused(url, args.max_tokens, args.pause, pause, resume))
        for factor in SLOW_FACTORS:
            samples.append(slowed(url, args.max_tokens, proxy, factor))
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{s.case} {s.seconds:.2f} s" for s in samples[-2 - len(SLOW_FACTORS) :]),
            file=sys.stderr,
        )
    return samples


# --- part 2: load -------------------------------------------------------------------------


def load_jobs(n: int, seed: int) -> list[tuple[str, str, int]]:
    """(endpoint, prompt, max_tokens) of each request, the same every run."""
    rng = random.Random(seed)
    return [
        (rng.choice(["chat", "completions"]), rng.choice(PROMPTS), rng.randint(16, 128))
        for _ in range(n)
    ]


async def one(
    http: httpx.AsyncClient, gate: asyncio.Semaphore, job: tuple[str, str, int], out: Load
) -> None:
    kind, prompt, max_tokens = job
    body: dict[str, Any] = {"model": "fusion", "max_tokens": max_tokens, "temperature": 0}
    if kind == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    async with gate:
        try:
            r = await http.post(path, json=body)
        except httpx.HTTPError as exc:
            out.errors.append(f"{kind}: {exc!r}")
            return
    if r.status_code != 200:
        out.errors.append(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
        return
    out.ok += 1
    for name, usage in r.json()["usage"]["models"].items():
        if usage.get("dropped"):
            out.answers_with_drop.append(
                f"{name} ({kind}, {max_tokens} tokens): {usage['dropped']}"
            )


async def load(url: str, setup: str, args: argparse.Namespace) -> Load:
    out = Load(setup, args.load_requests)
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
        before = counters((await http.get("/metrics")).text)
        started = time.perf_counter()
        await asyncio.gather(
            *(one(http, gate, j, out) for j in load_jobs(args.load_requests, args.seed))
        )
        out.wall_s = time.perf_counter() - started
        after = counters((await http.get("/metrics")).text)
    for key, value in after.items():
        kind, _, label = key.partition(":")
        diff = value - before.get(key, 0.0)
        if diff and kind in ("dropped", "ejections"):
            getattr(out, kind)[label] = diff
    return out


def warm_up(url: str, max_tokens: int) -> None:
    """Two fused answers: the caches, and each member's usual call times."""
    for _ in range(2):
        took, status, dropped = ask(url, max_tokens)
        if status != 200:
            raise SystemExit(f"warm-up failed: {dropped}")
        print(f"  warm-up: {took:.2f} s, {REMOTE} dropped: {dropped}", file=sys.stderr)


# --- the two set-ups ----------------------------------------------------------------------


def remote_config(proxy_url: str, model_dir: Path, folder: Path) -> Path:
    """config.yaml's server limits and Gemma, SmolLM2 remote behind the proxy."""
    trio = yaml.safe_load(TRIO.read_text())
    [local] = [m for m in trio["models"] if m["name"] == LOCAL]
    config = {
        "server": trio.get("server", {}),
        "models": [
            {
                "name": REMOTE,
                "source": str(model_dir),
                "engine": "vllm-remote",
                "options": {"url": proxy_url},
            },
            local,
        ],
        "fusion": {"selection": {"rule": "mean_ppl"}},
    }
    path = folder / "remote.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_remote(args: argparse.Namespace, folder: Path) -> tuple[list[Sample], Load]:
    [entry] = [m for m in yaml.safe_load(TRIO.read_text())["models"] if m["name"] == REMOTE]
    model_dir = resolve_source(entry["source"])
    vllm = VllmServer.for_model(model_dir, folder / "vllm.log", core="1")
    print(f"remote set-up: starting vLLM ({model_dir}), log {vllm.log}", file=sys.stderr)
    try:
        vllm.start()
        with FaultProxy(vllm.url) as proxy:
            proc, url = start_server(str(remote_config(proxy.url, model_dir, folder)))
            try:
                warm_up(url, args.max_tokens)
                samples = fault_rounds(url, proxy, vllm, args)
                print(
                    f"  load: {args.load_requests} requests at {args.concurrency}", file=sys.stderr
                )
                loaded = asyncio.run(load(url, f"remote {REMOTE} + {LOCAL}", args))
            finally:
                stop_server(proc)
    finally:
        vllm.kill()
    return samples, loaded


def run_trio(args: argparse.Namespace) -> Load:
    print(f"trio: starting {TRIO.name}", file=sys.stderr)
    proc, url = start_server(str(TRIO))
    try:
        warm_up(url, args.max_tokens)
        return asyncio.run(load(url, "trio (config.yaml)", args))
    finally:
        stop_server(proc)


# --- report -------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report_faults(samples: list[Sample]) -> None:
    print(f"\n{REMOTE} (vLLM, behind the proxy) + {LOCAL} (in-process)")
    print(f"| case | answers | median s | x normal | {REMOTE} dropped | fault hit | back after s |")
    print("|---|---|---|---|---|---|---|")
    normal = median([s.seconds for s in samples if s.case == "normal"])
    for case in dict.fromkeys(s.case for s in samples):
        mine = [s for s in samples if s.case == case]
        t = median([s.seconds for s in mine])
        backs = [s.back_s for s in mine if s.back_s is not None]
        missing = sum(s.back_s is None for s in mine)
        back = f"{median(backs):.2f}" + (f" ({missing} never)" if missing else "")
        faulted = "-" if case == "normal" else f"{sum(s.faulted for s in mine)}/{len(mine)}"
        print(
            f"| {case} | {len(mine)} | {t:.2f} | {t / normal:.2f} | "
            f"{sum(s.dropped is not None for s in mine)}/{len(mine)} | {faulted} | {back} |"
        )
    for s in samples:
        if s.dropped:
            print(f"- {s.case}: {s.dropped}")


def report_load(loads: list[Load], concurrency: int) -> int:
    """Prints the load table; the number of drops (which must be 0)."""
    print(f"\nnormal load: {concurrency} concurrent, chat and completions, max_tokens 16..128")
    print("| set-up | requests OK | dropped (metrics) | answers with a drop | ejections | wall s |")
    print("|---|---|---|---|---|---|")
    drops = 0
    for x in loads:
        dropped = ", ".join(f"{k} {v:g}" for k, v in x.dropped.items()) or "0"
        ejected = ", ".join(f"{k} {v:g}" for k, v in x.ejections.items()) or "0"
        drops += int(sum(x.dropped.values())) + len(x.answers_with_drop)
        print(
            f"| {x.setup} | {x.ok}/{x.requests} | {dropped} | {len(x.answers_with_drop)} | "
            f"{ejected} | {x.wall_s:.1f} |"
        )
        for line in x.answers_with_drop + x.errors:
            print(f"- {x.setup}: {line}")
    verdict = "0 (as required)" if drops == 0 else f"{drops} -- MUST BE 0"
    print(f"\n**drops under normal load: {verdict}**")
    return drops


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of normal, paused, slowed")
    ap.add_argument("--max-tokens", type=int, default=16, help="of each fault-round answer")
    ap.add_argument("--load-requests", type=int, default=16, help="requests per load run")
    ap.add_argument("--concurrency", type=int, default=8, help="of the load runs")
    ap.add_argument(
        "--pause", choices=["proxy", "sigstop"], default="proxy", help="how the member hangs"
    )
    ap.add_argument("--seed", type=int, default=0, help="of the load's lengths and kinds")
    ap.add_argument("--skip-trio", action="store_true")
    ap.add_argument("--skip-remote", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("bench/results/faults.json"))
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="faults-bench-"))
    samples: list[Sample] = []
    loads: list[Load] = []
    if not args.skip_remote:
        samples, remote_load = run_remote(args, folder)
        loads.append(remote_load)
    if not args.skip_trio:
        loads.append(run_trio(args))
    if samples:
        report_faults(samples)
    drops = report_load(loads, args.concurrency) if loads else 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "faults": [asdict(s) for s in samples],
        "load": [asdict(x) for x in loads],
    }
    args.json.write_text(json.dumps(results, indent=2))
    python = Path(sys.executable)
    python_arg = (
        str(python.relative_to(Path.cwd())) if python.is_relative_to(Path.cwd()) else str(python)
    )
    print(f"\ncommand: {shlex.join([python_arg, *sys.argv])}")
    print(f"raw numbers: {args.json}; logs and configs: {folder}")
    failed = any(x.ok < x.requests for x in loads)
    return 1 if drops or failed else 0


if __name__ == "__main__":
    sys.exit(main())
