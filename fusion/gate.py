"""Steps that skip scoring because scores cannot change the winner: the ``gate`` rule's
(GaC's uncertainty gate: the leader proposes first, and a segment it is confident of is
taken without the others proposing or scoring), and a fused step whose filters leave one
candidate that can win (``selection.settled``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from fusion.members import Members
from fusion.models import SourceModel
from fusion.run import Candidate, Run, Step
from fusion.selection import rule_for, settled
from fusion.steps import score_all
from fusion.types import ScoredCandidate, StepKind, perplexity


def gate_leader(run: Run) -> SourceModel | None:
    """The leader whose confident segments skip fusion, when the ``gate`` rule applies."""
    policy = run.params.selection
    if policy.rule != "gate" or len(run.models) < 2:
        return None
    return next((m for m in run.models if m.name == policy.leader), None)


async def gated(members: Members, run: Run, win: Candidate) -> Step:
    """The confident leader's segment, taken without the others proposing."""
    run.clock.lap("generate")
    return await unscored(members, run, [win], 0, (False,), "gated")


def filtered(
    run: Run, candidates: Sequence[Candidate], stopped: bool = False
) -> tuple[int, tuple[bool, ...]] | None:
    """The winner of a fused step when the filters alone decide it (``settled``);
    ``stopped``: a hopeless segment was stopped, so a lone candidate is the leader's."""
    if len(candidates) < 2 and not (stopped and candidates):
        return None  # one candidate: scored as ever (its trace shows every model's view)
    return settled(
        [(c.text, tuple(p.model for p in c.proposals)) for c in candidates],
        run.params.selection,
        run.outcome.text,
    )


async def unscored(
    members: Members,
    run: Run,
    candidates: Sequence[Candidate],
    index: int,
    excluded: tuple[bool, ...],
    kind: StepKind,
) -> Step:
    """``candidates[index]`` taken without the models scoring the candidates. Cool+R
    still has them score the winner (about the cost of committing it), as its final
    rerank needs every model's log-probs of the fused text. The trace shows each
    candidate's perplexity under its proposers (known from their generation)."""
    win = candidates[index]
    mode = run.params.ppl_mode

    def seen(c: Candidate, out: bool) -> ScoredCandidate:
        ppl = tuple(
            (p.model, perplexity(list(p.own_logprobs), mode))
            for p in c.proposals
            if p.own_logprobs is not None
        )
        mean = sum(v for _, v in ppl) / len(ppl) if ppl else math.nan
        proposers = tuple(p.model for p in c.proposals)
        cut = any(p.cut for p in c.proposals)
        return ScoredCandidate(c.text, proposers, c.ended, ppl, mean, excluded=out, cut=cut)

    trace = [seen(c, out) for c, out in zip(candidates, excluded)]
    if run.params.method == "cool_rerank":
        scored, logprobs = await score_all(members, run, [win])
        run.clock.lap("score")
        for name, lps in logprobs.items():
            run.fused_logprobs[name].extend(lps[0])
        trace[index] = dataclasses.replace(scored[0], cut=trace[index].cut)
    else:
        for p in win.proposals:
            if p.own_logprobs is not None:
                run.fused_logprobs[p.model].extend(p.own_logprobs)
    lead = win.proposals[0]
    score = dict(trace[index].perplexities).get(lead.model, trace[index].mean_perplexity)
    trace[index] = dataclasses.replace(trace[index], score=score)
    # the rule that would have judged the scores (they could not change the winner)
    rule = rule_for(run.params.selection, {m.name for m in run.models})
    return Step(win, tuple(trace), kind, "gate" if kind == "gated" else rule)
