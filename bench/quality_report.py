"""Tables and a plot for ``bench/quality.py``'s answers (pure: rows in, markdown + PNG out)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sound at small n and at 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def common_questions(answers: list[dict[str, Any]]) -> set[int]:
    """Questions every system has answered: the systems are compared on the same ones."""
    asked: dict[str, set[int]] = defaultdict(set)
    for r in answers:
        asked[r["system"]].add(r["index"])
    return set.intersection(*asked.values()) if asked else set()


def summary(answers: list[dict[str, Any]], ppl: list[dict[str, Any]]) -> list[dict[str, Any]]:
    common = common_questions(answers)
    answers = [r for r in answers if r["index"] in common]
    ppl = [r for r in ppl if r["index"] in common]
    by_system: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in answers:
        by_system[r["system"]].append(r)
    ppl_by: dict[str, list[float]] = defaultdict(list)
    for r in ppl:
        values = [v for v in r["ppl"].values() if math.isfinite(v)]
        if values:
            ppl_by[r["system"]].append(statistics.mean(values))  # averaged over the models
    lines = []
    for system, rows in by_system.items():
        n, k = len(rows), sum(1 for r in rows if r["correct"])
        lo, hi = wilson(k, n)
        lines.append(
            {
                "system": system,
                "source": rows[0].get("method") is None,
                "n": n,
                "correct": k,
                "accuracy": k / n if n else 0.0,
                "ci": (lo, hi),
                "avg_ppl": statistics.mean(ppl_by[system]) if ppl_by[system] else None,
                "ppl_n": len(ppl_by[system]),
                "seconds": statistics.mean(r["seconds"] for r in rows),
                "tokens": statistics.mean(r["completion_tokens"] for r in rows),
            }
        )
    return lines


def overlap(answers: list[dict[str, Any]], a: str, b: str) -> tuple[int, int]:
    """(questions only ``a`` got right, questions only ``b`` got right)."""
    right: dict[str, set[int]] = defaultdict(set)
    for r in answers:
        if r["correct"]:
            right[r["system"]].add(r["index"])
    return len(right[a] - right[b]), len(right[b] - right[a])


def markdown(lines: list[dict[str, Any]]) -> str:
    out = [
        "| system | questions | correct | accuracy | 95% CI (Wilson) | avg. perplexity | "
        "s / answer | tokens / answer |",
        "|---|--:|--:|--:|---|--:|--:|--:|",
    ]
    for x in lines:
        lo, hi = x["ci"]
        ppl = f"{x['avg_ppl']:.3f}" if x["avg_ppl"] is not None else "—"
        out.append(
            f"| {x['system']} | {x['n']} | {x['correct']} | {100 * x['accuracy']:.1f}% | "
            f"{100 * lo:.1f}–{100 * hi:.1f}% | {ppl} | {x['seconds']:.1f} | {x['tokens']:.0f} |"
        )
    return "\n".join(out)


def plot(lines: list[dict[str, Any]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [x["system"] for x in lines]
    acc = [100 * x["accuracy"] for x in lines]
    err = [
        [100 * (x["accuracy"] - x["ci"][0]) for x in lines],
        [100 * (x["ci"][1] - x["accuracy"]) for x in lines],
    ]
    colors = ["#999999" if x["source"] else "#4c72b0" for x in lines]
    ax.bar(names, acc, yerr=err, capsize=4, color=colors)
    ax.set_ylabel("GSM8K accuracy, % (95% CI)")
    ax.set_title(f"GSM8K, 3-shot, greedy, {lines[0]['n'] if lines else 0} questions")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "quality_gsm8k.png", dpi=110)
    plt.close(fig)
    return "quality_gsm8k.png"


def render(
    answers: list[dict[str, Any]], ppl: list[dict[str, Any]], meta: dict[str, Any], out: Path
) -> str:
    lines = summary(answers, ppl)
    common = common_questions(answers)
    answers = [r for r in answers if r["index"] in common]
    parts = [
        f"Run: {meta['when']}. Command: `{meta['command']}` (config `{meta['config']}`, "
        f"{meta['shots']}-shot, max_tokens {meta['max_tokens']}; {len(common)} of the "
        f"{meta['limit']} questions asked have answers from every system and are counted).",
        markdown(lines),
    ]
    sources = [x["system"] for x in lines if x["source"]]
    fused = [x["system"] for x in lines if not x["source"]]
    if sources and fused:
        best = max((x for x in lines if x["system"] in sources), key=lambda x: x["accuracy"])
        rows = ["| fused system | right only there | right only with " + best["system"] + " |",
                "|---|--:|--:|"]
        for f in fused:
            a, b = overlap(answers, f, best["system"])
            rows.append(f"| {f} | {a} | {b} |")
        parts.append("\n".join(rows))
    if lines:
        parts.append(f"![GSM8K accuracy]({plot(lines, out)})")
    text = "\n\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(text + "\n")
    return text
