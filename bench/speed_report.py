"""Tables and plots for ``bench/speed.py``'s raw rows (pure: rows in, markdown + PNGs out)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

PHASES = ("generate", "score", "align", "commit", "other")


def short(name: str) -> str:
    return name.split("-")[0]


def label(row: dict[str, Any]) -> str:
    if row["method"] is None:
        return f"{short(row['models'][0])} alone"
    return f"{'+'.join(short(m) for m in row['models'])} {row['method']}"


def _per_char(row: dict[str, Any]) -> float:
    return float(row["wall_s"]) / max(int(row["chars"]), 1)


def ratios(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(engine, system label) -> mean over questions of fused s/char ÷ Σ members' s/char."""
    alone: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if r["method"] is None:
            alone[(r["engine"], r["question"], r["models"][0])] = _per_char(r)
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] is None or r.get("context_sweep"):
            continue
        parts = [alone.get((r["engine"], r["question"], m)) for m in r["models"]]
        if any(p is None for p in parts):
            continue
        out[(r["engine"], label(r))].append(_per_char(r) / sum(p for p in parts if p))
    return {k: statistics.mean(v) for k, v in out.items()}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (engine, system), means over the questions."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if not r.get("context_sweep"):
            groups[(r["engine"], label(r))].append(r)
    rat = ratios(rows)
    lines = []
    for (engine, name), rs in groups.items():
        wall = sum(r["wall_s"] for r in rs)
        phases = {p: sum(r.get("phases", {}).get(p, 0.0) for r in rs) for p in PHASES}
        steps = [r["steps"] for r in rs if r.get("steps")]
        fused = rs[0]["method"] is not None
        lines.append(
            {
                "engine": engine,
                "system": name,
                "fused": fused,
                "method": rs[0]["method"],
                "members": len(rs[0]["models"]),
                "wall_s": wall / len(rs),
                "tok_s": sum(r["tokens"] for r in rs) / wall,
                "first_s": statistics.mean(r["first_s"] for r in rs),
                "step_ms": 1000 * wall / sum(steps) if steps and fused else None,
                "share": {p: phases[p] / wall for p in PHASES} if fused else None,
                "ratio": rat.get((engine, name)),
            }
        )
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 else f"{100 * x:.1f}%"


def markdown(lines: list[dict[str, Any]]) -> str:
    out = [
        "| engine | system | wall s | output tok/s | first segment s | ms/step | "
        "generate / score / align / commit / other | fused ÷ Σ singles |",
        "|---|---|--:|--:|--:|--:|---|--:|",
    ]
    for x in lines:
        share = " / ".join(_pct(x["share"][p]) for p in PHASES) if x["share"] else "—"
        step = f"{x['step_ms']:.0f}" if x["step_ms"] else "—"
        ratio = f"**{x['ratio']:.2f}**" if x["ratio"] is not None else "—"
        out.append(
            f"| {x['engine']} | {x['system']} | {x['wall_s']:.1f} | {x['tok_s']:.1f} | "
            f"{x['first_s']:.2f} | {step} | {share} | {ratio} |"
        )
    return "\n".join(out)


def context_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| engine | prompt tokens | steps | mean step ms (after the first) |",
        "|---|--:|--:|--:|",
    ]
    for r in rows:
        if not r.get("context_sweep"):
            continue
        later = [s["step_s"] for s in r["step_log"][1:]] or [r["wall_s"]]
        ctx = r["question"].split(":", 1)[1]
        out.append(
            f"| {r['engine']} | {ctx} | {len(r['step_log'])} | "
            f"{1000 * statistics.mean(later):.0f} |"
        )
    return "\n".join(out)


def plots(rows: list[dict[str, Any]], lines: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    engines = sorted({x["engine"] for x in lines})
    files = []

    # 1. fused ÷ Σ singles per system and method
    fig, axes = plt.subplots(1, len(engines), figsize=(7 * len(engines), 4.5), squeeze=False)
    for ax, engine in zip(axes[0], engines):
        fused = [x for x in lines if x["engine"] == engine and x["ratio"] is not None]
        ax.barh([x["system"] for x in fused], [x["ratio"] for x in fused], color="#4c72b0")
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("fused time per char ÷ sum of its singles' (lower is better)")
        ax.set_title(f"{engine}: cost of fusion")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "speed_ratio.png", dpi=110)
    plt.close(fig)
    files.append("speed_ratio.png")

    # 2. where the time goes: seconds per output token, split by phase
    fig, axes = plt.subplots(1, len(engines), figsize=(7 * len(engines), 4.5), squeeze=False)
    colors = dict(zip(PHASES, ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860")))
    for ax, engine in zip(axes[0], engines):
        sel = [
            x
            for x in lines
            if x["engine"] == engine
            and (not x["fused"] or x["members"] > 2 or x["method"] == "cool")
        ]
        left = [0.0] * len(sel)
        for p in PHASES:
            vals = [
                (x["share"][p] if x["share"] else (1.0 if p == "generate" else 0.0))
                / max(x["tok_s"], 1e-9)
                for x in sel
            ]
            ax.barh([x["system"] for x in sel], vals, left=left, color=colors[p], label=p)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlabel("seconds per output token")
        ax.set_title(f"{engine}: where the time goes")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speed_phases.png", dpi=110)
    plt.close(fig)
    files.append("speed_phases.png")

    # 3. step time against context length
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in engines:
        pts = [
            (s["context"], 1000 * s["step_s"])
            for r in rows
            if r.get("context_sweep") and r["engine"] == engine
            for s in r["step_log"][1:]
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, label=engine)
    ax.set_xlabel("context tokens before the step")
    ax.set_ylabel("step time, ms")
    ax.set_ylim(bottom=0)
    ax.set_title("fusion step cost vs context (cool, all models)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speed_context.png", dpi=110)
    plt.close(fig)
    files.append("speed_context.png")
    return files


def render(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> str:
    lines = summary(rows)
    files = plots(rows, lines, out)
    text = "\n\n".join(
        [
            f"Machine: {meta['machine']}. Run: {meta['when']}. Command: `{meta['command']}`",
            markdown(lines),
            context_table(rows),
            "\n".join(f"![{f}]({f})" for f in files),
        ]
    )
    (out / "speed.md").write_text(text + "\n")
    return text
