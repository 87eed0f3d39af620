"""Fused steps the filters decide are taken without scoring (issue 24, part 0): the same
requests with and without the shortcut give the same texts and winners, against scripted
engines (real tokenizers); the real trio's run is in tests/fusion/engines/
test_llamacpp_engine.py."""

from __future__ import annotations

import math

import pytest

from fusion.loop import Fuser
from fusion.models import SourceModel
from fusion.selection import Hopeless
from fusion.types import FusionOutcome, FusionParams, Prompt, Segment, SelectionPolicy
from tests.conftest import scripted_model
from tests.fusion.test_loop_policies import CountingEngine

CHAT = Prompt(messages=({"role": "user", "content": "Where did the cat sit?"},))
SMOL, GEMMA, QWEN = "smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"
UNSURE = math.log(0.4)  # below the gate's threshold: every step is fused

SCRIPTS = {
    "all differ": {
        SMOL: "The cat sat on the rug by the door.",
        GEMMA: "The cat sat on a sofa in the sun.",
        QWEN: "The cat sat on the mat by the fire.",
    },
    "the weak agree": {
        SMOL: "The cat sat on the rug by the door.",
        GEMMA: "The cat sat on the rug by the door.",
        QWEN: "The cat sat on the mat by the fire.",
    },
    "loops": {
        SMOL: "The cat sat. The cat sat. The cat sat. The cat sat.",
        GEMMA: "The cat sat. The dog ran. The cat sat. The cat ran.",
        QWEN: "The cat sat. The cat sat. The cat sat on the mat.",
    },
}
POLICIES = {
    "the default (gate, weighted, consensus 2)": (
        "cool",
        SelectionPolicy("gate", leader=QWEN, gate_fallback="weighted", min_support=2),
    ),
    "paper's rule with consensus": (
        "cool",
        SelectionPolicy("mean_ppl", leader=QWEN, min_support=2),
    ),
    "leader's veto": (
        "cool",
        SelectionPolicy("weighted", leader=QWEN, min_support=2, leader_margin=0.5),
    ),
    "repetition guard": (
        "cool",
        SelectionPolicy("mean_ppl", repetition_limit=1, repetition_ngram=2),
    ),
    "cool_rerank with consensus": (
        "cool_rerank",
        SelectionPolicy("gate", leader=QWEN, gate_fallback="mean_ppl", min_support=2),
    ),
}


def models(default_adapters, scripts: dict[str, str]) -> list[SourceModel]:
    return [
        scripted_model(name, default_adapters[name], script, CountingEngine, token_logprob=UNSURE)
        for name, script in scripts.items()
    ]


async def answer(
    ms: list[SourceModel], method: str, policy: SelectionPolicy, shortcuts: bool
) -> tuple[list[Segment], FusionOutcome, list[int]]:
    """The segments, the outcome, and the scoring calls the engines made in each step."""
    outcome = FusionOutcome()
    params = FusionParams(method=method, selection=policy, max_tokens=40)  # type: ignore[arg-type]
    fuser = Fuser(ms, shortcuts=shortcuts)
    segments, calls, before = [], [], 0
    async for s in fuser.run(CHAT, params, outcome):
        now = sum(len(m.engine.scored) for m in ms)
        segments.append(s)
        calls.append(now - before)
        before = now
    await fuser.close()
    return segments, outcome, calls


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scripts", SCRIPTS)
async def test_the_shortcut_changes_no_text_nor_winner_and_scores_less(
    default_adapters, scripts, policy
):
    method, selection = POLICIES[policy]
    full_ms = models(default_adapters, SCRIPTS[scripts])
    full, full_out, _ = await answer(full_ms, method, selection, shortcuts=False)
    ms = models(default_adapters, SCRIPTS[scripts])
    short, out, calls = await answer(ms, method, selection, shortcuts=True)
    assert out.text == full_out.text and out.text
    assert [(s.text, s.winner) for s in short] == [(s.text, s.winner) for s in full]
    # a step is either taken as before, or fused before and filtered now
    kinds = {(a.step, b.step) for a, b in zip(full, short)}
    assert kinds <= {("fused", "fused"), ("fused", "filtered"), ("gated", "gated")}
    filtered = [i for i, s in enumerate(short) if s.step == "filtered"]
    if method == "cool":  # (Cool+R's steps are emitted only at its end)
        assert all(calls[i] == 0 for i in filtered)  # no model scored anything
    full_scored = sum(u.scored_tokens for u in full_out.usage.values())
    scored = sum(u.scored_tokens for u in out.usage.values())
    if method == "cool":
        assert scored < full_scored if filtered else scored == full_scored
    else:  # Cool+R emits its reranked answer alone: its steps are not seen here
        assert scored <= full_scored
    for i in filtered:  # the trace: every candidate, the excluded marked, the winner not
        s = short[i]  # (a segment stopped as hopeless is no candidate)
        assert s.candidates and sum(not c.excluded for c in s.candidates) == 1
        won = next(c for c in s.candidates if not c.excluded)
        assert s.winner in won.proposers and won.score is not None


async def test_where_the_others_disagree_the_default_takes_the_leaders_without_scoring(
    default_adapters,
):
    method, selection = POLICIES["the default (gate, weighted, consensus 2)"]
    ms = models(default_adapters, SCRIPTS["all differ"])
    segments, outcome, calls = await answer(ms, method, selection, shortcuts=True)
    assert outcome.text.startswith("The cat sat on the mat")  # (then the weak pair, off
    # their scripts, agree on " off": they may overrule it)
    split = [s for s in segments if s.step == "filtered"]
    won = [next(c for c in s.candidates if not c.excluded) for s in split]
    assert split and all(QWEN in c.proposers for c in won)  # the leader's segment
    assert all(calls[segments.index(s)] == 0 for s in split)


async def test_a_weak_members_hopeless_segment_stops_and_changes_nothing(default_adapters):
    """Under consensus, once one weak member has finished a segment that differs from
    the leader's, the other's stops where its text leaves both: its segment could not
    win nor make another win. Same texts and winners; fewer tokens generated."""
    method, selection = POLICIES["the default (gate, weighted, consensus 2)"]
    full_ms = models(default_adapters, SCRIPTS["all differ"])
    full, full_out, _ = await answer(full_ms, method, selection, shortcuts=False)
    ms = models(default_adapters, SCRIPTS["all differ"])
    short, out, _ = await answer(ms, method, selection, shortcuts=True)
    assert [(s.text, s.winner) for s in short] == [(s.text, s.winner) for s in full]
    weak = (SMOL, GEMMA)
    full_generated = sum(full_out.usage[n].generated_tokens for n in weak)
    generated = sum(out.usage[n].generated_tokens for n in weak)
    assert generated < full_generated
    # some filtered step lists fewer candidates than the same step did in full
    assert any(len(a.candidates) < len(b.candidates) for a, b in zip(short, full))
    # a guard or a negative veto (or sampling) needs every segment: nothing stops there
    guarded = SelectionPolicy("gate", leader=QWEN, min_support=2, repetition_limit=1)
    assert not Hopeless.applies(guarded, greedy=True)
    assert not Hopeless.applies(selection, greedy=False)
    assert Hopeless.applies(selection, greedy=True)


@pytest.mark.parametrize(
    ("text", "leader", "finished", "hopeless"),
    [
        (" The dog", " The cat", {"b": " A bird"}, True),  # left both
        (" The ca", " The cat", {"b": " A bird"}, False),  # may still be the leader's
        (" The dog", " The cat", {"b": " The dog ran"}, False),  # may still be b's
        (" The dog", " The cat", {}, False),  # b still writing: they may agree
        (" The dog", "", {"b": " A bird"}, False),  # the leader wrote nothing: not sure
        (" A bird", " The cat", {"b": ""}, False),  # b wrote nothing (or ended): not sure
        (" The c", " The dog", {"b": " A"}, False),  # the last character may yet change
    ],
)
def test_a_segment_is_hopeless_once_it_has_left_every_finished_one(
    text, leader, finished, hopeless
):
    h = Hopeless(leader, ["a", "b"])
    for name, t in finished.items():
        h.finish(name, t)
    assert h.check("a")(text) is hopeless
    assert h.stopped is hopeless


async def test_where_the_weak_agree_the_step_is_scored(default_adapters):
    method, selection = POLICIES["the default (gate, weighted, consensus 2)"]
    ms = models(default_adapters, SCRIPTS["the weak agree"])
    segments, _, calls = await answer(ms, method, selection, shortcuts=True)
    pair = [
        i
        for i, s in enumerate(segments)
        if len(s.candidates) == 2 and any(len(c.proposers) == 2 for c in s.candidates)
    ]
    assert pair and all(segments[i].step == "fused" and calls[i] == 3 for i in pair)


def test_with_four_members_two_finished_peers_that_agree_keep_every_segment_written():
    # c and d agree on " bird": that segment may win, the step is scored, and b's
    # segment must then be there as without the stop
    h = Hopeless(" cat", ["b", "c", "d"], min_support=2)
    h.finish("c", " bird")
    h.finish("d", " bird")
    assert h.check("b")(" dog") is False
    h3 = Hopeless(" cat", ["b", "c", "d"], min_support=3)  # two are not enough there
    h3.finish("c", " bird")
    h3.finish("d", " bird")
    assert h3.check("b")(" dog") is True


def test_a_grammar_turns_the_stop_off():
    policy = POLICIES["the default (gate, weighted, consensus 2)"][1]
    assert not Hopeless.applies(policy, greedy=True, grammar=True)
