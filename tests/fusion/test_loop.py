"""The fusion loop against scripted engines with real tokenizers."""

from __future__ import annotations

import asyncio

import pytest

from fusion.loop import Fuser, FusionError
from fusion.types import FusionOutcome, FusionParams, Prompt, Segment

CHAT = Prompt(messages=({"role": "user", "content": "Say something."},))


async def run(fuser: Fuser, params: FusionParams, prompt: Prompt = CHAT):
    outcome = FusionOutcome()
    segments: list[Segment] = [s async for s in fuser.run(prompt, params, outcome)]
    return segments, outcome


async def test_models_that_agree_write_their_text(make_model):
    script = "The cat sat on the mat."
    models = [make_model(t, script) for t in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")]
    segments, outcome = await run(Fuser(models), FusionParams())
    assert "".join(s.text for s in segments) == script == outcome.text
    assert outcome.finish_reason == "stop"
    assert all(len(s.candidates) == 1 and len(s.candidates[0].proposers) == 3 for s in segments)


async def test_lowest_average_perplexity_wins(make_model):
    models = [
        make_model("smollm2-135m", "The cat sat on the mat."),
        make_model("gemma3-270m", "The cat sat on the rug."),
        make_model("qwen2.5-0.5b", "The cat sat on the mat."),
    ]
    segments, outcome = await run(Fuser(models), FusionParams())
    assert outcome.text == "The cat sat on the mat."
    split = next(s for s in segments if len(s.candidates) > 1)
    by_text = {c.text: c for c in split.candidates}
    assert set(by_text) == {" mat.", " rug."}
    assert by_text[" mat."].mean_perplexity < by_text[" rug."].mean_perplexity
    assert split.winner in ("smollm2-135m", "qwen2.5-0.5b")
    assert dict(by_text[" rug."].perplexities)["gemma3-270m"] < 1.1  # its own view


async def test_segments_end_at_word_boundaries_of_every_tokenizer(make_model, default_adapters):
    script = "Multi-tasking, naïve café: 3+5=8 and x**2!\n\nDone 你好 🙂."
    models = [make_model(t, script) for t in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")]
    segments, outcome = await run(Fuser(models), FusionParams())
    assert outcome.text == script
    cut = 0
    for seg in segments[:-1]:
        cut += len(seg.text)
        for adapter in default_adapters.values():
            assert cut in adapter.word_ends(script), (adapter.name, script[:cut])


async def test_shortest_variant_cuts_at_the_proposers_own_boundary(make_model):
    script = "3+5=8 is right."
    pair = [make_model("smollm2-135m", script), make_model("gemma3-270m", script)]
    cool, _ = await run(Fuser(pair), FusionParams(method="cool"))
    shortest, _ = await run(Fuser(pair), FusionParams(method="cool_shortest"))
    # Gemma has no word boundary inside "3+5=8"; SmolLM2 splits digits and symbols
    assert cool[0].text == "3+5=8"
    assert {c.text for c in shortest[0].candidates} == {"3", "3+5=8"}


async def test_max_tokens_finishes_with_length(make_model):
    script = "one two three four five six seven eight nine ten"
    models = [make_model(t, script) for t in ("smollm2-135m", "qwen2.5-0.5b")]
    _, outcome = await run(Fuser(models), FusionParams(max_tokens=4))
    assert outcome.finish_reason == "length"
    assert outcome.completion_tokens == 4
    assert outcome.text == "one two three four"


async def test_stop_string_across_segments_is_never_emitted(make_model):
    script = "Hello there. STOP here"
    models = [make_model(t, script) for t in ("smollm2-135m", "gemma3-270m")]
    segments, outcome = await run(Fuser(models), FusionParams(stop=("there. ST",)))
    emitted = "".join(s.text for s in segments)
    assert emitted == "Hello " == outcome.text
    assert outcome.finish_reason == "stop"
    assert segments[-1].finish_reason == "stop"


async def test_ended_candidates_are_scored_with_each_models_end_token(make_model):
    models = [make_model("smollm2-135m", "Yes."), make_model("qwen2.5-0.5b", "Yes!")]
    await run(Fuser(models), FusionParams())
    for m in models:
        end = m.chat_end_id
        ended = [c for batch in m.engine.scored for c in batch if c and c[-1] == end]
        assert ended, m.name


async def test_chat_answers_start_without_leading_whitespace(make_model):
    models = [make_model("qwen2.5-0.5b", "  Hi there")]
    _, outcome = await run(Fuser(models), FusionParams())
    assert outcome.text.startswith("Hi there")


async def test_a_failing_model_is_dropped_and_the_answer_completes(make_model):
    script = "The cat sat on the mat."
    models = [
        make_model("smollm2-135m", script),
        make_model("gemma3-270m", script, fail_at_call=4),
        make_model("qwen2.5-0.5b", script),
    ]
    segments, outcome = await run(Fuser(models), FusionParams())
    assert outcome.text == script
    assert outcome.usage["gemma3-270m"].dropped
    assert not outcome.usage["smollm2-135m"].dropped
    assert all(p != "gemma3-270m" for s in segments[-1:] for c in s.candidates for p in c.proposers)


async def test_no_model_left_raises(make_model):
    models = [make_model(t, "x y z", fail_at_call=2) for t in ("smollm2-135m", "qwen2.5-0.5b")]
    with pytest.raises(FusionError, match="every source model failed"):
        await run(Fuser(models), FusionParams())


async def test_states_are_released_when_the_consumer_stops_early(make_model):
    script = "one two three four five six"
    models = [make_model(t, script) for t in ("smollm2-135m", "qwen2.5-0.5b")]
    gen = Fuser(models).run(CHAT, FusionParams())
    first = await gen.__anext__()
    assert first.text
    await gen.aclose()
    for m in models:
        assert m.engine.states and all(s.released for s in m.engine.states)


async def test_rerank_picks_the_continuation_most_models_agree_with(make_model):
    models = [
        make_model("smollm2-135m", "Paris is the capital."),
        make_model("gemma3-270m", "Lyon, maybe."),
        make_model("qwen2.5-0.5b", "Paris is the capital."),
    ]
    segments, outcome = await run(Fuser(models), FusionParams(method="rerank"))
    assert len(segments) == 1
    assert outcome.text == "Paris is the capital."
    assert {c.text for c in segments[0].candidates} == {"Paris is the capital.", "Lyon, maybe."}


async def test_cool_rerank_adds_the_fused_text_as_a_candidate(make_model):
    models = [
        make_model("smollm2-135m", "The cat sat on the mat."),
        make_model("gemma3-270m", "The cat sat on the rug."),
        make_model("qwen2.5-0.5b", "The cat sat on the mat."),
    ]
    segments, outcome = await run(Fuser(models), FusionParams(method="cool_rerank"))
    fused = [c for c in segments[0].candidates if c.proposers == ("fusion",)]
    assert len(fused) == 1 and fused[0].text == "The cat sat on the mat."
    assert outcome.text == "The cat sat on the mat."
    for m in models:  # the cool pass and the rerank pass each opened (and released) states
        assert len(m.engine.states) == 2 and all(s.released for s in m.engine.states)


async def test_single_model_is_its_own_greedy_text(make_model):
    model = make_model("gemma3-270m", "Only me, talking.")
    _, outcome = await run(Fuser([model]), FusionParams(models=("gemma3-270m",)))
    assert outcome.text == "Only me, talking."
    assert model.engine.scored == []  # nothing to compare against: no scoring pass


async def test_a_hung_model_is_dropped_after_its_step_timeout(make_model):
    import dataclasses

    script = "The cat sat on the mat."
    slow = make_model("gemma3-270m", script, delay=5.0)
    slow = dataclasses.replace(slow, step_timeout=0.2)
    models = [make_model("smollm2-135m", script), slow, make_model("qwen2.5-0.5b", script)]
    _, outcome = await run(Fuser(models), FusionParams())
    assert outcome.text == script
    assert "step timeout" in (outcome.usage["gemma3-270m"].dropped or "")


async def test_cancel_while_opening_releases_the_states_already_opened(make_model):
    """Regression (found by bench/load.py): a client that left before the first segment
    cancelled the run while engines were still opening; the states opened so far were
    never released."""
    import asyncio

    script = "one two three"
    fast = make_model("smollm2-135m", script)
    slow = make_model("qwen2.5-0.5b", script, delay=5.0)
    fuser = Fuser([fast, slow])

    async def consume() -> None:
        async for _ in fuser.run(CHAT, FusionParams()):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.2)  # fast has opened; slow is still opening
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert len(fast.engine.states) == 1 and fast.engine.states[0].released


async def test_step_timings_split_each_step_and_name_the_slow_model(make_model):
    models = [
        make_model("smollm2-135m", "The cat sat on the mat."),
        make_model("gemma3-270m", "The cat sat on the rug.", delay=0.02),
        make_model("qwen2.5-0.5b", "The cat sat on the mat."),
    ]
    segments, outcome = await run(Fuser(models), FusionParams())
    for s in segments:
        t = s.timings
        phases = (t.generate, t.score, t.commit, t.align, t.other)
        assert all(p >= 0 for p in phases)
        assert s.step_seconds == pytest.approx(sum(phases))
        busy = dict(t.per_model)
        assert set(busy) == {m.name for m in models}
        # gemma sleeps 20 ms per engine call: it is every step's critical path
        assert busy["gemma3-270m"] == max(busy.values()) and busy["gemma3-270m"] >= 0.04
        # the generate phase waited for gemma's 20 ms; tokenizer work inside it is booked
        # as align (summed over models, so under load it can eat into generate)
        assert t.generate + t.align >= 0.02
    contexts = [s.context_tokens for s in segments]
    assert contexts == sorted(contexts) and contexts[0] > 0 and contexts[-1] > contexts[0]
    total = sum(outcome.phase_seconds.values())
    assert total == pytest.approx(sum(s.step_seconds for s in segments), rel=0.05)
    assert outcome.model_seconds["gemma3-270m"] >= 0.04 * len(segments)


async def test_cool_rerank_timings_include_its_unemitted_cool_steps(make_model):
    models = [
        make_model("smollm2-135m", "The cat sat on the mat.", delay=0.01),
        make_model("gemma3-270m", "The cat sat on the rug.", delay=0.01),
    ]
    segments, outcome = await run(Fuser(models), FusionParams(method="cool_rerank"))
    assert len(segments) == 1
    assert sum(outcome.phase_seconds.values()) > segments[0].step_seconds


async def test_releases_of_a_request_run_concurrently(make_model):
    """Regression (issue 14, item 3): the states of a finished request were released one
    model after the other."""
    import time

    script = "Hi."
    models = [
        make_model(t, script, release_delay=0.3)
        for t in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")
    ]
    started = time.perf_counter()
    _, outcome = await run(Fuser(models), FusionParams())
    assert outcome.text == script
    assert time.perf_counter() - started < 0.8  # one release delay (0.3 s), not three (0.9 s)
    assert all(s.released for m in models for s in m.engine.states)


async def test_a_dropped_model_is_released_while_the_request_goes_on(make_model):
    """Regression (issue 14, item 1): a dropped model's state waited for the end of the
    request, so a call still running for it (a hung one) was never told to stop."""
    script = "one two three four five six seven eight"
    failing = make_model("gemma3-270m", script, fail_at_call=3)
    models = [make_model("smollm2-135m", script), failing]
    gen = Fuser(models).run(CHAT, FusionParams())
    seen_released = []
    async for _ in gen:
        await asyncio.sleep(0.01)  # let the release task run
        seen_released.append(all(s.released for s in failing.engine.states))
    assert failing.engine.states and len(seen_released) > 2
    assert seen_released[0] and all(seen_released)


async def test_completion_tokens_do_not_count_look_ahead_past_a_stop_string(make_model):
    """Regression (issue 14, item 8): a candidate without its own token ids for exactly
    its text counted every generated token, look-ahead past its cut included."""
    script = "The answer is 4. Question: what is 5 + 5? The answer is 10."
    m = make_model("qwen2.5-0.5b", script)
    prompt = Prompt(text="Q:")
    params = FusionParams(method="rerank", stop=("Question:",))
    _, outcome = await run(Fuser([m]), params, prompt)
    assert outcome.text == "The answer is 4. "
    assert outcome.completion_tokens == len(m.tokenizer.encode("The answer is 4. "))
    assert outcome.finish_reason == "stop"


async def test_rerank_scores_a_candidate_cut_at_a_user_stop_as_text(make_model):
    """Regression (issue 14, item 10): a Rerank candidate cut at a request stop string was
    scored with an end token appended (as if the model had ended there), unlike Cool's
    fused text cut at the same string."""
    models = [
        make_model("smollm2-135m", "Four. Question: next"),
        make_model("qwen2.5-0.5b", "4. Question: next"),
    ]
    segments, outcome = await run(
        Fuser(models), FusionParams(method="rerank", stop=("Question:",)), Prompt(text="Q:")
    )
    assert outcome.text in ("Four. ", "4. ") and outcome.finish_reason == "stop"
    assert {c.text for c in segments[0].candidates} == {"Four. ", "4. "}
    assert not any(c.ended for c in segments[0].candidates)
    for m in models:
        end = m.end_id(chat=False)
        scored = [c for batch in m.engine.scored for c in batch]
        assert scored and all(c[-1] != end for c in scored), m.name


async def test_completion_tokens_do_not_count_a_turn_marker_written_as_text(make_model):
    """Regression (issue 14, item 8), Cool's side: an answer ended by a turn marker the
    model wrote as text counted the marker's tokens (and any look-ahead) as content."""
    import dataclasses

    m = make_model("smollm2-135m", "Yes it is. User: and more")
    m = dataclasses.replace(m, stop_strings=("User:",))
    _, outcome = await run(Fuser([m]), FusionParams(), Prompt(text="Q:"))
    assert outcome.text == "Yes it is. " and outcome.finish_reason == "stop"
    assert outcome.completion_tokens == len(m.tokenizer.encode("Yes it is. "))


@pytest.mark.parametrize("tokenizer", ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"])
async def test_a_turn_marker_split_across_segments_ends_the_answer(make_model, tokenizer):
    """Regression (issue 21, item 3): the word-boundary cut ends a segment right after
    "\\n", so the plain template's marker "\\nUser:" arrives in two segments; the check
    saw only the current one and the model went on writing invented turns."""
    import dataclasses

    m = make_model(tokenizer, "Yes it is.\nUser: and more words here.\nAssistant: ok")
    m = dataclasses.replace(m, stop_strings=("\nUser:",))
    segments, outcome = await run(Fuser([m]), FusionParams(max_tokens=64))
    assert any(s.text.endswith("\n") for s in segments), "the marker was not split"
    assert outcome.finish_reason == "stop"
    assert "User" not in outcome.text and outcome.text.rstrip() == "Yes it is."


async def test_a_turn_marker_needs_the_whole_marker_across_segments(make_model):
    """The committed end and the new text together must hold the whole marker: a line
    that starts with "Use" is no turn."""
    import dataclasses

    m = make_model("qwen2.5-0.5b", "Yes it is.\nUse it well.\nUser: no")
    m = dataclasses.replace(m, stop_strings=("\nUser:",))
    _, outcome = await run(Fuser([m]), FusionParams(max_tokens=64))
    assert outcome.text.rstrip() == "Yes it is.\nUse it well." and outcome.finish_reason == "stop"


async def test_a_model_named_twice_is_refused_before_any_state_opens(make_model):
    """Regression (issue 21, item 2): a model named twice held two engine states under
    one name; the first leaked and every segment was committed twice to the second."""
    m = make_model("qwen2.5-0.5b", "Yes.")
    with pytest.raises(ValueError, match=r"named twice: qwen2\.5-0\.5b"):
        await run(Fuser([m]), FusionParams(models=("qwen2.5-0.5b", "qwen2.5-0.5b")))
    assert m.engine.states == []


class WaitsForRoomAtOpen:
    """An engine whose ``open`` waits in line (for cache room, say) before it answers."""

    def __init__(self, inner, wait: float) -> None:
        self.inner, self.wait = inner, wait

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def open(self, request_id, prompt_ids, room=None):
        await asyncio.sleep(self.wait)
        return await self.inner.open(request_id, prompt_ids, room)


async def test_waiting_in_line_at_open_is_not_a_hang(make_model):
    """Review of issue 21's KV admission: waiting for room at open ran under the step
    timeout, and one after the other the waits added up, so a request that queued long
    enough lost its models (or all of them: a 503)."""
    import dataclasses

    script = "The cat sat on the mat."
    models = []
    for name in ("smollm2-135m", "gemma3-270m"):
        m = make_model(name, script)
        engine = WaitsForRoomAtOpen(m.engine, wait=0.15)
        models.append(dataclasses.replace(m, engine=engine, step_timeout=0.2))
    _, outcome = await run(Fuser(models), FusionParams())
    assert outcome.text == script
    assert not [u.dropped for u in outcome.usage.values() if u.dropped]
