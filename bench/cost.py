"""What the default fused model costs against its leader alone, and what skipping the
work that cannot change the answer saves (issue 24, part 0), side by side in one run.

One process, ``config.yaml``'s models and fused model (llama.cpp, greedy), requests built
by the server's own ``FusionService`` (as ``make serve`` answers them). Per prompt, in
turn, so machine noise hits all alike: the leader alone (``model: qwen2.5-0.5b``), the
default ``fusion`` with every fused step scored and every segment written, then with the
steps the filters decide taken without scoring but every segment written, and ``fusion``
as served (a weak member's hopeless segment also stops). Chat prompts and completions
prompts; time per output character, each system's ratio to the leader alone, the steps by
kind, and which texts differ: with every step scored they may part by llama.cpp's
rounding (docs/BENCHMARKS.md), the hopeless stop alone must change none (exit 1 if so).
``--borrow`` adds the leader alone and the served fusion with every llama.cpp model
borrowing the idle models' cores when it works alone (``max_threads``); their texts are
compared with the served ones (past 256 KV cells they may part: docs/BENCHMARKS.md).
llama.cpp's prefix cache is off unless ``--prefix-cache``: a prompt copied from a kept
context gets slightly other numbers than one decoded whole, which would part texts by the
order the systems ran in.

    .venv/bin/python bench/cost.py                    # 2 rounds
    .venv/bin/python bench/cost.py --borrow           # and borrowing idle cores
    .venv/bin/python bench/cost.py --rounds 1 --chat-tokens 32 --completion-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import load_config
from server.engines import load_models, shutdown_models
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import FusionService

CHAT = [
    "Explain in a short paragraph why the sky is blue.",
    "What are three tips for staying focused while studying?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?",
]
COMPLETIONS = [
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    ",
]
SYSTEMS = (
    "leader alone",
    "fusion, every step scored",
    "fusion, filtered, every segment written",
    "fusion (served)",
)
# --borrow: the leader alone and the served fusion again, each llama.cpp model borrowing
# the idle models' cores when it works alone (``max_threads`` = every CPU)
OWN = ("leader alone, borrowing", "fusion (served), borrowing")


def borrow(models: list[Any], on: bool) -> None:
    """Let every llama.cpp model borrow idle models' cores, or keep config's setting."""
    for m in models:
        rt = getattr(m.engine, "rt", None)
        if rt is not None and hasattr(rt, "max_threads"):
            if not hasattr(rt, "served_max_threads"):
                rt.served_max_threads = rt.max_threads
            rt.max_threads = max(rt.threads, rt.cpus.cpus) if on else rt.served_max_threads


@dataclass
class Tally:
    seconds: float = 0.0
    chars: int = 0
    answers: int = 0
    steps: Counter[str] = field(default_factory=Counter)

    def per_char(self) -> float:
        return self.seconds / max(1, self.chars)


async def one(
    service: FusionService, job_of: Any, shortcuts: bool, stop: bool = True
) -> tuple[float, str, Counter]:
    service.fuser.shortcuts = shortcuts
    service.fuser.stop_hopeless = stop
    job = job_of()
    choice = job.choices[0]
    kinds: Counter[str] = Counter()
    started = time.perf_counter()
    async for seg in service.segments(job, choice):
        kinds[seg.step] += 1
    return time.perf_counter() - started, choice.outcome.text, kinds


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chat-tokens", type=int, default=96)
    ap.add_argument("--completion-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("bench/results/cost.json"))
    ap.add_argument(
        "--borrow",
        action="store_true",
        help="also the leader alone and fusion borrowing idle models' cores (max_threads)",
    )
    ap.add_argument(
        "--prefix-cache",
        action="store_true",
        help="keep config's llama.cpp prefix cache (off by default: a prompt copied from a "
        "kept context has other numbers than one decoded whole, and would part texts)",
    )
    args = ap.parse_args()
    config = load_config(args.config)
    models = await load_models(config)
    if not args.prefix_cache:
        for m in models:
            prefix = getattr(getattr(m.engine, "rt", None), "prefix", None)
            if prefix is not None:
                prefix.max_entries = 0
    service = FusionService(config, models, Metrics())
    fused = config.fusion.name
    leader = config.fusion.selection.leader or models[0].name
    systems = SYSTEMS + (OWN if args.borrow else ())
    tallies = {(kind, s): Tally() for kind in ("chat", "completions") for s in systems}
    differ: list[str] = []
    stop_differ: list[str] = []
    threads_differ: list[str] = []
    rows = []
    try:
        for r in range(args.rounds):
            for kind, prompts in (("chat", CHAT), ("completions", COMPLETIONS)):
                for text in prompts:

                    def job_of(model: str, kind: str = kind, text: str = text) -> Any:
                        if kind == "chat":
                            req = ChatCompletionRequest(
                                model=model,
                                messages=[{"role": "user", "content": text}],
                                max_tokens=args.chat_tokens,
                                temperature=0,
                            )
                            return service.chat_job(req)
                        req2 = CompletionRequest(
                            model=model,
                            prompt=text,
                            max_tokens=args.completion_tokens,
                            temperature=0,
                        )
                        return service.completion_job(req2)

                    texts = {}
                    runs = [
                        (SYSTEMS[0], leader, True, True, False),
                        (SYSTEMS[1], fused, False, False, False),
                        (SYSTEMS[2], fused, True, False, False),
                        (SYSTEMS[3], fused, True, True, False),
                    ]
                    if args.borrow:
                        runs += [
                            (OWN[0], leader, True, True, True),
                            (OWN[1], fused, True, True, True),
                        ]
                    for system, model, shortcuts, stop, borrowing in runs:
                        borrow(models, borrowing)
                        secs, out, kinds = await one(
                            service, lambda m=model: job_of(m), shortcuts, stop
                        )
                        t = tallies[(kind, system)]
                        t.seconds += secs
                        t.chars += len(out)
                        t.answers += 1
                        t.steps += kinds
                        texts[system] = out
                        rows.append(
                            {"round": r, "kind": kind, "prompt": text[:40], "system": system}
                            | {"seconds": secs, "chars": len(out), "steps": dict(kinds)}
                        )
                    if texts[SYSTEMS[1]] != texts[SYSTEMS[3]]:
                        differ.append(f"{kind}: {text[:40]!r}")
                    if texts[SYSTEMS[2]] != texts[SYSTEMS[3]]:  # the stop alone: never
                        stop_differ.append(f"{kind}: {text[:40]!r}")
                    for own, served in zip(OWN, (SYSTEMS[0], SYSTEMS[3])):
                        if own in texts and texts[own] != texts[served]:
                            threads_differ.append(f"{kind} {served}: {text[:40]!r}")
                    print(
                        f"  round {r + 1} {kind} {text[:30]!r}: "
                        + ", ".join(
                            f"{s} {x['seconds']:.2f} s"
                            for s, x in zip([r[0] for r in runs], rows[-len(runs) :])
                        ),
                        file=sys.stderr,
                    )
    finally:
        await service.fuser.close()
        await shutdown_models(models)

    print(f"\n{args.config}: leader {leader}; {args.rounds} rounds, greedy")
    print(
        "| prompts | system | answers | s per 1000 chars | x leader alone "
        "| steps: gated / filtered / fused |"
    )
    print("|---|---|---|---|---|---|")
    for kind in ("chat", "completions"):
        base = tallies[(kind, SYSTEMS[0])].per_char()
        for s in systems:
            t = tallies[(kind, s)]
            steps = (
                "-"
                if s in (SYSTEMS[0], OWN[0])
                else (f"{t.steps['gated']} / {t.steps['filtered']} / {t.steps['fused']}")
            )
            print(
                f"| {kind} | {s} | {t.answers} | {1000 * t.per_char():.2f} | "
                f"{t.per_char() / base:.2f} | {steps} |"
            )
    print(f"\nfused texts that differ with and without the shortcuts: {len(differ)}")
    for d in differ:
        print(f"- {d}")
    print(f"fused texts that differ with and without the hopeless stop: {len(stop_differ)}")
    for d in stop_differ:
        print(f"- {d}")
    if args.borrow:
        print(f"texts that differ with and without borrowed cores: {len(threads_differ)}")
        for d in threads_differ:
            print(f"- {d}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}))
    print(f"\ncommand: {shlex.join(['.venv/bin/python', *sys.argv])}")
    return 1 if stop_differ else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
