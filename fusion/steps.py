"""The paper's three steps over every model of a run (Cool-Fusion §2.2-2.3): each model
proposes its candidate, every model scores every candidate, the selection policy chooses;
then every model commits the winner. PackLLM's per-request weights are measured here,
once, before the run opens its states."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from collections.abc import Sequence

from fusion.engine import StateHandle, TopLogprobs
from fusion.grammar import RENORMALISE_TOP, renormalised
from fusion.members import Members
from fusion.models import SourceModel
from fusion.proposals import Proposal, propose
from fusion.run import Candidate, Run, group, model_sampling, own_logprobs, prompt_ids
from fusion.selection import Hopeless, Scored, Selection, nll, packllm_weights, select
from fusion.types import ScoredCandidate, perplexity


async def propose_all(
    members: Members,
    run: Run,
    cap: int,
    given: dict[str, Proposal] | None = None,
    only: SourceModel | None = None,
    hopeless: Hopeless | None = None,
) -> list[Candidate]:
    """Every model's candidate; models in ``given`` have proposed already, and with
    ``only`` that model alone proposes (the gate's leader). With ``hopeless``, a model
    whose segment can no longer matter stops writing it (no candidate)."""
    shortest = run.params.method == "cool_shortest"
    adapters = [m.tokenizer for m in run.models]
    known = given or {}

    async def one(m: SourceModel) -> Proposal | None:
        if m.name in known:
            return known[m.name]
        if only is not None and m is not only:
            return None
        p = await propose(
            m,
            run.states[m.name],
            run.codecs[m.name],
            [m.tokenizer] if shortest else adapters,
            cap=cap,
            until_boundary=True,
            sampling=model_sampling(run, m),
            written=run.written,
            grammar=run.answer_grammar,
            alone=len(run.models) == 1,
            abandon=hopeless.check(m.name) if hopeless is not None else None,
        )
        if hopeless is not None:
            hopeless.finish(m.name, p.text)
        return p

    # a model's first generation in the run also reads its prompt (prefill): its own
    # kind of call, sized by the prompt too; models that proposed already, or were not
    # asked (the gate's others), do no work
    fresh = {m.name: run.outcome.usage[m.name].generated_tokens == 0 for m in run.models}
    prefill = {
        m.name: run.outcome.usage[m.name].prompt_tokens if fresh[m.name] else 0 for m in run.models
    }

    def units(m: SourceModel) -> int:
        if m.name in known or (only is not None and m is not only):
            return 0
        return prefill[m.name] + cap

    def done(m: SourceModel, p: Proposal | None) -> int:
        if p is None or m.name in known:
            return 0
        return prefill[m.name] + max(1, p.generated - p.reused)

    got = await members.each(
        run,
        one,
        kind=lambda m: "first" if fresh[m.name] else "generate",
        units=units,
        done=done,
        # a first generation takes at least what generating its tokens takes, however
        # short its prompt (a rate learned on long prompts is mostly reading)
        at_least=lambda m: ("generate", cap) if fresh[m.name] else None,
    )
    made = {n: p for n, p in got.items() if p is not None and n not in known}
    proposed(run, made)
    return group(p for m in run.models if (p := got.get(m.name)) is not None)


def proposed(run: Run, proposals: dict[str, Proposal]) -> list[Candidate]:
    """Count new proposals in the usage and timings; the distinct candidates among them."""
    for name, p in proposals.items():
        run.outcome.usage[name].generated_tokens += p.generated - p.reused
        run.clock.add_align(p.align_seconds)
        if p.cut and not p.text and not p.ended:
            run.cut_to_nothing.append(name)
    return group(proposals[m.name] for m in run.models if m.name in proposals)


async def score_all(
    members: Members, run: Run, candidates: list[Candidate]
) -> tuple[list[ScoredCandidate], dict[str, list[list[float]]]]:
    """Every candidate's perplexity under every model, and the log-probs behind them."""
    chat = run.prompt.is_chat

    def ids_for(m: SourceModel, c: Candidate) -> list[int]:
        ids = run.encode(m.name, c.text) if c.text else []
        end = m.end_id(chat)
        return [*ids, end] if c.ended and end is not None else ids

    grammar_scored = run.params.grammar is not None and run.params.grammar_scores != "raw"

    async def renormalised_scores(m: SourceModel) -> list[list[float]]:
        grammar, state = run.member_grammars[m.name], run.states[m.name]
        if grammar.lost:  # its matcher stopped where the answer left it: raw scores
            return await raw_scores(m)
        out = []
        for c in candidates:
            ids = ids_for(m, c)
            lps, tops = (
                ([], []) if not ids else await m.engine.score_top(state, ids, RENORMALISE_TOP)
            )
            run.outcome.usage[m.name].scored_tokens += len(ids)
            out.append(renormalised(list(lps), list(tops), ids, grammar))
        return out

    async def one(m: SourceModel) -> list[list[float]]:
        if grammar_scored:
            return await renormalised_scores(m)
        return await raw_scores(m)

    async def raw_scores(m: SourceModel) -> list[list[float]]:
        own = [own_logprobs(c, m.name) for c in candidates]
        todo = [i for i, lp in enumerate(own) if lp is None]
        batch = [ids_for(m, candidates[i]) for i in todo]
        scores = await m.engine.score(run.states[m.name], batch) if batch else []
        run.outcome.usage[m.name].scored_tokens += sum(len(b) for b in batch)
        got = dict(zip(todo, scores))
        return [got[i] if lp is None else list(lp) for i, lp in enumerate(own)]

    def units(m: SourceModel) -> int:  # what it scores (its own candidate it knows)
        if grammar_scored:
            return sum(len(ids_for(m, c)) for c in candidates)
        return sum(len(ids_for(m, c)) for c in candidates if own_logprobs(c, m.name) is None)

    per_model = await members.each(run, one, kind="score", units=units)
    scored: list[ScoredCandidate] = []
    for i, c in enumerate(candidates):
        ppl = tuple(
            (name, perplexity(lps[i], run.params.ppl_mode)) for name, lps in per_model.items()
        )
        mean = sum(p for _, p in ppl) / len(ppl)
        proposers = tuple(p.model for p in c.proposals)
        cut = any(p.cut for p in c.proposals)
        scored.append(ScoredCandidate(c.text, proposers, c.ended, ppl, mean, cut=cut))
    return scored, per_model


async def choose(
    members: Members, run: Run, inputs: list[Scored], answer: str, whole: bool = False
) -> Selection:
    """The step's (or, ``whole``, the final answer's) choice under the run's policy.
    Consensus counts models that proposed the same segment; whole answers (Rerank's,
    and Cool+R's fused one, proposed by no single model) are never held to it, or the
    leader's would be the only one allowed."""
    policy = run.params.selection
    if whole:
        policy = dataclasses.replace(policy, min_support=1)
    return select(
        inputs, policy, run.params.ppl_mode, answer=answer, prompt_weights=run.prompt_weights
    )


async def prompt_weights(members: Members, run: Run) -> None:
    """PackLLM's per-request weights from each model's mean token NLL of the prompt
    (its expertise measure)."""
    scores = await score_prompts(members, run)
    prompt_nll = {name: nll(lps) if lps else math.inf for name, (_, lps, _) in scores.items()}
    run.prompt_weights = packllm_weights(prompt_nll, run.params.selection.packllm_temperature)


PromptScores = tuple[list[int], list[float], list[TopLogprobs]]


async def score_prompts(members: Members, run: Run, top: int = 0) -> dict[str, PromptScores]:
    """Every model's prompt tokens, the log-probs of all but the first, and with ``top``
    the most likely tokens at each of those positions (``score_top``). In every engine, in
    the server's order (as any open), a scratch state on the prompt's first token scores
    the rest, then is released; the run holds no other state meanwhile, so waiting for
    room cannot wait on itself."""
    scratch: dict[str, StateHandle] = {}

    async def open_one(m: SourceModel) -> list[int]:
        ids = prompt_ids(run.prompt, m)
        if len(ids) >= 2:
            rid = f"{uuid.uuid4().hex}-{m.name}-prompt"
            scratch[m.name] = await m.engine.open(rid, ids[:1], room=len(ids))
        return ids

    async def score_one(m: SourceModel) -> PromptScores:
        ids = prompt[m.name]
        state = scratch.pop(m.name, None)
        if state is None:
            return ids, [], []
        try:
            if top:
                lps, tops = await m.engine.score_top(state, ids[1:], top)
            else:
                lps, tops = (await m.engine.score(state, [ids[1:]]))[0], []
        finally:
            await asyncio.shield(members.start_release(m.name, state))
        run.outcome.usage[m.name].scored_tokens += len(ids) - 1
        return ids, lps, tops

    try:
        prompt = await members.open_in_order(run, open_one)
        return await members.each(
            run, score_one, kind="prompt", units=lambda m: len(prompt[m.name])
        )
    finally:
        for name, state in scratch.items():  # a model dropped or a request cancelled
            run.releases.append(members.start_release(name, state))


async def commit_all(members: Members, run: Run, win: Candidate) -> None:
    """Append the winner to every model's state, in its own tokens where it wrote them."""
    by_model = {p.model: p for p in win.proposals}

    async def one(m: SourceModel) -> None:
        own = by_model.get(m.name)
        codec = run.codecs[m.name]
        if own is not None and own.own_ids is not None:
            ids = list(own.own_ids)
        else:
            ids = run.encode(m.name, win.text)
        await m.engine.commit(run.states[m.name], ids)
        codec.commit(win.text)
        grammar = run.member_grammars.get(m.name)
        if grammar is not None:
            grammar.commit(ids)
        if m is run.models[0]:
            run.context_tokens += len(ids)

    def units(m: SourceModel) -> int:
        own = by_model.get(m.name)
        if own is not None and own.own_ids is not None:
            return len(own.own_ids)
        return len(run.encode(m.name, win.text)) if win.text else 1

    await members.each(run, one, kind="commit", units=units)
    if run.answer_grammar is not None:
        run.answer_grammar.commit(win.text)
    run.wrote(win.text)
    run.encoded.clear()  # every codec's tail moved on


def scored_inputs(
    scored: Sequence[ScoredCandidate], logprobs: dict[str, list[list[float]]]
) -> list[Scored]:
    """The selection rules' view of the candidates: every scoring model's log-probs."""
    return [
        Scored(c.text, c.proposers, c.ended, tuple((n, tuple(lp[i])) for n, lp in logprobs.items()))
        for i, c in enumerate(scored)
    ]


def with_scores(
    scored: Sequence[ScoredCandidate], chosen: Selection
) -> tuple[ScoredCandidate, ...]:
    """The candidates as the trace shows them: with the rule's score and exclusion."""
    return tuple(
        dataclasses.replace(c, score=chosen.scores[i], excluded=chosen.excluded[i])
        for i, c in enumerate(scored)
    )
