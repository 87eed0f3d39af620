"""The ``gate`` rule's shortcut (GaC's uncertainty gate): the leader proposes first, and
a segment it is confident of is taken without the others proposing or scoring."""

from __future__ import annotations

import dataclasses

from fusion.members import Members
from fusion.models import SourceModel
from fusion.run import Candidate, Run, Step
from fusion.steps import score_all
from fusion.types import ScoredCandidate, perplexity


def gate_leader(run: Run) -> SourceModel | None:
    """The leader whose confident segments skip fusion, when the ``gate`` rule applies."""
    policy = run.params.selection
    if policy.rule != "gate" or len(run.models) < 2:
        return None
    return next((m for m in run.models if m.name == policy.leader), None)


async def gated(members: Members, run: Run, win: Candidate) -> Step:
    """The confident leader's segment, taken without the others proposing. Cool+R
    still has them score it (about the cost of committing it), as its final rerank
    needs every model's log-probs of the fused text."""
    run.clock.lap("generate")
    p = win.proposals[0]
    if run.params.method == "cool_rerank":
        scored, logprobs = await score_all(members, run, [win])
        run.clock.lap("score")
        for name, lps in logprobs.items():
            run.fused_logprobs[name].extend(lps[0])
        seen = scored[0]
    else:
        own = list(p.own_logprobs or ())
        run.fused_logprobs[p.model].extend(own)
        ppl = perplexity(own, run.params.ppl_mode)
        seen = ScoredCandidate(win.text, (p.model,), win.ended, ((p.model, ppl),), ppl)
    score = dict(seen.perplexities)[p.model]
    return Step(win, (dataclasses.replace(seen, score=score),), "gated", "gate")
