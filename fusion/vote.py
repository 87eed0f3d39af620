"""Method ``vote``: answer-level fusion by sampling and a weighted majority.

The members write whole answers, the leader first: ``k`` samples at once (one state per
sample, so the engine decodes them together), at the request's temperature or the
method's. An extractor (fusion/answers.py) reads each answer as a key. When one member's
samples agree at or above the threshold the sampling stops (ModelSwitch, arXiv
2504.00762); otherwise the next member samples, until the budget is spent. The key with
the most weighted votes wins (the selection's static weights, 1 by default); a tie goes
to the key of the most self-consistent member, then to the member with the larger
weight (SLM-MUX, arXiv 2510.05077). The answer returned is the winning key's sample with
the lowest mean perplexity under the members that voted (scored only when the winning
key has more than one distinct text). Like Rerank it yields one segment, at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fusion.answers import extractor
from fusion.engine import Sampling, StateHandle
from fusion.grammar import MemberGrammar
from fusion.members import Members
from fusion.models import SourceModel
from fusion.proposals import Proposal, propose
from fusion.rerank import finish_answer
from fusion.run import Candidate, Run, content_tokens, group, model_sampling, prompt_ids
from fusion.steps import score_all
from fusion.types import FinishReason, ScoredCandidate, Segment, VoteSample, VoteTally

# A fresh matcher of the request's grammar for one more sample of a member (None: no
# grammar, or an engine that cannot constrain), from the Fuser.
SampleGrammar = Callable[[SourceModel], Awaitable[MemberGrammar | None]]


@dataclass(frozen=True)
class Sample:
    """One sampled answer and the key the extractor read in it."""

    proposal: Proposal
    key: str | None


async def vote(members: Members, run: Run, grammar_for: SampleGrammar) -> Segment:
    """Sample, vote, and return the chosen answer as one segment."""
    run.clock.start()
    context = run.context_tokens
    v = run.params.vote
    assert v.answer is not None, "vote needs an answer extractor (checked at the edge)"
    key_of = extractor(v.answer)
    samples: list[Sample] = []
    stopped = "budget"
    for m in run.models:
        run.outcome.usage[m.name].prompt_tokens = len(prompt_ids(run.prompt, m))
        run.codecs[m.name] = members.codec(run, m)
    for m in draw_order(run):  # each member draws once at most
        left = v.budget - len(samples)
        if left <= 0:
            break
        if m not in run.models:  # dropped while another member sampled
            continue
        drawn = await _draw(members, run, m, min(v.k, left), grammar_for)
        samples += [Sample(p, key_of(p.text)) for p in drawn]
        if drawn and agreement([key_of(p.text) for p in drawn]) >= v.threshold:
            stopped = f"agreed: {m.name}"
            break
    run.clock.lap("generate")
    weights = dict(run.params.selection.weights)
    key, tally, tie = elect(samples, weights, [m.name for m in run.models])
    chosen = [s for s in samples if key is None or s.key == key]
    scored, best = await _lowest_perplexity(members, run, chosen)
    run.clock.lap("score")
    trace = VoteTally(
        tuple(
            VoteSample(s.proposal.model, s.proposal.text, s.key, s.proposal.ended, _tokens(run, s))
            for s in samples
        ),
        tuple(tally),
        key,
        stopped,
        tie,
    )
    if best is None:  # no sample at all (every member wrote nothing)
        return finish_answer(run, "", None, 0, "stop", (), context, vote=trace)
    p = best.proposals[0]
    finish: FinishReason = "length" if p.hit_cap and not p.ended else "stop"
    tokens = content_tokens(run, p)
    return finish_answer(run, best.text, p.model, tokens, finish, scored, context, vote=trace)


def draw_order(run: Run) -> list[SourceModel]:
    """The leader first, then the others by weight (largest first), then server order."""
    policy = run.params.selection
    weights = dict(policy.weights)
    order = sorted(
        run.models,
        key=lambda m: (m.name != policy.leader, -weights.get(m.name, 1.0)),
    )
    return order


def agreement(keys: Sequence[str | None]) -> float:
    """The share of ``keys`` that the most frequent key holds (an answer without a key
    agrees with none; 0 for none at all)."""
    counts = Counter(k for k in keys if k is not None)
    return max(counts.values()) / len(keys) if counts and keys else 0.0


def elect(
    samples: Sequence[Sample], weights: dict[str, float], order: Sequence[str]
) -> tuple[str | None, list[tuple[str, float]], str | None]:
    """The winning key, every key's weighted votes (most first, ties in order of first
    appearance) and how a tie was broken (None: no tie).

    A tie between keys goes to the key of the member whose own samples agree most (its
    majority key, among the tied ones), then to the heavier member, then to the member
    that sampled first (``order`` for members that did not sample)."""
    votes: dict[str, float] = {}
    for s in samples:
        if s.key is not None:
            votes[s.key] = votes.get(s.key, 0.0) + weights.get(s.proposal.model, 1.0)
    tally = sorted(votes.items(), key=lambda kv: -kv[1])
    if not tally:
        return None, [], None
    top = tally[0][1]
    tied = [k for k, w in tally if math.isclose(w, top, rel_tol=1e-9)]
    if len(tied) == 1:
        return tied[0], tally, None
    by_model: dict[str, list[str | None]] = {}
    for s in samples:
        by_model.setdefault(s.proposal.model, []).append(s.key)
    first = list(by_model)
    ranked = sorted(
        by_model,
        key=lambda n: (
            -agreement(by_model[n]),
            -weights.get(n, 1.0),
            first.index(n),
        ),
    )
    for name in ranked:
        own = Counter(k for k in by_model[name] if k is not None)
        mine = [k for k in tied if own.get(k)]
        if mine:
            # its most frequent among the tied keys; among equals, the one it drew first
            pick = max(mine, key=lambda k: (own[k], -by_model[name].index(k)))
            share = agreement(by_model[name])
            return pick, tally, f"{name}, the most self-consistent member ({share:.0%})"
    return tied[0], tally, "first key drawn"  # unreachable: every tied key has a voter


async def _draw(
    members: Members, run: Run, m: SourceModel, n: int, grammar_for: SampleGrammar
) -> list[Proposal]:
    """``n`` whole answers of ``m``, sampled at once; its states are released after."""
    params = run.params
    states: list[StateHandle] = []
    rid = uuid.uuid4().hex
    ids = prompt_ids(run.prompt, m)
    prompt = len(ids)

    async def open_all(x: SourceModel) -> list[StateHandle]:
        if x is not m:
            return []
        async with members.opening(m.name):
            if n > 1 and getattr(m.engine, "shares_prefixes", False):
                read = _read_prompt(m, f"{rid}-{m.name}-prime", ids)
                await asyncio.wait_for(read, m.step_timeout)
            for i in range(n):
                # a whole answer, no branch or look-ahead beyond it
                states.append(await m.engine.open(f"{rid}-{m.name}-s{i}", ids, params.max_tokens))
        return states

    async def sample_all(x: SourceModel) -> list[Proposal]:
        if x is not m:
            return []
        sampling = [sample_sampling(run, m, i) for i in range(n)]
        grammars = [await grammar_for(m) for _ in range(n)]
        return list(
            await asyncio.gather(
                *(
                    propose(
                        m,
                        states[i],
                        members.codec(run, m),
                        [m.tokenizer],
                        cap=params.max_tokens,
                        until_boundary=False,
                        user_stops=params.stop,
                        sampling=dataclasses.replace(sampling[i], constraint=grammars[i]),
                        grammar=run.answer_grammar,
                    )
                    for i in range(n)
                )
            )
        )

    try:
        await members.each(run, open_all, bounded_by_step=False)
        got = await members.each(
            run,
            sample_all,
            kind="answer",
            units=lambda x: prompt + params.max_tokens if x is m else 0,
            done=lambda x, ps: prompt + max([1, *(p.generated for p in ps)]) if x is m else 0,
        )
    finally:
        for s in states:  # their prompts stay in a prefix cache for the next draw
            run.releases.append(members.start_release(m.name, s))
    drawn = got.get(m.name, [])
    for p in drawn:
        run.outcome.usage[m.name].generated_tokens += p.generated
        run.clock.add_align(p.align_seconds)
    return drawn


def sample_sampling(run: Run, m: SourceModel, i: int) -> Sampling:
    """Sample ``i`` of ``m``: the request's sampling, at the method's temperature when
    the request's is greedy, with a seed of its own (from the request's or the method's;
    none: random)."""
    v = run.params.vote
    base = model_sampling(run, m)  # seeds offset by the member's index
    if base.greedy:
        base = dataclasses.replace(base, temperature=v.temperature)
    if base.seed is None and v.seed is not None:
        offset = list(run.outcome.usage).index(m.name)
        base = dataclasses.replace(base, seed=v.seed + offset)
    if base.seed is None:
        return base
    return dataclasses.replace(base, seed=base.seed + i * len(run.outcome.usage))


async def _read_prompt(m: SourceModel, rid: str, ids: list[int]) -> None:
    """Read the prompt once in a state released at once: an engine that keeps released
    contexts (a prefix cache) then gives each sample's state the prompt for one token."""
    state = await m.engine.open(rid, ids, 1)
    try:
        await m.engine.generate(state, 1, frozenset(), lambda _: False)
    finally:
        await m.engine.release(state)


async def _lowest_perplexity(
    members: Members, run: Run, chosen: Sequence[Sample]
) -> tuple[tuple[ScoredCandidate, ...], Candidate | None]:
    """The distinct texts of ``chosen`` scored under the members that sampled, and the
    one with the lowest mean perplexity (one text: taken without scoring)."""
    candidates = group(s.proposal for s in chosen)
    if not candidates:
        return (), None
    if len(candidates) == 1:
        c = candidates[0]
        return (_unscored(c),), c
    voters = {s.proposal.model for s in chosen}
    run.models = [m for m in run.models if m.name in voters]
    await members.open(run, whole=True)
    scored, _ = await score_all(members, run, candidates)
    best = min(range(len(scored)), key=lambda i: scored[i].mean_perplexity)
    return tuple(scored), candidates[best]


def _unscored(c: Candidate) -> ScoredCandidate:
    return ScoredCandidate(c.text, tuple(p.model for p in c.proposals), c.ended, (), math.nan)


def _tokens(run: Run, s: Sample) -> int:
    p = s.proposal
    return len(p.own_ids) - (1 if p.ended else 0) if p.own_ids is not None else p.generated
