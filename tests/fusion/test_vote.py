"""Method vote against scripted engines that sample listed answers (the engine boundary):
stopping, the weighted majority, its tie-breaks, the answer chosen among the winning
key's samples, seeds and temperature, and the states it opens."""

from __future__ import annotations

import pytest

from fusion.answers import last_number
from fusion.loop import Fuser
from fusion.proposals import Proposal
from fusion.types import FusionOutcome, FusionParams, Prompt, Segment, SelectionPolicy, VoteParams
from fusion.vote import Sample, agreement, elect, read_key

CHAT = Prompt(messages=({"role": "user", "content": "What is 6 times 7?"},))
LEAD, MID, LAST = "qwen2.5-0.5b", "smollm2-135m", "gemma3-270m"


def trio(make_model, lead: list[str], mid: list[str], last: list[str], script: str = "x"):
    """The trio in server order (smollm2, gemma3, qwen), each sampling its listed answers."""
    return [
        make_model(MID, script, answers=mid),
        make_model(LAST, script, answers=last),
        make_model(LEAD, script, answers=lead),
    ]


def params(**vote: object) -> FusionParams:
    selection = vote.pop("selection", SelectionPolicy(leader=LEAD))
    return FusionParams(
        method="vote",
        max_tokens=64,
        selection=selection,  # type: ignore[arg-type]
        vote=VoteParams(**{"answer": "last_number", "k": 4, "budget": 8, "seed": 0, **vote}),  # type: ignore[arg-type]
    )


async def run(fuser: Fuser, p: FusionParams, prompt: Prompt = CHAT):
    outcome = FusionOutcome()
    segments: list[Segment] = [s async for s in fuser.run(prompt, p, outcome)]
    return segments, outcome


def drawn(models) -> dict[str, int]:
    return {m.name: len(m.engine.sampled) for m in models}


async def test_the_leader_alone_samples_when_its_answers_agree(make_model):
    models = trio(make_model, ["It is 42."] * 4, ["It is 7."] * 4, ["It is 8."] * 4)
    segments, outcome = await run(Fuser(models), params())
    assert outcome.text == "It is 42."
    assert drawn(models) == {MID: 0, LAST: 0, LEAD: 4}
    vote = segments[0].vote
    assert vote is not None and vote.stopped == f"agreed: {LEAD}" and vote.key == "42"
    assert [s.model for s in vote.samples] == [LEAD] * 4
    assert dict(vote.tally) == {"42": 4.0}
    assert segments[0].winner == LEAD
    for m in models:  # every state it opened was released, including the others' none
        assert all(s.released for s in m.engine.states)


async def test_the_next_member_samples_while_the_budget_lasts_when_the_leader_disagrees(make_model):
    lead = ["1", "2", "3", "4"]
    models = trio(make_model, lead, ["5", "6", "7", "8"], ["9"] * 4)
    segments, _ = await run(Fuser(models), params())
    # the budget (8) is spent by the leader and the next member in server order
    assert drawn(models) == {MID: 4, LAST: 0, LEAD: 4}
    assert segments[0].vote is not None and segments[0].vote.stopped == "budget"


async def test_a_heavier_member_samples_before_a_lighter_one(make_model):
    models = trio(make_model, ["1", "2", "3", "4"], ["5", "6", "7", "8"], ["9"] * 4)
    weights = ((LAST, 2.0),)
    await run(Fuser(models), params(selection=SelectionPolicy(leader=LEAD, weights=weights)))
    assert drawn(models) == {MID: 0, LAST: 4, LEAD: 4}


async def test_a_member_that_agrees_with_itself_ends_the_sampling(make_model):
    models = trio(make_model, ["1", "2", "3", "4"], ["5", "5", "5", "8"], ["9"] * 4)
    segments, outcome = await run(Fuser(models), params(budget=12))
    assert drawn(models) == {MID: 4, LAST: 0, LEAD: 4}
    vote = segments[0].vote
    assert vote is not None and vote.stopped == f"agreed: {MID}"
    assert vote.key == "5" and outcome.text == "5"


@pytest.mark.parametrize(
    ("lead_weight", "key", "tie"),
    [(2.0, "7", False), (3.0, "7", True), (4.0, "5", False)],
)
async def test_the_weighted_majority_wins_and_a_tie_goes_to_the_most_self_consistent_member(
    make_model, lead_weight, key, tie
):
    # leader: 5 5 7 9 (agrees 50%); smollm2: 7 7 7 1 (75%, which ends the sampling)
    models = trio(make_model, ["5", "5", "7", "9"], ["7", "7", "7", "1"], ["2"] * 4)
    weights = ((LEAD, lead_weight),)
    p = params(selection=SelectionPolicy(leader=LEAD, weights=weights), budget=12)
    segments, outcome = await run(Fuser(models), p)
    vote = segments[0].vote
    assert vote is not None and vote.key == key and outcome.text == key
    tally = dict(vote.tally)
    assert tally["5"] == 2 * lead_weight and tally["7"] == lead_weight + 3
    assert (vote.tie_break is not None) == tie
    if tie:
        assert vote.tie_break.startswith(MID)  # 75% against the leader's 50%


def sample(model: str, key: str | None) -> Sample:
    return Sample(Proposal(model, key or "?", True, None, None, 1, False), key)


def test_a_tie_goes_to_the_more_self_consistent_member_whatever_its_weight():
    # A (heavier): 3 3 5 6, agrees 50%; B: 4 4 4 9, agrees 75%; 3 and 4 tie at 3 votes
    samples = [*(sample("A", k) for k in "3356"), *(sample("B", k) for k in "4449")]
    key, tally, tie = elect(samples, {"A": 1.5})
    assert dict(tally) == {"3": 3.0, "4": 3.0, "5": 1.5, "6": 1.5, "9": 1.0}
    assert key == "4" and tie is not None and tie.startswith("B")
    # a third member agreeing with itself fully decides a tie between 3 and 4
    c = [sample("C", "3"), sample("C", "3")]
    samples = [sample("A", "3"), sample("A", "4"), *(sample("B", k) for k in "4443"), *c]
    key, tally, tie = elect(samples, {})
    assert dict(tally) == {"3": 4.0, "4": 4.0}
    assert key == "3" and tie is not None and tie.startswith("C")


def test_without_a_tie_the_weighted_majority_wins_and_no_tie_break_is_named():
    samples = [*(sample("A", k) for k in "3356"), *(sample("B", k) for k in "4449")]
    assert elect(samples, {"A": 2.0})[::2] == ("3", None)
    assert elect(samples, {"A": 1.0})[::2] == ("4", None)
    assert elect([sample("A", None)], {}) == (None, [], None)


def test_between_equally_self_consistent_members_a_tie_goes_to_the_heavier_then_the_first():
    # A: 3 3 4 6, B: 4 4 3 8 (both 50%); 3 and 4 tie whenever A and B weigh the same
    samples = [*(sample("A", k) for k in "3346"), *(sample("B", k) for k in "4438")]
    key, tally, tie = elect(samples, {})
    assert dict(tally)["3"] == dict(tally)["4"] == 3.0
    assert key == "3" and tie is not None and tie.startswith("A")  # A drew first
    c = [sample("C", "4"), sample("C", "3")]  # C, heavier: its votes keep the tie
    key, tally, tie = elect([*samples, *c], {"C": 2.0})
    assert dict(tally)["3"] == dict(tally)["4"] == 5.0
    assert key == "4" and tie is not None and tie.startswith("C")  # 50% too, heavier


async def test_the_winning_key_s_sample_with_the_lowest_fused_perplexity_is_the_answer(
    make_model,
):
    # two wordings of 42 from the leader; every engine's script is the second one
    script = "The answer is 42."
    lead = ["So 42.", "The answer is 42.", "So 42.", "It is 9."]
    models = trio(make_model, lead, ["1", "2", "3", "4"], ["9"] * 4, script=script)
    segments, outcome = await run(Fuser(models), params(budget=4, threshold=0.5))
    assert outcome.text == script
    seg = segments[0]
    assert {c.text for c in seg.candidates} == {"So 42.", script}
    # scored by the members that sampled (the leader alone here), no one else
    assert all(dict(c.perplexities).keys() == {LEAD} for c in seg.candidates)
    assert not models[0].engine.scored and not models[1].engine.scored


async def test_one_text_for_the_winning_key_is_taken_without_scoring(make_model):
    models = trio(make_model, ["It is 42."] * 3 + ["9"], ["1"] * 4, ["2"] * 4)
    segments, outcome = await run(Fuser(models), params(budget=4))
    assert outcome.text == "It is 42."
    assert not any(m.engine.scored for m in models)
    assert segments[0].vote is not None and segments[0].vote.key == "42"


async def test_answers_without_a_key_do_not_vote_but_count_against_agreement(make_model):
    models = trio(make_model, ["no idea", "no idea", "no idea", "41"], ["41"] * 4, ["2"] * 4)
    segments, outcome = await run(Fuser(models), params())
    vote = segments[0].vote
    assert vote is not None and drawn(models)[MID] == 4  # 1 of 4 keyed: not agreed
    assert dict(vote.tally) == {"41": 5.0} and outcome.text == "41"
    assert [s.key for s in vote.samples][:4] == [None, None, None, "41"]


async def test_no_key_at_all_returns_the_lowest_perplexity_answer(make_model):
    script = "I cannot say."
    models = trio(make_model, ["No.", script, "No.", "No."], ["Hm."] * 4, ["Eh."] * 4, script)
    segments, outcome = await run(Fuser(models), params(budget=4))
    assert segments[0].vote is not None and segments[0].vote.key is None
    assert outcome.text == script


async def test_samples_run_at_the_method_s_temperature_each_with_its_own_seed(make_model):
    models = trio(make_model, ["1", "2", "3", "4"], ["5", "6", "7", "8"], ["9"] * 4)
    await run(Fuser(models), params(temperature=0.9, seed=100))
    seeds = [s.seed for m in models for s in m.engine.sampled]
    assert len(seeds) == 8 and len(set(seeds)) == 8
    assert all(s.temperature == 0.9 for m in models for s in m.engine.sampled)


async def test_a_request_s_own_temperature_and_seed_are_kept(make_model):
    from fusion.engine import Sampling

    models = trio(make_model, ["1"] * 4, ["5"] * 4, ["9"] * 4)
    p = params()
    p = FusionParams(**{**p.__dict__, "sampling": Sampling(temperature=0.3, seed=7)})
    await run(Fuser(models), p)
    lead = models[2].engine.sampled
    assert [s.temperature for s in lead] == [0.3] * 4
    assert len({s.seed for s in lead}) == 4


async def test_a_member_that_fails_while_sampling_is_dropped_and_the_others_vote(make_model):
    models = [
        make_model(MID, "x", answers=["5"] * 4),
        make_model(LAST, "x", answers=["9"] * 4),
        make_model(LEAD, "x", answers=["1"], fail_at_call=1),
    ]
    segments, outcome = await run(Fuser(models), params())
    assert outcome.usage[LEAD].dropped and outcome.text == "5"
    assert segments[0].vote is not None and segments[0].vote.stopped == f"agreed: {MID}"


@pytest.mark.parametrize(
    ("keys", "share"),
    [([], 0.0), ([None, None], 0.0), (["a", "a", None, "b"], 0.5), (["a"] * 3, 1.0)],
)
def test_agreement_is_the_most_frequent_key_s_share_of_every_answer(keys, share):
    assert agreement(keys) == share


async def test_a_single_sample_never_ends_the_sampling_by_agreeing_with_itself(make_model):
    models = trio(make_model, ["1"], ["2"], ["3"])
    segments, _ = await run(Fuser(models), params(k=1, budget=8))
    assert drawn(models) == {MID: 1, LAST: 1, LEAD: 1}
    assert segments[0].vote is not None and segments[0].vote.stopped == "every member sampled"


async def test_a_draw_larger_than_the_engine_holds_at_once_is_taken_in_turns(make_model):
    models = trio(make_model, ["4", "4", "4", "5", "4", "6"], ["1"] * 4, ["2"] * 4)
    lead = models[2].engine
    lead.max_requests = 2  # open states at once
    _, outcome = await run(Fuser(models), params(k=6, budget=6))
    assert drawn(models)[LEAD] == 6 and outcome.text == "4"
    # never more than two of its states open at once, each released after its turn
    opened = [st for st in lead.states]
    assert len(opened) >= 6 and all(st.released for st in opened)
    assert lead.most_open <= 2


async def test_kv_cells_limit_how_many_samples_are_open_at_once(make_model):
    from fusion.vote import _at_once

    m = make_model(LEAD, "x")
    assert _at_once(m, 100, 8) == 8  # no limits known
    m.engine.kv_cells = 350
    assert _at_once(m, 100, 8) == 3
    m.engine.kv_cells = 50  # one state alone always fits (the engine caps it)
    assert _at_once(m, 100, 8) == 1
    m.engine.max_requests = 2
    m.engine.kv_cells = 10_000
    assert _at_once(m, 100, 8) == 2


async def test_a_request_cancelled_while_sampling_releases_every_state(make_model):
    import asyncio

    models = trio(make_model, ["1", "2", "3", "4"], ["5"] * 4, ["6"] * 4)
    for m in models:
        m.engine.delay = 0.05
    task = asyncio.ensure_future(run(Fuser(models), params()))
    await asyncio.sleep(0.12)  # inside the leader's draw
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)  # releases run on their own
    lead = models[2].engine
    assert lead.states and all(st.released for st in lead.states)
    assert all(st.released for m in models for st in m.engine.states)


async def test_when_scoring_the_winning_texts_fails_the_vote_still_answers(make_model):
    lead = ["So 42.", "The answer is 42.", "So 42.", "It is 9."]
    models = trio(make_model, lead, ["1"] * 4, ["2"] * 4, script="The answer is 42.")
    lead_engine = models[2].engine

    async def broken(*_a, **_k):
        from fusion.engine import EngineError

        raise EngineError("scoring broke")

    lead_engine.score = broken  # type: ignore[method-assign]
    segments, outcome = await run(Fuser(models), params(budget=4, threshold=0.5))
    assert last_number(outcome.text) == "42"
    assert segments[0].vote is not None and segments[0].vote.key == "42"


def test_an_extractor_that_fails_on_an_answer_reads_no_key_there():
    def boom(text: str) -> str | None:
        raise OverflowError(text)

    assert read_key(boom, "x") is None


async def test_a_greedy_request_s_seed_still_gives_each_member_and_sample_its_own(make_model):
    from fusion.engine import Sampling

    models = trio(make_model, ["1", "2", "3", "4"], ["5", "6", "7", "8"], ["9"] * 4)
    p = params(budget=12)
    p = FusionParams(**{**p.__dict__, "sampling": Sampling(temperature=0.0, seed=7)})
    await run(Fuser(models), p)
    seeds = [s.seed for m in models for s in m.engine.sampled]
    assert len(seeds) == 12 and len(set(seeds)) == 12


async def test_an_answer_cut_at_max_tokens_does_not_vote(make_model):
    # the leader's answers run past 6 tokens: all cut, none votes; smollm2's end in time
    long = "Step 1. Step 2. Step 3. Step 4. Step 5. Step 6."
    models = trio(make_model, [long] * 4, ["It is 7.", "7", "So 7.", "9"], ["2"] * 4)
    p = FusionParams(**{**params().__dict__, "max_tokens": 6})
    segments, outcome = await run(Fuser(models), p)
    vote = segments[0].vote
    assert vote is not None and [s.key for s in vote.samples][:4] == [None] * 4
    assert vote.key == "7" and last_number(outcome.text) == "7"
