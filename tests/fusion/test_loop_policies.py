"""Selection policies inside the fusion loop, against scripted engines (real tokenizers).

Two weak models (smollm2, gemma3) want "rug", the leader (qwen2.5) wants "mat": the
paper's equal votes let the weak pair win; ``leader`` and ``gate`` let the leader write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from fusion.engine import GREEDY, Generation, Sampling, StopCheck
from fusion.loop import Fuser
from fusion.models import SourceModel
from fusion.types import FusionOutcome, FusionParams, Prompt, Segment, SelectionPolicy
from tests.conftest import scripted_model
from tests.fusion.fake_engine import FakeState, ScriptedEngine

CHAT = Prompt(messages=({"role": "user", "content": "Where did the cat sit?"},))
WEAK, LEADER = ("smollm2-135m", "gemma3-270m"), "qwen2.5-0.5b"
RUG, MAT = "The cat sat on the rug.", "The cat sat on the mat."


class CountingEngine(ScriptedEngine):
    """The scripted engine, counting its generate calls, with a settable confidence."""

    def __init__(self, *args: object, token_logprob: float | None = None, **kw: object):
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.generations = 0
        self.token_logprob = token_logprob

    async def generate(
        self,
        state: FakeState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling = GREEDY,
    ) -> Generation:
        self.generations += 1
        gen = await super().generate(state, max_tokens, stop_ids, should_stop, sampling)
        if self.token_logprob is None:
            return gen
        return Generation(gen.ids, tuple(self.token_logprob for _ in gen.ids), gen.stopped_on)


def models(default_adapters, leader_logprob: float | None = None) -> list[SourceModel]:
    return [
        scripted_model(
            name,
            default_adapters[name],
            MAT if name == LEADER else RUG,
            CountingEngine,
            token_logprob=leader_logprob if name == LEADER else None,
        )
        for name in (*WEAK, LEADER)
    ]


async def run(
    ms: Sequence[SourceModel], policy: SelectionPolicy, method: str = "cool"
) -> tuple[list[Segment], FusionOutcome]:
    outcome = FusionOutcome()
    params = FusionParams(method=method, selection=policy)  # type: ignore[arg-type]
    segments = [s async for s in Fuser(ms).run(CHAT, params, outcome)]
    return segments, outcome


async def test_under_the_papers_rule_two_weak_models_outvote_the_leader(default_adapters):
    segments, outcome = await run(models(default_adapters), SelectionPolicy())
    assert outcome.text == RUG
    assert all(s.step == "fused" and s.rule == "mean_ppl" for s in segments)
    split = next(s for s in segments if len(s.candidates) > 1)
    for c in split.candidates:  # the score shown is the paper's mean
        assert c.score == c.mean_perplexity


async def test_leader_rule_lets_the_leader_decide(default_adapters):
    segments, outcome = await run(
        models(default_adapters), SelectionPolicy("leader", leader=LEADER)
    )
    assert outcome.text == MAT
    split = next(s for s in segments if len(s.candidates) > 1)
    by_text = {c.text: c for c in split.candidates}
    assert by_text[" mat."].score == dict(by_text[" mat."].perplexities)[LEADER]
    assert split.winner == LEADER and split.rule == "leader"


async def test_a_confident_leader_writes_alone_under_the_gate(default_adapters):
    ms = models(default_adapters)  # scripted generation: p = e^-0.05 = 0.95 per token
    segments, outcome = await run(ms, SelectionPolicy("gate", leader=LEADER))
    assert outcome.text == MAT
    assert segments and all(s.step == "gated" and s.rule == "gate" for s in segments)
    assert all(s.winner == LEADER and len(s.candidates) == 1 for s in segments)
    for weak in ms[:2]:
        assert weak.engine.generations == 0 and weak.engine.scored == []
        assert weak.engine.commits  # they follow the text
    assert outcome.usage[WEAK[0]].generated_tokens == 0


async def test_an_unsure_leader_is_fused_with_the_fallback_rule(default_adapters):
    unsure = math.log(0.4)  # below the 0.5 threshold on every token
    by_mean = SelectionPolicy("gate", leader=LEADER, gate_fallback="mean_ppl")
    segments, outcome = await run(models(default_adapters, unsure), by_mean)
    assert outcome.text == RUG  # the fallback is the paper's rule: the weak pair wins
    assert all(s.step == "fused" and s.rule == "mean_ppl" for s in segments)
    by_leader = SelectionPolicy("gate", leader=LEADER, gate_fallback="leader")
    ms = models(default_adapters, unsure)
    segments, outcome = await run(ms, by_leader)
    assert outcome.text == MAT
    assert all(s.step == "fused" for s in segments)
    # the leader proposed once per step, not again when the others joined
    assert ms[2].engine.generations == len(segments)


async def test_gate_threshold_decides_which_steps_are_gated(default_adapters):
    leader_lp = math.log(0.7)
    low = SelectionPolicy("gate", leader=LEADER, gate_threshold=0.6, gate_fallback="leader")
    high = SelectionPolicy("gate", leader=LEADER, gate_threshold=0.8, gate_fallback="leader")
    gated, _ = await run(models(default_adapters, leader_lp), low)
    fused, _ = await run(models(default_adapters, leader_lp), high)
    assert {s.step for s in gated} == {"gated"} and {s.step for s in fused} == {"fused"}


@pytest.mark.parametrize("min_support", [1, 2])
async def test_gate_in_cool_rerank_still_scores_the_fused_text_under_every_model(
    default_adapters, min_support
):
    ms = models(default_adapters)
    policy = SelectionPolicy("gate", leader=LEADER, min_support=min_support)
    segments, _ = await run(ms, policy, "cool_rerank")
    fused = next(c for c in segments[0].candidates if c.proposers == ("fusion",))
    assert fused.text == MAT and not any(c.excluded for c in segments[0].candidates)
    assert all(math.isfinite(p) for _, p in fused.perplexities)
    assert {n for n, _ in fused.perplexities} == {*WEAK, LEADER}


async def test_packllm_scores_the_prompt_once_in_scratch_states_it_releases(default_adapters):
    ms = models(default_adapters)
    segments, _ = await run(ms, SelectionPolicy("packllm"))
    assert {s.rule for s in segments if len(s.candidates) > 1} == {"packllm"}
    for m in ms:
        scratch = [st for st in m.engine.states if st.request_id.endswith("-prompt")]
        assert len(scratch) == 1 and scratch[0].released and len(scratch[0].prompt) == 1
        assert all(st.released for st in m.engine.states)


async def test_rerank_uses_the_policy_too(default_adapters):
    segments, outcome = await run(
        models(default_adapters), SelectionPolicy("leader", leader=LEADER), "rerank"
    )
    assert outcome.text == MAT and segments[0].rule == "leader"
    paper, _ = await run(models(default_adapters), SelectionPolicy(), "rerank")
    assert paper[0].text == RUG


async def test_repetition_guard_steers_away_from_a_loop(make_model):
    loop, way_out = "x y z w x y z w x y z w", "x y z w x y z w and so on."

    def pair() -> list[SourceModel]:
        return [make_model("smollm2-135m", loop), make_model("qwen2.5-0.5b", way_out)]

    _, free = await run(pair(), SelectionPolicy())
    assert free.text.startswith(loop) and "and" not in free.text  # a tie: the first wins
    guard = SelectionPolicy(repetition_ngram=4, repetition_limit=1)
    segments, guarded = await run(pair(), guard)
    assert guarded.text.startswith("x y z w x y z w and")
    split = next(s for s in segments if any(c.excluded for c in s.candidates))
    assert {c.text for c in split.candidates if c.excluded} == {" x"}


async def test_repetition_guard_keeps_a_loop_every_model_wants(make_model):
    loop = "one two three four one two three four"
    ms = [make_model("smollm2-135m", loop), make_model("qwen2.5-0.5b", loop)]
    segments, outcome = await run(ms, SelectionPolicy(repetition_limit=1))
    assert outcome.text == loop
    assert not any(c.excluded for s in segments for c in s.candidates)


SOFA = "The cat sat on the sofa."


def three_answers(default_adapters) -> list[SourceModel]:
    """Three different whole answers: no two models propose the same one."""
    ms = models(default_adapters)
    ms[1].engine.script = SOFA  # type: ignore[attr-defined]
    return ms


@pytest.mark.parametrize("method", ["rerank", "cool_rerank"])
async def test_whole_answers_are_not_held_to_consensus(default_adapters, method):
    """Regression (issue 21, item 4): consensus counted each whole answer (and Cool+R's
    fused one) as proposed by one model, so under ``min_support: 2`` every answer but the
    leader's was excluded and Rerank returned the leader's answer whatever the scores."""
    free, _ = await run(three_answers(default_adapters), SelectionPolicy(leader=LEADER), method)
    policy = SelectionPolicy(leader=LEADER, min_support=2)
    segments, outcome = await run(three_answers(default_adapters), policy, method)
    final = segments[-1]
    assert not any(c.excluded for c in final.candidates)
    assert outcome.text == free[-1].text == RUG  # ties go to the first model: not the leader
    if method == "cool_rerank":
        assert any(c.proposers == ("fusion",) for c in final.candidates)
