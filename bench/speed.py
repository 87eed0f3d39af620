"""Speed of fused generation vs its source models, side by side in one run, per engine.

For every engine config: each source model alone (plain greedy generation straight through
its engine: open, generate, release), then every fused system, the trio and each pair,
under every method, on the same chat questions, interleaved so machine noise hits all
alike. Then step time against context length (a fused ``cool`` run after raw prompts of
growing length). Writes ``bench/results/speed.jsonl`` (raw rows), a markdown report and
PNG plots (default ``docs/bench/``).

    .venv/bin/python bench/speed.py                      # llamacpp + transformers
    .venv/bin/python bench/speed.py --engines llamacpp,transformers,vllm --questions 1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import speed_report
from fusion.loop import Fuser
from fusion.models import SourceModel
from fusion.types import METHODS, FusionOutcome, FusionParams, Prompt
from server.config import load_config
from server.engines import load_models, shutdown_models

ENGINE_CONFIGS = {
    "llamacpp": "config.yaml",
    "transformers": "config.transformers.yaml",
    "vllm": "config.vllm-cpu.yaml",
}
QUESTIONS = [
    "Explain in a short paragraph why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "What are three tips for staying focused while studying?",
]
CONTEXT_WORDS = (60, 300, 700, 1300)


async def single(model: SourceModel, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    """One model alone, no fusion machinery: open, generate to the end, release."""
    assert prompt.messages is not None
    ids = model.chat_prompt_ids(prompt.messages)
    first: list[float] = []
    started = time.perf_counter()

    def note(generated: Sequence[int]) -> bool:
        if not first:
            first.append(time.perf_counter() - started)
        return False

    state = await model.engine.open(f"bench-{uuid.uuid4().hex}", ids)
    try:
        gen = await model.engine.generate(state, max_tokens, model.stop_ids, note)
    finally:
        await model.engine.release(state)
    wall = time.perf_counter() - started
    content = [t for t in gen.ids if t not in model.stop_ids]
    text = model.tokenizer.decode(content)
    return {
        "wall_s": wall,
        "first_s": first[0] if first else wall,
        "tokens": len(content),
        "chars": len(text.strip()),
        "steps": len(gen.ids),
    }


async def fused(fuser: Fuser, prompt: Prompt, params: FusionParams) -> dict[str, Any]:
    outcome = FusionOutcome()
    first: float | None = None
    steps: list[dict[str, Any]] = []
    started = time.perf_counter()
    async for seg in fuser.run(prompt, params, outcome):
        if first is None:
            first = time.perf_counter() - started
        steps.append({"context": seg.context_tokens, "step_s": seg.step_seconds})
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "first_s": first if first is not None else wall,
        "tokens": outcome.completion_tokens,
        "chars": len(outcome.text.strip()),
        "steps": outcome.segments if params.method in ("cool", "cool_shortest") else None,
        "phases": outcome.phase_seconds,
        "model_s": outcome.model_seconds,
        "step_log": steps,
    }


def systems(names: list[str]) -> list[tuple[str, ...]]:
    """The full set and, when there are more than two, each pair."""
    sets = [tuple(names)]
    if len(names) > 2:
        sets += list(itertools.combinations(names, 2))
    return sets


def long_prompt(words: int) -> str:
    sentence = "The river runs past the old mill where the miller keeps his books in order. "
    return sentence * max(1, words // 15)


async def bench_engine(engine: str, config_path: str, args: argparse.Namespace) -> list[dict]:
    config = load_config(config_path)
    models = await load_models(config)
    fuser = Fuser(models, window_pieces=config.fusion.window_pieces)
    names = [m.name for m in models]
    combos = systems(names)
    rows: list[dict[str, Any]] = []
    seg_cap = config.fusion.max_segment_tokens
    threads = [getattr(m.options, "threads", None) for m in config.models]
    base = {"engine": engine, "threads": threads}
    try:
        warm = Prompt(messages=({"role": "user", "content": "Hi"},))
        for m in models:
            await single(m, warm, 4)
        await fused(fuser, warm, FusionParams(max_tokens=4))
        plan: list[tuple[str, tuple[str, ...], str | None]] = []
        for q in QUESTIONS[: args.questions]:
            plan += [(q, (n,), None) for n in names]
            plan += [(q, c, meth) for c in combos for meth in args.methods]
        for q, members, method in tqdm(plan, desc=f"speed [{engine}]", unit="run"):
            prompt = Prompt(messages=({"role": "user", "content": q},))
            if method is None:
                res = await single(fuser.models[members[0]], prompt, args.max_tokens)
            else:
                params = FusionParams(
                    method=method,  # type: ignore[arg-type]
                    max_tokens=args.max_tokens,
                    max_segment_tokens=seg_cap,
                    models=members,
                )
                res = await fused(fuser, prompt, params)
            rows.append({**base, "question": q, "models": list(members), "method": method, **res})
        for words in tqdm(CONTEXT_WORDS, desc=f"context [{engine}]", unit="run"):
            prompt = Prompt(text=long_prompt(words))
            n_ctx = len(models[0].completion_prompt_ids(prompt.text or ""))
            res = await fused(fuser, prompt, FusionParams(max_tokens=args.context_tokens))
            rows.append(
                {
                    **base,
                    "question": f"context:{n_ctx}",
                    "models": names,
                    "method": "cool",
                    "context_sweep": True,
                    **res,
                }
            )
    finally:
        await shutdown_models(models)
    return rows


def machine() -> str:
    import os

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--engines", default="llamacpp,transformers", help="comma-separated")
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="ENGINE=PATH",
        help="config file for an engine (default llamacpp=config.yaml, "
        "transformers=config.transformers.yaml, vllm=config.vllm-cpu.yaml)",
    )
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--context-tokens", type=int, default=48, help="tokens per context run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--raw", type=Path, default=Path("bench/results/speed.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--report-only", action="store_true", help="re-render from --raw")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    configs = dict(ENGINE_CONFIGS)
    for item in args.config:
        name, _, path = item.partition("=")
        configs[name] = path
    command = "bench/speed.py " + " ".join(sys.argv[1:])
    if not args.report_only:
        rows: list[dict[str, Any]] = []
        for engine in [e for e in args.engines.split(",") if e]:
            rows += await bench_engine(engine, configs[engine], args)
        args.raw.parent.mkdir(parents=True, exist_ok=True)
        meta = {"meta": True, "machine": machine(), "command": command, "when": time.ctime()}
        args.raw.write_text("\n".join(json.dumps(r) for r in [meta, *rows]) + "\n")
    lines = [json.loads(x) for x in args.raw.read_text().splitlines() if x.strip()]
    meta, rows = lines[0], lines[1:]
    report = speed_report.render(rows, meta, args.out)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
