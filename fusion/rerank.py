"""Rerank and Cool+R (Cool-Fusion §2.4): every model writes a whole answer, every model
scores every answer, and the policy chooses one. Cool+R adds the answer the Cool pass
wrote as one more candidate, judged by the log-probs every model gave the segments it
chose."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fusion.members import Members
from fusion.models import SourceModel
from fusion.proposals import Proposal, propose
from fusion.run import Run, content_tokens, model_sampling
from fusion.selection import Scored
from fusion.steps import choose, proposed, score_all, scored_inputs, with_scores
from fusion.stops import StopStringTracker
from fusion.types import FinishReason, Rule, ScoredCandidate, Segment, VoteTally, perplexity

FUSED = "fusion"  # the proposer name of Cool+R's fused answer in traces


@dataclass(frozen=True)
class FusedAnswer:
    """Cool+R's extra candidate: the answer the Cool pass wrote, judged by the log-probs
    every model gave the segments it chose, and what that answer already counted."""

    text: str
    logprobs: tuple[tuple[str, tuple[float, ...]], ...]  # (scoring model, log-probs)
    tokens: int
    finish: FinishReason
    ended: bool  # its last segment ended the answer (an end token or a turn marker)

    @classmethod
    def of(cls, run: Run) -> FusedAnswer:
        """What the Cool pass of ``run`` wrote."""
        return cls(
            text=run.outcome.text,
            logprobs=tuple((n, tuple(v)) for n, v in run.fused_logprobs.items()),
            tokens=run.outcome.completion_tokens,
            finish=run.outcome.finish_reason or "length",
            ended=run.ended,
        )


async def rerank(members: Members, run: Run, fused: FusedAnswer | None) -> Segment:
    """The chosen whole answer as one segment (Cool+R: after fresh states are opened)."""
    run.clock.start()
    context = run.context_tokens
    params = run.params
    if fused is not None:
        await members.open(run, whole=True)

    async def one(m: SourceModel) -> Proposal:
        return await propose(
            m,
            run.states[m.name],
            run.codecs[m.name],
            [m.tokenizer],
            cap=params.max_tokens,
            until_boundary=False,
            user_stops=params.stop,
            sampling=model_sampling(run, m),
            grammar=run.answer_grammar,
        )

    def prefill(m: SourceModel) -> int:
        return run.outcome.usage[m.name].prompt_tokens

    answers = await members.each(
        run,
        one,
        kind="answer",
        units=lambda m: prefill(m) + params.max_tokens,
        done=lambda m, p: prefill(m) + max(1, p.generated),
    )
    candidates = proposed(run, answers)
    run.clock.lap("generate")
    scored, logprobs = await score_all(members, run, candidates)
    run.clock.lap("score")
    inputs = scored_inputs(scored, logprobs)
    if fused is not None:
        scored.append(_score_fused(run, fused))
        lps = dict(fused.logprobs)
        mine = tuple((m.name, tuple(lps.get(m.name, ()))) for m in run.models)
        inputs.append(Scored(fused.text, (FUSED,), fused.ended, mine))
    if not scored:  # every model stopped before writing anything
        return finish_answer(run, "", None, 0, "stop", (), context)
    chosen = await choose(members, run, inputs, answer="", whole=True)
    best = chosen.index
    scored = list(with_scores(scored, chosen))
    win = scored[best]
    if best < len(candidates):
        lead = candidates[best].proposals[0]
        tokens = content_tokens(run, lead)
        finish: FinishReason = "length" if lead.hit_cap and not lead.ended else "stop"
        rule = chosen.rule
        return finish_answer(run, win.text, lead.model, tokens, finish, scored, context, rule)
    assert fused is not None
    return finish_answer(
        run, fused.text, None, fused.tokens, fused.finish, scored, context, chosen.rule
    )


def finish_answer(
    run: Run,
    text: str,
    winner: str | None,
    tokens: int,
    finish: FinishReason,
    scored: Sequence[ScoredCandidate],
    context: int,
    rule: Rule = "mean_ppl",
    vote: VoteTally | None = None,
) -> Segment:
    """A whole answer as one segment (Rerank's, Cool+R's and vote's; ``winner`` None:
    Cool+R's fused text, or no answer)."""
    tracker = StopStringTracker(run.params.stop)
    text = tracker.feed(text) + tracker.flush()
    if tracker.stopped:
        finish = "stop"
    if run.prompt.is_chat:
        text = text.lstrip()
    run.outcome.text, run.outcome.finish_reason = text, finish
    run.outcome.completion_tokens = tokens
    run.outcome.segments = 1
    if winner is not None:
        run.outcome.usage[winner].segments_won += 1
    return Segment(
        0,
        text,
        winner or FUSED,
        tuple(scored),
        tokens,
        finish,
        timings=run.close_step(),
        context_tokens=context,
        rule=rule,
        vote=vote,
    )


def _score_fused(run: Run, fused: FusedAnswer) -> ScoredCandidate:
    lps = dict(fused.logprobs)
    ppl = tuple((m.name, perplexity(lps.get(m.name, ()), run.params.ppl_mode)) for m in run.models)
    mean = sum(p for _, p in ppl) / len(ppl)
    return ScoredCandidate(fused.text, (FUSED,), fused.ended, ppl, mean)
