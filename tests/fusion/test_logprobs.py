"""Token log-probs of a source model served alone (fusion/logprobs.py), scripted engines."""

from __future__ import annotations

import pytest

from fusion.logprobs import segment_logprobs
from fusion.loop import Fuser, FusionError
from fusion.proposals import Proposal
from fusion.run import Candidate, Run
from fusion.types import FusionOutcome, FusionParams, ModelUsage, Prompt, Segment
from tests.fusion.fake_engine import BAD, GOOD

CHAT = Prompt(messages=({"role": "user", "content": "Say something."},))
SCRIPT = "The cat sat on the mat. It was warm."


async def run(fuser: Fuser, params: FusionParams, prompt: Prompt = CHAT):
    outcome = FusionOutcome()
    segments: list[Segment] = [s async for s in fuser.run(prompt, params, outcome)]
    return segments, outcome


async def test_each_segment_carries_its_models_tokens_with_the_most_likely_there(make_model):
    m = make_model("smollm2-135m", SCRIPT)
    params = FusionParams(models=(m.name,), logprobs=2)
    segments, outcome = await run(Fuser([m]), params)
    assert outcome.text == SCRIPT and len(segments) > 3
    ids = [t.id for s in segments for t in s.logprobs or ()]
    assert ids == [*m.tokenizer.encode(SCRIPT), m.chat_end_id]  # the end token included
    for seg in segments:
        assert seg.logprobs is not None
        assert m.tokenizer.decode([t.id for t in seg.logprobs if t.id != m.chat_end_id]) == seg.text
        for t in seg.logprobs:  # the fake's: the token it wants, then its end token
            other = m.chat_end_id if t.id != m.chat_end_id else 0
            assert t.logprob == GOOD and t.top == ((t.id, GOOD), (other, BAD))


async def test_without_logprobs_no_segment_carries_any(make_model):
    m = make_model("smollm2-135m", SCRIPT)
    segments, _ = await run(Fuser([m]), FusionParams(models=(m.name,)))
    assert segments and all(s.logprobs is None for s in segments)


async def test_logprobs_zero_reports_each_tokens_own_alone(make_model):
    m = make_model("qwen2.5-0.5b", SCRIPT)
    segments, _ = await run(Fuser([m]), FusionParams(models=(m.name,), logprobs=0))
    tokens = [t for s in segments for t in s.logprobs or ()]
    assert tokens and all(t.top == () and t.logprob == GOOD for t in tokens)


async def test_the_prompts_tokens_come_before_the_answer_the_first_without_a_logprob(make_model):
    m = make_model("gemma3-270m", SCRIPT)  # Gemma's prompts start with <bos>
    prompt = Prompt(text="The cat")
    params = FusionParams(models=(m.name,), logprobs=1, prompt_logprobs=1, max_tokens=4)
    segments, outcome = await run(Fuser([m]), params, prompt)
    assert outcome.prompt_logprobs is not None
    ids = m.completion_prompt_ids("The cat")
    assert ids[0] == m.tokenizer.bos_id
    assert [t.id for t in outcome.prompt_logprobs] == ids
    first, *rest = outcome.prompt_logprobs
    assert first.logprob is None and first.top == ()
    assert all(t.logprob is not None and len(t.top) == 1 for t in rest)
    assert segments and outcome.usage[m.name].prompt_tokens == len(ids)
    assert m.engine.open_states == 0  # the scratch state and the run's, released


async def test_max_tokens_0_scores_the_prompt_and_generates_nothing(make_model):
    m = make_model("smollm2-135m", SCRIPT)
    prompt = Prompt(text="The cat sat")
    params = FusionParams(models=(m.name,), max_tokens=0, prompt_logprobs=0, logprobs=0)
    segments, outcome = await run(Fuser([m]), params, prompt)
    assert segments == [] and outcome.finish_reason == "length" and outcome.text == ""
    assert outcome.completion_tokens == 0
    ids = m.completion_prompt_ids("The cat sat")
    assert outcome.prompt_logprobs is not None
    assert [t.id for t in outcome.prompt_logprobs] == ids
    assert outcome.usage[m.name].prompt_tokens == len(ids)
    engine = m.engine
    assert len(engine.states) == 1 and engine.commits == []  # the scratch state alone
    assert engine.scored == [[ids[1:]]] and engine.open_states == 0


async def test_max_tokens_0_without_prompt_logprobs_opens_nothing(make_model):
    m = make_model("smollm2-135m", SCRIPT)
    params = FusionParams(models=(m.name,), max_tokens=0)
    segments, outcome = await run(Fuser([m]), params, Prompt(text="The cat"))
    assert segments == [] and outcome.finish_reason == "length"
    assert m.engine.states == [] and outcome.usage[m.name].prompt_tokens == 2


async def test_a_committed_text_the_model_did_not_write_is_scored_as_committed(make_model):
    """A cut inside a token, a grammar's cut or a turn marker written as text: the text's
    own tokens, scored after the context with their most likely tokens."""
    m = make_model("smollm2-135m", SCRIPT)
    fuser = Fuser([m])
    r = Run(FusionParams(models=(m.name,), logprobs=2), CHAT, [m])
    r.outcome.usage = {m.name: ModelUsage()}
    await fuser.members.open(r)
    try:
        text = "The cat"
        proposal = Proposal(m.name, text, False, None, None, 3, False)
        tokens = await segment_logprobs(fuser.members, r, Candidate(text, False, (proposal,)))
    finally:
        await fuser.members.release(r)
    ids = m.tokenizer.encode(text)
    assert [t.id for t in tokens] == ids
    assert [t.logprob for t in tokens] == [GOOD] * len(ids)  # on script
    assert all(t.top[0] == (t.id, GOOD) and len(t.top) == 2 for t in tokens)
    assert m.engine.scored[-1] == [ids] and r.outcome.usage[m.name].scored_tokens == len(ids)


async def test_token_logprobs_are_for_one_model_alone(make_model):
    models = [make_model(t, SCRIPT) for t in ("smollm2-135m", "qwen2.5-0.5b")]
    with pytest.raises(FusionError, match="one source model"):
        await run(Fuser(models), FusionParams(logprobs=1))
