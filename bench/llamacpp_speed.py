"""The llama.cpp engine against llama-cpp-python's own ``Llama``, threads, and concurrency.

Three measurements, side by side in one run on the same GGUF files:

1. each model alone: our engine's greedy generation vs ``Llama.generate`` (same file,
   same threads), interleaved, several rounds;
2. threads per model: the fused trio (``cool``) with 1 and with 2 threads per model;
3. concurrency: one fused request alone vs N at once (aggregate output tokens/s, and
   each request's latency: p50 / p99 / max, so starvation shows);
4. batch (not in the default parts): each model alone, N greedy generations at once
   through our engine (one tick carries all N), N = 1, 2, 4, 8, 16, with small ticks
   split into one-token decodes (``split_below`` 7, the default) and not (0): aggregate tokens/s
   against N = 1, what batching can give on these cores at most;
5. split (not in the default parts): as ctxrow below, for ``split_below`` 7 against 0;
6. ctxrow (not in the default parts): the fused trio with a candidate's first token
   scored from the row kept after the context (``score_from_ctx_row``, the default) and
   without, interleaved with each model alone through the same loop: fused ÷ Σ singles
   (seconds per output token) for both.

Prints markdown tables and writes raw rows to ``bench/results/llamacpp_speed.json``.

    .venv/bin/python bench/llamacpp_speed.py
    .venv/bin/python bench/llamacpp_speed.py --rounds 1 --max-tokens 64 --concurrent 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusion.engines.llamacpp_engine import LlamaCppEngine
from fusion.loop import Fuser
from fusion.models import SourceModel, build_source_model
from fusion.sources import resolve_gguf
from fusion.types import FusionOutcome, FusionParams, Prompt

SOURCES = {
    "smollm2-135m": "pip:smollm2-135m-instruct",
    "gemma3-270m": "pip:gemma3-270m",
    "qwen2.5-0.5b": "pip:qwen2.5-coder-0.5b-instruct",
}
PROMPT = "Write a long story about a lighthouse keeper and the sea, in many paragraphs."
QUESTIONS = [
    "Explain in a short paragraph why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "What are three tips for staying focused while studying?",
    "Describe how a bicycle works.",
    "Why do cats purr? Answer in a few sentences.",
    "Give me a recipe for pancakes.",
    "What is the difference between weather and climate?",
    "Write a poem about the moon.",
]


async def load(threads: int, max_requests: int = 16) -> list[SourceModel]:
    models = []
    for name, source in SOURCES.items():
        found = resolve_gguf(source)
        engine = LlamaCppEngine(
            name, found.gguf, found.tokenizer_dir, threads=threads, max_requests=max_requests
        )
        await engine.start()
        models.append(build_source_model(name, engine, found.tokenizer_dir))
    return models


async def ours_alone(m: SourceModel, ids: list[int], n: int) -> float:
    state = await m.engine.open("alone", ids)
    started = time.perf_counter()
    gen = await m.engine.generate(state, n, frozenset(), lambda _: False)
    wall = time.perf_counter() - started
    await m.engine.release(state)
    return len(gen.ids) / wall


def llama_alone(llm: Any, ids: list[int], n: int) -> float:
    llm.reset()
    started = time.perf_counter()
    count = 0
    for _ in llm.generate(ids, temp=0.0, reset=True):
        count += 1
        if count >= n:
            break
    return count / (time.perf_counter() - started)


async def singles(args: argparse.Namespace) -> list[dict[str, Any]]:
    from llama_cpp import Llama

    rows = []
    for threads in args.threads:
        models = await load(threads)
        try:
            for m in models:
                gguf = m.engine.gguf  # type: ignore[attr-defined]
                llm = Llama(
                    model_path=str(gguf),
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_ctx=2048,
                    verbose=False,
                )
                ids = m.tokenizer.encode_prompt(PROMPT)
                await ours_alone(m, ids, 8)  # warm-up
                llama_alone(llm, ids, 8)
                ours, base = [], []
                for _ in range(args.rounds):  # interleaved: noise hits both
                    ours.append(await ours_alone(m, ids, args.max_tokens))
                    base.append(llama_alone(llm, ids, args.max_tokens))
                rows.append(
                    {
                        "part": "single",
                        "model": m.name,
                        "threads": threads,
                        "ours_tok_s": statistics.median(ours),
                        "llama_tok_s": statistics.median(base),
                    }
                )
                del llm
        finally:
            for m in models:
                await m.engine.shutdown()
    return rows


async def fused_one(
    fuser: Fuser, question: str, max_tokens: int, members: tuple[str, ...] | None = None
) -> dict[str, Any]:
    outcome = FusionOutcome()
    started = time.perf_counter()
    steps = []
    async for seg in fuser.run(
        Prompt(messages=({"role": "user", "content": question},)),
        FusionParams(max_tokens=max_tokens, models=members),
        outcome,
    ):
        steps.append(seg.step_seconds)
    return {"wall_s": time.perf_counter() - started, "tokens": outcome.completion_tokens}


async def toggled(args: argparse.Namespace, part: str) -> list[dict[str, Any]]:
    """Each model alone through the fusion loop, then the fused trio with a setting on
    and off (alternating which goes first): ``ctxrow`` = ``score_from_ctx_row``,
    ``split`` = the runtime's ``split_below`` (the engine's default against 0)."""
    models = await load(args.concurrency_threads)

    def setting(on: bool) -> None:
        for m in models:
            if part == "ctxrow":
                m.engine.score_from_ctx_row = on  # type: ignore[attr-defined]
            else:
                m.engine.rt.split_below = m.engine.split_below if on else 0  # type: ignore[attr-defined]

    rows = []
    try:
        fuser = Fuser(models)
        await fused_one(fuser, "Hi", 4)
        for i, q in enumerate(QUESTIONS[: args.questions]):
            setting(True)
            for m in models:
                res = await fused_one(fuser, q, args.max_tokens, (m.name,))
                rows.append({"part": f"{part}_single", "model": m.name, "question": q, **res})
            for on in (True, False) if i % 2 == 0 else (False, True):  # alternate the order
                setting(on)
                res = await fused_one(fuser, q, args.max_tokens)
                rows.append({"part": f"{part}_fused", "on": on, "question": q, **res})
    finally:
        for m in models:
            await m.engine.shutdown()
    return rows


async def batch_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = await load(args.concurrency_threads, max_requests=32)
    rows = []
    try:
        for m in models:
            ids = m.tokenizer.encode_prompt(PROMPT)
            await ours_alone(m, ids, 8)  # warm-up
            for _, split in itertools.product(range(args.rounds), (m.engine.split_below, 0)):  # type: ignore[attr-defined]
                m.engine.rt.split_below = split  # type: ignore[attr-defined]
                for n in (1, 2, 4, 8, 16):
                    states = [await m.engine.open(f"b{n}-{k}", ids) for k in range(n)]
                    started = time.perf_counter()
                    gens = await asyncio.gather(
                        *(
                            m.engine.generate(st, args.max_tokens, frozenset(), lambda _: False)
                            for st in states
                        )
                    )
                    wall = time.perf_counter() - started
                    for st in states:
                        await m.engine.release(st)
                    tokens = sum(len(g.ids) for g in gens)
                    rows.append(
                        {
                            "part": "batch",
                            "model": m.name,
                            "split_below": split,
                            "n": n,
                            "tokens": tokens,
                            "wall_s": wall,
                        }
                    )
    finally:
        for m in models:
            await m.engine.shutdown()
    return rows


async def fused_threads(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for threads in args.threads:
        models = await load(threads)
        try:
            fuser = Fuser(models)
            await fused_one(fuser, "Hi", 4)
            for q in QUESTIONS[: args.questions]:
                res = await fused_one(fuser, q, args.max_tokens)
                rows.append({"part": "fused_threads", "threads": threads, "question": q, **res})
        finally:
            for m in models:
                await m.engine.shutdown()
    return rows


async def concurrency(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = await load(args.concurrency_threads)
    rows = []
    try:
        fuser = Fuser(models)
        await fused_one(fuser, "Hi", 4)
        for split in args.splits:
            for m in models:
                m.engine.rt.split_below = split  # type: ignore[attr-defined]
                m.engine.rt.seconds = {"decode": 0.0, "jobs": 0.0}  # type: ignore[attr-defined]
                m.engine.rt.max_batch_seqs = 0  # type: ignore[attr-defined]
            for q in QUESTIONS[: args.concurrent]:  # one at a time
                res = await fused_one(fuser, q, args.max_tokens)
                rows.append({"part": "sequential", "split": split, "question": q, **res})
            started = time.perf_counter()
            many = await asyncio.gather(
                *(fused_one(fuser, q, args.max_tokens) for q in QUESTIONS[: args.concurrent])
            )
            wall = time.perf_counter() - started
            rows += [
                {"part": "concurrent", "split": split, "question": q, "batch_wall_s": wall, **r}
                for q, r in zip(QUESTIONS, many)
            ]
            rows.append(
                {
                    "part": "batching",
                    "split": split,
                    "max_batch_seqs": [m.engine.rt.max_batch_seqs for m in models],  # type: ignore[attr-defined]
                    "thread_seconds": {m.name: dict(m.engine.rt.seconds) for m in models},  # type: ignore[attr-defined]
                }
            )
    finally:
        for m in models:
            await m.engine.shutdown()
    return rows


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def report(rows: list[dict[str, Any]], command: str) -> str:
    out = [f"Command: `{command}`", ""]
    single = [r for r in rows if r["part"] == "single"]
    if single:
        out += [
            "| model | threads | ours tok/s | Llama tok/s | ours ÷ Llama |",
            "|---|--:|--:|--:|--:|",
        ]
        for r in single:
            ratio = r["ours_tok_s"] / r["llama_tok_s"]
            out.append(
                f"| {r['model']} | {r['threads']} | {r['ours_tok_s']:.1f} | "
                f"{r['llama_tok_s']:.1f} | {ratio:.2f} |"
            )
        out.append("")
    batch = [r for r in rows if r["part"] == "batch"]
    if batch:
        sizes = sorted({r["n"] for r in batch})
        out += [
            "| model | split_below | "
            + " | ".join(f"{n} at once tok/s" for n in sizes)
            + " | best ÷ 1 |",
            "|---|--:|" + "--:|" * (len(sizes) + 1),
        ]
        for name, split in itertools.product(
            dict.fromkeys(r["model"] for r in batch), sorted({r["split_below"] for r in batch})
        ):
            rate = {}
            for n in sizes:
                sel = [
                    r
                    for r in batch
                    if r["model"] == name and r["n"] == n and r["split_below"] == split
                ]
                rate[n] = statistics.median(r["tokens"] / r["wall_s"] for r in sel)
            cells = " | ".join(f"{rate[n]:.1f}" for n in sizes)
            out.append(f"| {name} | {split} | {cells} | {max(rate.values()) / rate[1]:.2f} |")
        out.append("")
    ft = [r for r in rows if r["part"] == "fused_threads"]
    if ft:
        out += [
            "| fused trio cool | threads/model | tokens | wall s | tok/s |",
            "|---|--:|--:|--:|--:|",
        ]
        for t in sorted({r["threads"] for r in ft}):
            sel = [r for r in ft if r["threads"] == t]
            tok = sum(r["tokens"] for r in sel)
            wall = sum(r["wall_s"] for r in sel)
            out.append(f"| trio | {t} | {tok} | {wall:.1f} | {tok / wall:.1f} |")
        out.append("")
    labels = {
        "ctxrow": (
            "first token scored",
            "from the kept row (ctx_row)",
            "by re-decoding the last token",
        ),
        "split": (
            "decodes of 2-7 tokens",
            "one token per llama_decode (split_below 7)",
            "batched (split_below 0)",
        ),
    }
    for part, (what, on_label, off_label) in labels.items():
        cs = [r for r in rows if r["part"] == f"{part}_single"]
        cf = [r for r in rows if r["part"] == f"{part}_fused"]
        if not (cs and cf):
            continue
        singles_s = sum(
            sum(r["wall_s"] for r in cs if r["model"] == n)
            / max(sum(r["tokens"] for r in cs if r["model"] == n), 1)
            for n in {r["model"] for r in cs}
        )
        out += [
            f"| fused trio cool, {what} | tokens | wall s | tok/s | s/token ÷ Σ singles |",
            "|---|--:|--:|--:|--:|",
        ]
        for on in (True, False):
            sel = [r for r in cf if r["on"] is on]
            tok, wall = sum(r["tokens"] for r in sel), sum(r["wall_s"] for r in sel)
            out.append(
                f"| {on_label if on else off_label} | {tok} | {wall:.1f} | {tok / wall:.1f} | "
                f"{wall / max(tok, 1) / singles_s:.2f} |"
            )
        out += [f"Σ singles: {singles_s:.4f} s/token (each model alone, same questions)", ""]
    for split in dict.fromkeys(r["split"] for r in rows if r["part"] == "sequential"):
        out += concurrency_report(rows, split)
    return "\n".join(out)


def concurrency_report(every: list[dict[str, Any]], split: int) -> list[str]:
    out = [f"Concurrency, split_below {split}:", ""]
    rows = [r for r in every if r.get("split") == split]
    seq = [r for r in rows if r["part"] == "sequential"]
    con = [r for r in rows if r["part"] == "concurrent"]
    if seq and con:
        one = sum(r["tokens"] for r in seq) / sum(r["wall_s"] for r in seq)
        agg = sum(r["tokens"] for r in con) / con[0]["batch_wall_s"]
        lat = [r["wall_s"] for r in con]
        out += [
            "| fused requests | aggregate tok/s | latency p50 s | p99 s | max s |",
            "|---|--:|--:|--:|--:|",
            f"| 1 at a time | {one:.1f} | {pct([r['wall_s'] for r in seq], 0.5):.1f} | "
            f"{pct([r['wall_s'] for r in seq], 0.99):.1f} | {max(r['wall_s'] for r in seq):.1f} |",
            f"| {len(con)} at once | {agg:.1f} | {pct(lat, 0.5):.1f} | {pct(lat, 0.99):.1f} | "
            f"{max(lat):.1f} |",
            "",
            f"{len(con)} at once ÷ 1 at a time (aggregate tok/s): **{agg / one:.2f}x**",
        ]
        batching = [r for r in rows if r["part"] == "batching"]
        if batching:
            out.append(f"Most sequences in one tick, per model: {batching[0]['max_batch_seqs']}")
            for name, secs in batching[0]["thread_seconds"].items():
                parts = ", ".join(f"{k} {v:.1f} s" for k, v in secs.items())
                out.append(f"Decode thread of {name}: {parts}")
    return [*out, ""]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="single,threads,concurrency")
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--concurrency-threads", type=int, default=1)
    ap.add_argument(
        "--splits",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[7],
        help="concurrency part: split_below values to run it with (e.g. 7,0)",
    )
    ap.add_argument("--raw", type=Path, default=Path("bench/results/llamacpp_speed.json"))
    args = ap.parse_args()
    parts = args.parts.split(",")
    rows: list[dict[str, Any]] = []
    if "single" in parts:
        rows += await singles(args)
    if "threads" in parts:
        rows += await fused_threads(args)
    if "concurrency" in parts:
        rows += await concurrency(args)
    if "batch" in parts:
        rows += await batch_scaling(args)
    for part in ("ctxrow", "split"):
        if part in parts:
            rows += await toggled(args, part)
    command = "bench/llamacpp_speed.py " + " ".join(sys.argv[1:])
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    raw = {"command": command, "when": time.ctime(), "rows": rows}
    args.raw.write_text(json.dumps(raw, indent=1))
    print(report(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
