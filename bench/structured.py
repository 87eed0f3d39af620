"""Structured outputs, side by side in one run: on extraction prompts with a JSON schema
(bench/extraction.py), each member unconstrained (asked for JSON in words), each member
constrained (``response_format`` json_schema), and the fused models constrained.

Prints, per system: the schema-valid rate with a Wilson 95% interval, the mean field
accuracy (name, age, city) with a bootstrap interval, and the mean time per answer with
its ratio to the first member constrained. Requests run one at a time against one
``fusion-server serve`` (the default config), alternating systems per prompt so drift in
the machine's speed spreads evenly.

    .venv/bin/python bench/structured.py --prompts 50
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from openai import OpenAI
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extraction import SCHEMA, Person, examples, field_accuracy
from bench.server_process import start_server, stop_server

MEMBERS = ("qwen2.5-0.5b", "smollm2-135m", "gemma3-270m")
FUSED = ("fusion", "fusion-cool")
ASK_JSON = (
    "\n\nAnswer with only a JSON object with the keys name (string), age (integer) and "
    "city (string)."
)


@dataclass
class Tally:
    valid: list[bool] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(xs: list[float], rounds: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    means = sorted(sum(rng.choices(xs, k=len(xs))) / len(xs) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds)]


def parse(text: str) -> Person | None:
    """The answer as the schema's object, if it is one (a JSON object alone)."""
    try:
        return Person.model_validate_json(text.strip())
    except ValidationError:
        return None


System = tuple[str, bool, str]  # model, constrained, how candidates are scored


def ask(client: OpenAI, system: System, prompt: str, max_tokens: int) -> str:
    model, constrained, scores = system
    extra: dict[str, object] = {}
    if constrained:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        extra["response_format"] = fmt
    if scores != "raw":
        extra["extra_body"] = {"fusion": {"grammar_scores": scores}}
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt + ("" if constrained else ASK_JSON)}],
        max_tokens=max_tokens,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )
    return answer.choices[0].message.content or ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--out", default="bench/results/structured.json")
    args = ap.parse_args()

    systems: list[System] = (
        [(m, False, "raw") for m in MEMBERS]
        + [(m, True, "raw") for m in MEMBERS + FUSED]
        + [(m, True, "renormalised") for m in FUSED]
    )
    tallies = {s: Tally() for s in systems}
    proc, url = start_server(args.config)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        for e in examples(3):  # warm-up: vocabularies for grammars, caches; not counted
            for system in systems:
                ask(client, system, e.prompt, 8)
        for i, e in enumerate(examples(args.prompts)):
            order = systems[i % len(systems) :] + systems[: i % len(systems)]
            for system in order:
                model, constrained, _ = system
                started = time.perf_counter()
                text = ask(client, system, e.prompt, args.max_tokens)
                t = tallies[system]
                t.seconds.append(time.perf_counter() - started)
                got = parse(text)
                if got is None and constrained:
                    print(f"  {model}: not the schema's object: {text!r}", file=sys.stderr)
                t.valid.append(got is not None)
                t.accuracy.append(field_accuracy(got, e.truth))
            print(f"prompt {i + 1}/{args.prompts}", file=sys.stderr)
    finally:
        stop_server(proc)

    base = sum(tallies[(MEMBERS[0], True, "raw")].seconds) / args.prompts
    rows = []
    print(f"\n{args.prompts} extraction prompts, greedy, max_tokens {args.max_tokens}")
    print(f"{'system':48} {'valid':>22} {'field accuracy':>24} {'s/answer':>9} {'ratio':>6}")
    for (model, constrained, scores), t in tallies.items():
        n, k = len(t.valid), sum(t.valid)
        lo, hi = wilson(k, n)
        acc = sum(t.accuracy) / n
        alo, ahi = bootstrap(t.accuracy)
        secs = sum(t.seconds) / n
        name = f"{model} {'constrained' if constrained else 'unconstrained'}"
        if scores != "raw":
            name += f", {scores} scores"
        print(
            f"{name:48} {k / n:6.0%} [{lo:4.0%}-{hi:4.0%}] {k:3d}/{n:<3d} "
            f"{acc:6.1%} [{alo:5.1%}-{ahi:5.1%}] {secs:9.2f} {secs / base:5.2f}x"
        )
        rows.append(
            {
                "model": model,
                "constrained": constrained,
                "grammar_scores": scores,
                "valid": k,
                "n": n,
                "valid_interval": [lo, hi],
                "field_accuracy": acc,
                "accuracy_interval": [alo, ahi],
                "seconds_per_answer": secs,
                "ratio_to_first_member_constrained": secs / base,
            }
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": args.prompts, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}; command: .venv/bin/python bench/structured.py --prompts {args.prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
