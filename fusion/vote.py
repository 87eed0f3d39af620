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
from fusion.run import (
    Candidate,
    FusionError,
    Run,
    content_tokens,
    group,
    model_sampling,
    prompt_ids,
)
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
    stopped: str | None = None
    for m in run.models:
        run.codecs[m.name] = members.codec(run, m)
    for m in draw_order(run):  # each member draws once at most
        left = v.budget - len(samples)
        if left <= 0:
            break
        if m not in run.models:  # dropped while another member sampled
            continue
        answers = await _draw(members, run, m, min(v.k, left), grammar_for)
        # off the event loop: a request's own regex may take its time limit per answer
        keys = await asyncio.to_thread(read_keys, key_of, [p.text for p in answers])
        # an answer cut at max_tokens has not said its answer yet (its last number is
        # often a step's): it does not vote (DeepConf drops such traces, arXiv 2508.15260)
        cap = run.params.max_tokens
        keys = [None if p.generated >= cap and not p.ended else k for p, k in zip(answers, keys)]
        drawn = [Sample(p, k) for p, k in zip(answers, keys, strict=True)]
        samples += drawn
        # one answer agrees with itself: it says nothing about the member's confidence
        if len(drawn) >= 2 and agreement([s.key for s in drawn]) >= v.threshold:
            stopped = f"agreed: {m.name}"
            break
    if stopped is None:
        stopped = "budget" if len(samples) >= v.budget else "every member sampled"
    run.clock.lap("generate")
    key, tally, tie = elect(samples, dict(run.params.selection.weights))
    chosen = [s for s in samples if key is None or s.key == key]
    voters = {s.proposal.model for s in samples}
    scored, best = await _lowest_perplexity(members, run, chosen, voters)
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


def read_keys(key_of: Callable[[str], str | None], texts: Sequence[str]) -> list[str | None]:
    return [read_key(key_of, t) for t in texts]


def read_key(key_of: Callable[[str], str | None], text: str) -> str | None:
    """The extractor's key of ``text``; an extractor that fails on it finds none."""
    try:
        return key_of(text)
    except Exception:  # an odd answer must not fail the request (no key: no vote)
        return None


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
    samples: Sequence[Sample], weights: dict[str, float]
) -> tuple[str | None, list[tuple[str, float]], str | None]:
    """The winning key, every key's weighted votes (most first, ties in order of first
    appearance) and how a tie was broken (None: no tie).

    A tie between keys goes to the key of the member whose own samples agree most (its
    majority key, among the tied ones), then to the heavier member, then to the member
    that sampled first."""
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
    """``n`` whole answers of ``m``, sampled together as far as its engine holds them (its
    open states and KV cells); each state is released once its answer is written."""
    ids = prompt_ids(run.prompt, m)
    run.outcome.usage[m.name].prompt_tokens = len(ids)
    at_once = _at_once(m, len(ids) + run.params.max_tokens, n)
    if n > 1 and getattr(m.engine, "shares_prefixes", False):
        await _read_prompt(members, run, m, ids)
    drawn: list[Proposal] = []
    while len(drawn) < n and m in run.models:
        count = min(at_once, n - len(drawn))
        drawn += await _draw_some(
            members, run, m, ids, range(len(drawn), len(drawn) + count), grammar_for
        )
    return drawn


def _at_once(m: SourceModel, per_state: int, n: int) -> int:
    """How many of ``n`` states of ``per_state`` cells ``m``'s engine can hold at once (all
    of them, when it sets no limit): a draw that waited for more would wait for ever."""
    most = n
    slots = getattr(m.engine, "max_requests", None)
    if slots:
        most = min(most, slots)
    cells = getattr(m.engine, "kv_cells", None)
    if cells:
        most = min(most, cells // min(per_state, cells))
    return max(1, most)


async def _draw_some(
    members: Members,
    run: Run,
    m: SourceModel,
    ids: list[int],
    which: range,
    grammar_for: SampleGrammar,
) -> list[Proposal]:
    """Samples ``which`` of ``m``: their states opened one after the other (no other
    request's draw on ``m`` opens meanwhile), then every answer written at once."""
    params = run.params
    states: list[StateHandle] = []
    rid = uuid.uuid4().hex

    async def open_all(x: SourceModel) -> None:
        if x is not m:
            return
        async with members.opening(m.name):  # waiting in line: no deadline
            for i in which:
                # a whole answer, no branch or look-ahead beyond it
                states.append(await m.engine.open(f"{rid}-{m.name}-s{i}", ids, params.max_tokens))

    async def sample_all(x: SourceModel) -> list[Proposal]:
        if x is not m:
            return []
        grammars = [await grammar_for(m) for _ in which]
        return list(
            await asyncio.gather(
                *(
                    propose(
                        m,
                        state,
                        members.codec(run, m),
                        [m.tokenizer],
                        cap=params.max_tokens,
                        until_boundary=False,
                        user_stops=params.stop,
                        sampling=dataclasses.replace(sample_sampling(run, m, i), constraint=g),
                        grammar=run.answer_grammar,
                    )
                    for i, state, g in zip(which, states, grammars, strict=True)
                )
            )
        )

    prompt = len(ids)
    try:
        await members.each(run, open_all, bounded_by_step=False)
        got = await members.each(
            run,
            sample_all,
            # answers written together: a usual time per number of them at once
            kind=f"samples{len(which)}",
            units=lambda x: prompt + len(which) * params.max_tokens if x is m else 0,
            done=lambda x, ps: prompt + sum(max(1, p.generated) for p in ps) if x is m else 0,
        )
    finally:
        # released before the next turn opens its states (their prompts stay in a prefix
        # cache); the request's end waits for them too, should this be cancelled
        releases = [members.start_release(m.name, state) for state in states]
        run.releases += releases
        if releases:
            await asyncio.shield(asyncio.gather(*releases))
    drawn = got.get(m.name, [])
    for p in drawn:
        run.outcome.usage[m.name].generated_tokens += p.generated
        run.clock.add_align(p.align_seconds)
    return drawn


def sample_sampling(run: Run, m: SourceModel, i: int) -> Sampling:
    """Sample ``i`` of ``m``: the request's sampling, at the method's temperature when
    the request's is greedy, with a seed of its own (the request's or else the method's,
    plus the member's index and the sample's times the members; none: random)."""
    v = run.params.vote
    base = model_sampling(run, m)  # a sampled request's seed carries the member's index
    offset = list(run.outcome.usage).index(m.name)
    if base.greedy:  # (which model_sampling leaves without it)
        base = dataclasses.replace(base, temperature=v.temperature)
        if base.seed is not None:
            base = dataclasses.replace(base, seed=base.seed + offset)
    if base.seed is None and v.seed is not None:
        base = dataclasses.replace(base, seed=v.seed + offset)
    if base.seed is None:
        return base
    return dataclasses.replace(base, seed=base.seed + i * len(run.outcome.usage))


async def _read_prompt(members: Members, run: Run, m: SourceModel, ids: list[int]) -> None:
    """Read the prompt once in a state released at once: an engine that keeps released
    contexts (a prefix cache) then gives each sample's state the prompt for one token.
    Opening waits in line; the read itself has its deadline, as any call."""
    state: StateHandle | None = None

    async def open_one(x: SourceModel) -> None:
        nonlocal state
        if x is m:
            state = await m.engine.open(f"{uuid.uuid4().hex}-{m.name}-prompt", ids, 1)

    async def read(x: SourceModel) -> None:
        if x is m and state is not None:
            await m.engine.generate(state, 1, frozenset(), lambda _: False)

    try:
        await members.each(run, open_one, bounded_by_step=False)
        await members.each(run, read, kind="prompt", units=lambda x: len(ids) if x is m else 0)
    finally:
        if state is not None:
            await asyncio.shield(members.start_release(m.name, state))


async def _lowest_perplexity(
    members: Members, run: Run, chosen: Sequence[Sample], voters: set[str]
) -> tuple[tuple[ScoredCandidate, ...], Candidate | None]:
    """The distinct texts of ``chosen`` scored under the members that sampled, and the
    one with the lowest mean perplexity. One text is taken without scoring, and so is
    the first when scoring fails: the vote has its answer already."""
    candidates = group(s.proposal for s in chosen)
    if not candidates:
        return (), None
    if len(candidates) == 1:
        return (_unscored(candidates[0]),), candidates[0]
    run.models = [m for m in run.models if m.name in voters]
    try:
        await members.open(run, whole=True)
        scored, _ = await score_all(members, run, candidates)
    except FusionError:  # every member that sampled failed to score
        return tuple(_unscored(c) for c in candidates), candidates[0]
    best = min(range(len(scored)), key=lambda i: scored[i].mean_perplexity)
    return tuple(scored), candidates[best]


def _unscored(c: Candidate) -> ScoredCandidate:
    return ScoredCandidate(c.text, tuple(p.model for p in c.proposals), c.ended, (), math.nan)


def _tokens(run: Run, s: Sample) -> int:
    p = s.proposal
    return len(p.own_ids) - (1 if p.ended else 0) if p.own_ids is not None else p.generated
