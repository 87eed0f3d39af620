"""Bounded load on loopback: concurrent clients, a mix of streaming, non-streaming and
clients that disconnect mid-stream. Afterwards: no 5xx, nothing left open in any engine,
server memory back near its baseline.

With ``--mixed`` (docs/RELIABILITY.md) each request also asks for 1-4 choices and, half
the time, a random subset of the source models in ``fusion.models``, a model named twice
in a quarter of those. Those must get a 400; every other answer must be complete: every
choice non-empty, no source model dropped in ``usage.models``, and afterwards every
engine's free sequences back at their value before the load.

Starts `fusion-server serve` itself (default config.yaml) unless --url/--pid are given.

    .venv/bin/python bench/load.py [--requests 200] [--clients 16] [--max-tokens 8]
    .venv/bin/python bench/load.py --mixed --requests 200 --clients 8 --max-tokens 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import start_server, stop_server

Result = tuple[str, int, float]  # (kind, HTTP status, seconds)
SOURCES = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]


@dataclass
class Check:
    """What the mixed load found wrong in the answers it read."""

    duplicates_sent: int = 0
    duplicates_refused: int = 0
    other_400: int = 0
    dropped: list[str] = field(default_factory=list)
    empty_choices: int = 0
    choices: int = 0


CHECK = Check()
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


FREE = "fusion_engine_free_sequences{"


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def mixed_fields() -> tuple[dict[str, Any], bool]:
    """Random ``n`` and ``fusion.models`` (a model named twice in an eighth of all)."""
    extra: dict[str, Any] = {"n": random.randint(1, 4)}
    twice = False
    if random.random() < 0.5:
        models = random.sample(SOURCES, random.randint(1, 3))
        if random.random() < 0.25:
            models.append(random.choice(models))
            twice = True
        extra["fusion"] = {"models": models}
    if random.random() < 0.5:
        extra["temperature"] = 0.8
    return extra, twice


def read_usage(usage: dict[str, Any] | None) -> None:
    for name, u in ((usage or {}).get("models") or {}).items():
        if u.get("dropped"):
            CHECK.dropped.append(f"{name}: {u['dropped']}")


async def one(
    http: httpx.AsyncClient, kind: str, max_tokens: int, mixed: bool
) -> tuple[str, int, float]:
    body: dict[str, Any] = {
        "model": "fusion",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
    }
    twice = False
    if mixed:
        extra, twice = mixed_fields()
        body.update(extra)
        CHECK.duplicates_sent += twice
    started = time.perf_counter()
    if kind == "plain":
        r = await http.post("/v1/chat/completions", json=body)
        if r.status_code == 200 and mixed:
            answer = r.json()
            read_usage(answer.get("usage"))
            CHECK.choices += len(answer["choices"])
            CHECK.empty_choices += sum(
                not c["message"]["content"].strip() for c in answer["choices"]
            )
        note_400(r.status_code, twice)
        return kind, r.status_code, time.perf_counter() - started
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    texts: dict[int, str] = {}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if kind == "disconnect" and line.startswith("data: ") and '"content"' in line:
                break  # leaves mid-stream: the server must stop this request's work
            if line == "data: [DONE]":
                if mixed:
                    CHECK.choices += len(texts)
                    CHECK.empty_choices += sum(not t.strip() for t in texts.values())
                break
            if mixed and line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                if "error" in event:  # an error after the 200 header: counted as a 5xx
                    print(f"stream error: {event['error']['message']}", file=sys.stderr)
                    status = 599
                    continue
                read_usage(event.get("usage"))
                for c in event.get("choices", []):
                    content = c["delta"].get("content") or ""
                    texts[c["index"]] = texts.get(c["index"], "") + content
    note_400(status, twice)
    return kind, status, time.perf_counter() - started


def note_400(status: int, twice: bool) -> None:
    if twice:
        CHECK.duplicates_refused += status == 400
    elif status == 400:
        CHECK.other_400 += 1


async def drive(
    url: str, requests: int, clients: int, max_tokens: int, mixed: bool = False
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
                    results.append(await one(http, kind, max_tokens, mixed))
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
    ap.add_argument("--mixed", action="store_true", help="n 1-4 and random fusion.models")
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
        free_before = metric(httpx.get(f"{url}/metrics", timeout=10).text, FREE)
        started = time.perf_counter()
        results = asyncio.run(drive(url, args.requests, args.clients, args.max_tokens, args.mixed))
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
        "free_sequences": {"before": free_before, "after": metric(metrics, FREE)},
    }
    if args.mixed:
        report["mixed"] = {
            "choices_read": CHECK.choices,
            "empty_choices": CHECK.empty_choices,
            "dropped": CHECK.dropped,
            "duplicates_sent": CHECK.duplicates_sent,
            "duplicates_refused_400": CHECK.duplicates_refused,
            "other_400": CHECK.other_400,
        }
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    ok = report["server_5xx"] == 0 and open_states == 0 and in_flight == 0 and 0 not in by_status
    ok = ok and metric(metrics, FREE) == free_before
    if args.mixed:
        ok = ok and not CHECK.dropped and not CHECK.empty_choices and not CHECK.other_400
        ok = ok and CHECK.duplicates_refused == CHECK.duplicates_sent
    if pid and baseline:
        ok = ok and after < baseline * 1.25 + 64
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
