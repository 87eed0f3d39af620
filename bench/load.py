"""Bounded load on loopback: concurrent clients, a mix of streaming, non-streaming and
clients that disconnect mid-stream. Afterwards: no 5xx, nothing left open in any engine,
server memory back near its baseline.

Starts `fusion-server serve` itself (default config.yaml) unless --url/--pid are given.

    .venv/bin/python bench/load.py [--requests 200] [--clients 16] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import start_server, stop_server

Result = tuple[str, int, float]  # (kind, HTTP status, seconds)
PROMPTS = [
    "Name a colour.",
    "What is 2 plus 3?",
    "Say hello.",
    "Name a fruit.",
    "Write three words about rain.",
    "What is the capital of Italy?",
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def one(http: httpx.AsyncClient, kind: str, max_tokens: int) -> tuple[str, int, float]:
    body = {
        "model": "fusion",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
    }
    started = time.perf_counter()
    if kind == "plain":
        r = await http.post("/v1/chat/completions", json=body)
        return kind, r.status_code, time.perf_counter() - started
    body["stream"] = True
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if kind == "disconnect" and line.startswith("data: ") and '"content"' in line:
                break  # leaves mid-stream: the server must stop this request's work
            if line == "data: [DONE]":
                break
    return kind, status, time.perf_counter() - started


async def drive(
    url: str, requests: int, clients: int, max_tokens: int
) -> list[tuple[str, int, float]]:
    kinds = [random.choice(["plain", "stream", "disconnect"]) for _ in range(requests)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for k in kinds:
        queue.put_nowait(k)
    results: list[Result] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while not queue.empty():
                kind = queue.get_nowait()
                try:
                    results.append(await one(http, kind, max_tokens))
                except httpx.HTTPError as exc:
                    results.append((kind, 0, 0.0))
                    print(f"client error: {exc!r}", file=sys.stderr)
                done = len(results)
                if done % 20 == 0:
                    print(f"  {done}/{requests} requests", file=sys.stderr)

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--url")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("bench/results/load.json"))
    args = ap.parse_args()
    random.seed(0)
    proc = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        proc, url = start_server(args.config, {"FUSION_SERVER__MAX_QUEUE": "64"})
        pid = proc.pid
    try:
        asyncio.run(drive(url, 8, 4, args.max_tokens))  # warm-up: caches, allocator
        time.sleep(2)
        baseline = rss_mib(pid) if pid else 0.0
        started = time.perf_counter()
        results = asyncio.run(drive(url, args.requests, args.clients, args.max_tokens))
        wall = time.perf_counter() - started
        time.sleep(3)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        after = rss_mib(pid) if pid else 0.0
    finally:
        if proc is not None:
            stop_server(proc)

    by_status: dict[int, int] = {}
    for _, status, _ in results:
        by_status[status] = by_status.get(status, 0) + 1
    lat = sorted(t for kind, s, t in results if s == 200 and kind != "disconnect")
    pct = {p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] for p in (50, 90, 99)} if lat else {}
    open_states = metric(metrics, "fusion_engine_open_states{")
    in_flight = metric(metrics, "fusion_requests_in_flight ")
    report = {
        "requests": len(results),
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "wall_s": wall,
        "throughput_rps": len(results) / wall,
        "status": by_status,
        "latency_s": pct,
        "mean_latency_s": statistics.mean(lat) if lat else None,
        "server_5xx": sum(n for s, n in by_status.items() if s >= 500),
        "open_states_after": open_states,
        "in_flight_after": in_flight,
        "rss_mib": {"baseline": baseline, "after": after},
    }
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    ok = report["server_5xx"] == 0 and open_states == 0 and in_flight == 0 and 0 not in by_status
    if pid and baseline:
        ok = ok and after < baseline * 1.25 + 64
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
