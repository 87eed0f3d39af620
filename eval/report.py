"""Tables from eval/run.py's lm-eval results: per task and system, accuracy with a 95%
Wilson interval, paired McNemar against the best single source (and the ``--against``
systems: Qwen's self-consistency, say), seconds per answer, and (``--ppl``) the outputs'
cross-model perplexity.

    python eval/report.py --out eval/results [--ppl] [--markdown docs/bench/eval.md]

Only the questions every system of a task answered count (a paired comparison). Metric:
lm-eval's ``exact_match`` under the ``flexible-extract`` filter where the task has one
(GSM8K, the paper's), else its only one. The best single source is the source model with
the highest accuracy on those questions; McNemar's exact test (two-sided binomial on
the discordant pairs: b = this system right and the best single wrong, c = the reverse)
says whether a difference is more than chance.

``--ppl`` scores every answer under every source model in-process (the engines of
``--config``, one after another), given its prompt: a model's perplexity of an answer is
exp of its mean token NLL in that model's own tokens; the cross-model perplexity of an
answer is exp of the mean over models of those NLLs (the geometric mean of their
perplexities); the table shows its median over a system's answers (a mean is ruled by
the rare answer one model finds absurd). Scores are cached in ``<out>/ppl.jsonl``, and
read from there without ``--ppl`` too; a system shows a median only once every one of
its answers is scored.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import math
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

Z95 = 1.96


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at small n and at 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b against b + c at one half."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def chat_task(task: str) -> bool:
    """Whether a task is asked through chat (lm-eval's ``local-chat-completions`` with
    ``--apply_chat_template``): its name has ``_chat``; else through completions."""
    return "_chat" in task


def samples_task(path: Path) -> str | None:
    """The task of an lm-eval samples file (``samples_{task}_{timestamp}.jsonl``; the
    timestamp holds no ``_``), None for another file."""
    name = path.name
    if not (name.startswith("samples_") and name.endswith(".jsonl")):
        return None
    task, sep, _ = name[len("samples_") : -len(".jsonl")].rpartition("_")
    return task if sep and task else None


def read_samples(*outs: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """task -> system -> doc_id -> {correct, text, prompt}, over every output folder (the
    chunks of one run: their questions together; for a doc in two files, the later file
    in folder order, then name (lm-eval's timestamp) order, wins)."""
    found: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    paths = [p for out in outs for p in sorted(out.glob("*/samples_*.jsonl"))]
    for path in paths:
        system, task = path.parent.name, samples_task(path)
        if task is None:
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        filters = {r.get("filter") for r in rows}
        keep = "flexible-extract" if "flexible-extract" in filters else next(iter(filters))
        docs = {}
        for r in rows:
            if r.get("filter") != keep:
                continue
            args = r["arguments"]
            if isinstance(args, str):
                args = ast.literal_eval(args)
            resps = r["resps"]
            if isinstance(resps, str):
                resps = ast.literal_eval(resps)
            docs[int(r["doc_id"])] = {
                "correct": float(r["exact_match"]) > 0,
                "text": resps[0][0],
                "prompt": args["gen_args_0"]["arg_0"],
            }
        found.setdefault(task, {}).setdefault(system, {}).update(docs)
    return found


def keep(
    samples: dict[str, dict[str, dict[int, dict[str, Any]]]],
    tasks: list[str] | None,
    systems: list[str] | None,
) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """The tasks and systems asked for (None: all). Systems are paired on the questions
    every one of them answered, so one that ran a single chunk narrows the table to it
    unless it is left out."""
    return {
        task: {s: v for s, v in by_system.items() if systems is None or s in systems}
        for task, by_system in samples.items()
        if tasks is None or task in tasks
    }


def read_runs(*outs: Path) -> dict[tuple[str, str], float]:
    """(task, system) -> seconds: its newest run in each output folder, summed over the
    folders (the chunks of one run)."""
    runs: dict[tuple[str, str], float] = {}
    for out in outs:
        newest: dict[tuple[str, str], float] = {}
        path = out / "runs.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    newest[(r["task"], r["system"])] = float(r["seconds"])
                except (ValueError, TypeError, KeyError):  # blank, or cut off mid-write
                    continue
        for key, seconds in newest.items():
            runs[key] = runs.get(key, 0.0) + seconds
    return runs


def table(
    task: str,
    systems: dict[str, dict[int, dict[str, Any]]],
    sources: list[str],
    runs: dict[tuple[str, str], float],
    ppl: dict[tuple[str, str, int], dict[str, float]],
    against: Sequence[str] = (),
) -> tuple[str, list[dict[str, Any]]]:
    docs = sorted(set.intersection(*(set(d) for d in systems.values())))
    n = len(docs)
    acc = {s: sum(d[i]["correct"] for i in docs) for s, d in systems.items()}
    singles = [s for s in systems if s in sources]
    best = max(singles, key=lambda s: acc[s]) if singles else None
    refs = [r for r in against if r in systems]

    def mcnemar(s: str, ref: str) -> tuple[int, int, float]:
        d, other = systems[s], systems[ref]
        b = sum(d[i]["correct"] and not other[i]["correct"] for i in docs)
        c = sum(not d[i]["correct"] and other[i]["correct"] for i in docs)
        return b, c, mcnemar_exact(b, c)

    lines = [
        f"### {task} ({n} questions answered by every system)",
        "",
        "| system | correct | accuracy | 95% CI | vs best single | McNemar b/c, p | "
        + "".join(f"vs {r}: b/c, p | " for r in refs)
        + "s/answer | cross-model ppl (median) |",
        "|---|--:|--:|---|--:|---|" + "---|" * len(refs) + "--:|--:|",
    ]
    rows = []
    for s, d in sorted(systems.items(), key=lambda kv: (kv[0] not in sources, -acc[kv[0]])):
        lo, hi = wilson(acc[s], n)
        row: dict[str, Any] = {"task": task, "system": s, "n": n, "correct": acc[s]}
        delta = p_text = "-"
        if best is not None and s != best:
            b, c, p = mcnemar(s, best)
            delta = f"{100 * (acc[s] - acc[best]) / max(n, 1):+.1f}"
            p_text = f"{b}/{c}, {p:.3f}"
            row |= {"b": b, "c": c, "p": p}
        elif s == best:
            p_text = "(best single)"
        vs = []
        for r in refs:
            if r == s:
                vs.append("-")
                continue
            rb, rc, rp = mcnemar(s, r)
            vs.append(f"{rb}/{rc}, {rp:.3f}")
            row[f"vs {r}"] = {"b": rb, "c": rc, "p": rp}
        # its seconds cover every question it answered (chunks other systems lack too)
        secs = runs.get((task, s))
        per = f"{secs / len(d):.1f}" if secs and d else "-"
        # a median only over every (non-empty) answer: a part of them could mislead
        wanted = [i for i in docs if d[i]["text"].strip()]
        scored = [ppl[(task, s, i)] for i in wanted if ppl.get((task, s, i))]
        cross = (
            f"{median(math.exp(sum(v.values()) / len(v)) for v in scored):.2f}"
            if scored and len(scored) == len(wanted)
            else "-"
        )
        lines.append(
            f"| {s} | {acc[s]} | {100 * acc[s] / max(n, 1):.1f}% | {100 * lo:.1f}-{100 * hi:.1f} "
            f"| {delta} | {p_text} | " + "".join(f"{v} | " for v in vs) + f"{per} | {cross} |"
        )
        rows.append(row)
    return "\n".join(lines), rows


def read_ppl(cache: Path) -> dict[tuple[str, str, int], dict[str, float]]:
    """The answers' NLLs scored so far (``--ppl`` adds the missing ones)."""
    have: dict[tuple[str, str, int], dict[str, float]] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                have[(r["task"], r["system"], r["doc_id"])] = r["nll"]
    return have


async def score_ppl(
    config_path: str, samples: dict[str, dict[str, dict[int, dict[str, Any]]]], cache: Path
) -> dict[tuple[str, str, int], dict[str, float]]:
    """Each answer's mean token NLL under every source model (cached in ``cache``)."""
    from server.config import load_config
    from server.engines import load_models, shutdown_models
    from tokenizers_align import IncrementalCodec

    have = read_ppl(cache)
    todo = [
        (t, s, i, d)
        for t, systems in samples.items()
        for s, docs in systems.items()
        for i, d in docs.items()
        if (t, s, i) not in have and d["text"].strip()
    ]
    if not todo:
        return have
    config = load_config(config_path)
    models = await load_models(config)
    try:
        with cache.open("a") as sink:
            for k, (t, s, i, d) in enumerate(todo):
                nll: dict[str, float] = {}
                for m in models:
                    prompt = d["prompt"]
                    if chat_task(t):
                        messages = json.loads(prompt) if isinstance(prompt, str) else prompt
                        ids = m.chat_prompt_ids(messages)
                        cand = m.tokenizer.encode(d["text"])
                    else:
                        ids = m.completion_prompt_ids(prompt)
                        cand = IncrementalCodec.after_prompt(m.tokenizer, prompt).encode_next(
                            d["text"]
                        )
                    if not cand:
                        continue
                    state = await m.engine.open(uuid.uuid4().hex, ids)
                    try:
                        (lps,) = await m.engine.score(state, [cand])
                    finally:
                        await m.engine.release(state)
                    nll[m.name] = -sum(lps) / len(lps)
                have[(t, s, i)] = nll
                sink.write(json.dumps({"task": t, "system": s, "doc_id": i, "nll": nll}) + "\n")
                if k % 50 == 0:
                    sink.flush()
                    print(f"perplexity pass: {k + 1}/{len(todo)}", file=sys.stderr, flush=True)
    finally:
        await shutdown_models(models)
    return have


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--out",
        type=lambda s: [Path(x) for x in s.split(",")],
        default=[Path("eval/results")],
        help="eval/run.py's output folder, or several (the chunks of one run), comma-separated",
    )
    ap.add_argument("--config", default="config.yaml", help="source models (names, --ppl)")
    ap.add_argument("--tasks", type=lambda s: s.split(","), help="default: all found")
    ap.add_argument(
        "--systems",
        type=lambda s: s.split(","),
        help="default: all found (a system left out no longer narrows the pairing)",
    )
    ap.add_argument("--ppl", action="store_true", help="score the answers (in-process)")
    ap.add_argument("--markdown", type=Path, help="also write the tables here")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--against",
        type=lambda s: s.split(","),
        default=[],
        help="systems to pair every other with too (McNemar columns), e.g. qwen-sc8",
    )
    args = ap.parse_args()
    from server.config import load_config

    sources = [m.name for m in load_config(args.config).models]
    outs = list(dict.fromkeys(args.out))  # a folder named twice counts once
    samples = keep(read_samples(*outs), args.tasks, args.systems)
    # scores found in any folder; --ppl scores the rest and keeps them in the first one
    ppl = {k: v for out in outs for k, v in read_ppl(out / "ppl.jsonl").items()}
    if args.ppl:
        ppl |= asyncio.run(score_ppl(args.config, samples, outs[0] / "ppl.jsonl"))
    runs = read_runs(*outs)
    parts, rows = [], []
    for task in sorted(samples):
        text, task_rows = table(task, samples[task], sources, runs, ppl, args.against)
        parts.append(text)
        rows += task_rows
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
