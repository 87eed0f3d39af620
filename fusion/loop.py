"""The Cool-Fusion loop: propose, score, select, commit (paper §2), and Rerank / Cool+R.

``Fuser.run`` is an async generator of ``Segment``s. For ``cool`` / ``cool_shortest`` it
yields one per selected segment as soon as it is chosen; ``rerank``, ``cool_rerank`` and
``vote`` can only choose at the end and yield the whole answer as one segment. A model whose
engine fails is dropped from the request (recorded in the usage) while others remain.

Where each part lives: the request's state in ``fusion.run``, the models' lifecycle in a
request (open, run on all, drop, release) in ``fusion.members``, the three steps in
``fusion.steps``, the gate's shortcut in ``fusion.gate``, Rerank and Cool+R in
``fusion.rerank``, answer-level voting in ``fusion.vote``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from fusion.gate import filtered, gate_leader, gated, unscored
from fusion.grammar import AnswerGrammar, MemberGrammar, Vocabularies
from fusion.health import FaultListener, FaultPolicy
from fusion.logprobs import prompt_logprobs, segment_logprobs
from fusion.members import Members
from fusion.models import SourceModel
from fusion.proposals import Proposal
from fusion.rerank import FusedAnswer, rerank
from fusion.run import FusionError, Run, Step, content_tokens, prompt_ids
from fusion.selection import Hopeless, gate_confident
from fusion.steps import (
    choose,
    commit_all,
    prompt_weights,
    propose_all,
    score_all,
    scored_inputs,
    with_scores,
)
from fusion.stops import StopStringTracker
from fusion.types import FinishReason, FusionOutcome, FusionParams, ModelUsage, Prompt, Segment
from fusion.vote import vote

__all__ = ["Fuser", "FusionError"]


class Fuser:
    """Runs fused generation over a fixed set of source models."""

    def __init__(
        self,
        models: Sequence[SourceModel],
        window_pieces: int = 4,
        faults: FaultPolicy | None = None,
        listener: FaultListener | None = None,
        shortcuts: bool = True,
    ) -> None:
        """``shortcuts=False`` scores every fused step's candidates even where the filters
        alone decide the winner, and lets every segment be written out (same answers,
        more work: for tests that show it); ``stop_hopeless`` (on) is the second part
        alone."""
        self.members = Members(models, window_pieces, faults, listener)
        self.shortcuts = shortcuts
        self.stop_hopeless = True
        self.models = self.members.models
        self.vocabularies = Vocabularies()  # per member, for grammars

    def select(self, names: Sequence[str] | None) -> list[SourceModel]:
        return self.members.select(names)

    async def close(self) -> None:
        """Stop background work (the probes of ejected models)."""
        await self.members.close()

    async def run(
        self, prompt: Prompt, params: FusionParams, outcome: FusionOutcome | None = None
    ) -> AsyncGenerator[Segment, None]:
        run = Run(params, prompt, self.select(params.models), outcome=outcome or FusionOutcome())
        run.outcome.usage = {m.name: ModelUsage() for m in run.models}
        self.members.admit(run)  # without the ejected models
        try:
            if params.selection.step_rule == "packllm" and params.method != "vote":
                # before the run holds any engine state: scoring the prompt opens a
                # scratch state in every engine, which may have to wait for room
                await prompt_weights(self.members, run)
            if params.prompt_logprobs is not None:  # completions' echo, a model alone
                run.outcome.prompt_logprobs = await prompt_logprobs(self.members, run)
            if params.max_tokens == 0:  # the prompt alone (echo): nothing to generate
                for m in run.models:
                    run.outcome.usage[m.name].prompt_tokens = len(prompt_ids(run.prompt, m))
                run.outcome.finish_reason = "length"
                return
            await self._grammar(run)
            if params.method == "vote":  # its samples open states of their own
                yield await vote(self.members, run, lambda m: self._member_grammar(run, m))
                return
            method = params.method
            if method == "cool_rerank" and len(run.models) < 2:
                # the others ejected: reranking the one member's answers would write its
                # answer a second time to choose nothing
                method = "cool"
            await self.members.open(run, whole=method == "rerank")
            if method in ("cool", "cool_shortest"):
                async with contextlib.aclosing(self._cool(run, emit=True)) as segments:
                    async for seg in segments:
                        yield seg
            elif method == "rerank":
                yield await rerank(self.members, run, fused=None)
            else:
                async with contextlib.aclosing(self._cool(run, emit=False)) as segments:
                    async for _ in segments:
                        pass
                fused = FusedAnswer.of(run)
                await self._grammar(run)  # whole answers start the grammar afresh
                yield await rerank(self.members, run, fused=fused)
        finally:
            await self.members.release(run)

    async def _grammar(self, run: Run) -> None:
        """Start the request's grammar: over the answer's bytes, and in the tokens of each
        member whose engine constrains its sampling (the others' candidates are cut)."""
        spec = run.params.grammar
        if spec is None:
            return
        run.answer_grammar = AnswerGrammar(spec)
        run.member_grammars = {}
        for m in run.models:
            # every member's: a constraint where its engine honours one, and for
            # renormalised scoring in any case
            if getattr(m.engine, "constrains", False) or run.params.grammar_scores != "raw":
                grammar = await self._member_grammar(run, m, always=True)
                assert grammar is not None
                run.member_grammars[m.name] = grammar

    async def _member_grammar(
        self, run: Run, m: SourceModel, always: bool = False
    ) -> MemberGrammar | None:
        """A fresh matcher of the request's grammar in ``m``'s tokens (None: no grammar,
        or, unless ``always``, an engine that cannot constrain its sampling)."""
        spec = run.params.grammar
        if spec is None or not (always or getattr(m.engine, "constrains", False)):
            return None
        vocab = await asyncio.to_thread(
            self.vocabularies.get, m.name, m.tokenizer.tokenizer.to_str, m.stop_ids
        )
        return MemberGrammar(vocab, spec)

    async def _cool(self, run: Run, emit: bool) -> AsyncGenerator[Segment, None]:
        """Step after step until an end, a stop string or the token budget; each winner
        is committed to every model and yielded (``emit``) at once."""
        params = run.params
        tracker = StopStringTracker(params.stop)
        index = 0
        strip_leading = run.prompt.is_chat
        while True:
            run.clock.start()
            run.cut_to_nothing.clear()
            context = run.context_tokens
            budget = params.max_tokens - run.outcome.completion_tokens
            if budget <= 0:
                run.outcome.finish_reason = "length"
                break
            cap = min(params.max_segment_tokens, budget)
            step = await self._step(run, cap)
            if step is None:
                run.outcome.finish_reason = "stop"
                break
            win = step.win
            lead = win.proposals[0]
            tokens = content_tokens(run, lead)
            logprobs = None
            if params.logprobs is not None:  # before the commit: scored after the context
                logprobs = await segment_logprobs(self.members, run, win)
            run.outcome.completion_tokens += tokens
            run.outcome.usage[lead.model].segments_won += 1
            finish: FinishReason | None = None
            run.ended = win.ended
            if win.ended:
                finish = "stop"
            elif lead.hit_cap and cap == budget:
                finish = "length"
            else:
                await commit_all(self.members, run, win)
                run.clock.lap("commit")
            piece = tracker.feed(win.text)
            if tracker.stopped:
                finish = "stop"
            if finish is not None:
                piece += tracker.flush()
            if strip_leading:
                stripped = piece.lstrip()
                strip_leading = not stripped
                piece = stripped
            run.outcome.text += piece
            run.outcome.segments += 1
            timings = run.close_step()
            if emit:
                yield Segment(
                    index=index,
                    text=piece,
                    winner=lead.model,
                    candidates=step.scored,
                    tokens=tokens,
                    finish_reason=finish,
                    timings=timings,
                    context_tokens=context,
                    step=step.kind,
                    rule=step.rule,
                    cut_to_nothing=tuple(run.cut_to_nothing),
                    logprobs=logprobs,
                )
            index += 1
            if finish is not None:
                run.outcome.finish_reason = finish
                break

    async def _step(self, run: Run, cap: int) -> Step | None:
        """Propose, score and select one segment (None: no model has anything to add).
        Under the ``gate`` rule the leader proposes first and may decide alone."""
        members = self.members
        given: dict[str, Proposal] = {}
        leader = gate_leader(run)
        if leader is not None:
            own = await propose_all(members, run, cap, only=leader)
            p = own[0].proposals[0] if own else None
            threshold = run.params.selection.gate_threshold
            if p is not None and gate_confident(p.own_logprobs, threshold):
                return await gated(members, run, own[0])
            given = {p.model: p} if p is not None else {}
        hopeless = None
        policy = run.params.selection
        greedy, grammar = run.params.sampling.greedy, run.params.grammar is not None
        stop = self.shortcuts and self.stop_hopeless
        if stop and given and Hopeless.applies(policy, greedy, grammar):
            others = [m.name for m in run.models if m.name not in given]
            hopeless = Hopeless(next(iter(given.values())).text, others, policy.min_support)
        # 1. every model proposes its segment
        candidates = await propose_all(members, run, cap, given, hopeless=hopeless)
        run.clock.lap("generate")
        if not candidates:
            return None
        stopped = hopeless is not None and hopeless.stopped
        decided = filtered(run, candidates, stopped) if self.shortcuts else None
        if decided is not None:  # no score could change the winner
            return await unscored(members, run, candidates, *decided, "filtered")
        # 2. every model scores every candidate
        scored, logprobs = await score_all(members, run, candidates)
        # 3. the policy chooses (the paper's: the lowest mean perplexity)
        chosen = await choose(members, run, scored_inputs(scored, logprobs), run.outcome.text)
        run.clock.lap("score")
        for name, lps in logprobs.items():
            run.fused_logprobs[name].extend(lps[chosen.index])
        return Step(candidates[chosen.index], with_scores(scored, chosen), "fused", chosen.rule)
