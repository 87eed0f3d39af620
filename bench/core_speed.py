"""Fusion speed vs its source models, side by side in one run, through the same engine.

Prints (1) wall time per output character of fused generation vs the sum of each source
model's own time per output character (each model alone through the same engine and
loop), and (2) the mean fusion step time at a ~1,500-token context vs a ~100-token one.

    .venv/bin/python bench/core_speed.py [--config config.yaml] [--max-tokens 80]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from fusion.loop import Fuser
from fusion.types import FusionOutcome, FusionParams, Prompt
from server.config import load_config
from server.engines import load_models, shutdown_models

QUESTIONS = [
    "Explain in a short paragraph why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
]


async def timed(
    fuser: Fuser, prompt: Prompt, params: FusionParams
) -> tuple[float, FusionOutcome, list[float]]:
    outcome = FusionOutcome()
    steps: list[float] = []
    started = time.perf_counter()
    async for seg in fuser.run(prompt, params, outcome):
        steps.append(seg.step_seconds)
    return time.perf_counter() - started, outcome, steps


def long_context(tokens_wanted: int) -> str:
    sentence = "The river runs past the old mill, where the miller keeps his books in order. "
    return sentence * max(1, tokens_wanted // 16)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--method", default="cool")
    ap.add_argument("--json", type=Path, default=Path("bench/results/core_speed.json"))
    args = ap.parse_args()
    config = load_config(args.config)
    models = await load_models(config)
    fuser = Fuser(models, window_pieces=config.fusion.window_pieces)
    names = [m.name for m in models]
    rows = []
    try:
        base = dict(max_tokens=args.max_tokens, max_segment_tokens=config.fusion.max_segment_tokens)
        # warm-up: first forwards allocate and pick kernels
        await timed(
            fuser, Prompt(messages=({"role": "user", "content": "Hi"},)), FusionParams(max_tokens=4)
        )
        for q in QUESTIONS:
            prompt = Prompt(messages=({"role": "user", "content": q},))
            singles = {}
            for n in names:
                secs, out, _ = await timed(fuser, prompt, FusionParams(models=(n,), **base))
                singles[n] = (secs, len(out.text), out.completion_tokens)
            secs, out, _ = await timed(fuser, prompt, FusionParams(method=args.method, **base))
            per_char_sum = sum(s / max(c, 1) for s, c, _ in singles.values())
            rows.append(
                {
                    "question": q,
                    "fused_s": secs,
                    "fused_chars": len(out.text),
                    "fused_tokens": out.completion_tokens,
                    "singles": singles,
                    "ratio": (secs / max(len(out.text), 1)) / per_char_sum,
                }
            )
        # step time vs context length (raw completion prompts)
        ctx = {}
        for wanted in (100, 1500):
            prompt = Prompt(text=long_context(wanted))
            ids = models[0].completion_prompt_ids(prompt.text or "")
            _, out, steps = await timed(
                fuser, prompt, FusionParams(method=args.method, max_tokens=40)
            )
            ctx[wanted] = (
                len(ids),
                statistics.mean(steps[1:]) if len(steps) > 1 else steps[0],
                len(steps),
            )
    finally:
        await shutdown_models(models)

    print(
        f"\nFused ({args.method}) vs sum of singles, transformers engine, "
        f"{config.models[0].options.threads} thread(s)/model, max_tokens={args.max_tokens}"
    )
    print(
        "| question | "
        + " | ".join(f"{n} s/char" for n in names)
        + " | sum s/char | fused s/char | ratio |"
    )
    print("|---" * (len(names) + 4) + "|")
    for r in rows:
        singles = [r["singles"][n][0] / max(r["singles"][n][1], 1) for n in names]
        fused = r["fused_s"] / max(r["fused_chars"], 1)
        print(
            f"| {r['question'][:32]}… | "
            + " | ".join(f"{x * 1000:.1f} ms" for x in singles)
            + f" | {sum(singles) * 1000:.1f} ms | {fused * 1000:.1f} ms | {r['ratio']:.2f} |"
        )
    print(f"\nmean ratio fused / sum of singles: {statistics.mean(r['ratio'] for r in rows):.2f}")
    (short_n, short_t, _), (long_n, long_t, _) = ctx[100], ctx[1500]
    print(
        f"step time: {short_t * 1000:.0f} ms at {short_n} context tokens, "
        f"{long_t * 1000:.0f} ms at {long_n}; ratio {long_t / short_t:.2f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "context": ctx}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
