"""The transformers engine against plain, cache-free forwards of the same real models."""

from __future__ import annotations

import pytest
import torch

from fusion.engine import Sampling

pytestmark = pytest.mark.integration

NAMES = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]


def reference_logprobs(model, prefix: list[int], cand: list[int]) -> list[float]:
    with torch.inference_mode():
        logits = model(torch.tensor([prefix + cand])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[len(prefix) - 1 + j][cand[j]]) for j in range(len(cand))]


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("name", NAMES)
async def test_batched_candidate_scores_equal_plain_forwards(real_models, name):
    m = real_models[name]
    prompt = m.tokenizer.encode_prompt("The capital of France is Paris. The capital of Italy is")
    state = await m.engine.open("t1", prompt)
    gen = await m.engine.generate(state, 4, m.stop_ids, lambda ids: False)
    cands = [m.tokenizer.encode(" Rome, of course"), m.tokenizer.encode(" Milan"), list(gen.ids)]
    scores = await m.engine.score(state, cands)
    for cand, got in zip(cands, scores):
        want = reference_logprobs(m.engine._model, prompt, cand)
        assert got == pytest.approx(want, abs=2e-4)
    assert list(gen.logprobs) == pytest.approx(scores[2], abs=2e-4)
    await m.engine.release(state)


@pytest.mark.parametrize("name", NAMES)
async def test_committing_a_scored_candidate_then_generating_is_greedy(real_models, name):
    m = real_models[name]
    prompt = m.tokenizer.encode_prompt("List three colours:")
    state = await m.engine.open("t2", prompt)
    await m.engine.generate(state, 3, m.stop_ids, lambda ids: False)
    cand = m.tokenizer.encode(" red, green")
    await m.engine.score(state, [m.tokenizer.encode(" blue"), cand])
    forwards = state.forwards
    await m.engine.commit(state, cand)
    gen = await m.engine.generate(state, 5, frozenset(), lambda ids: False)
    assert list(gen.ids) == greedy_reference(m.engine._model, prompt + cand, 5)
    # the scoring pass left the next-token distribution: 5 tokens cost 4 forwards
    assert state.forwards - forwards == 4
    await m.engine.release(state)


async def test_look_ahead_is_reused_without_forwards(real_models):
    m = real_models["qwen2.5-0.5b"]
    state = await m.engine.open("t3", m.tokenizer.encode_prompt("Count: one, two,"))
    first = await m.engine.generate(state, 6, frozenset(), lambda ids: False)
    forwards = state.forwards
    await m.engine.commit(state, first.ids[:2])
    again = await m.engine.generate(state, 3, frozenset(), lambda ids: False)
    assert again.ids == first.ids[2:5]
    assert state.forwards == forwards
    await m.engine.release(state)


async def test_sliding_window_layers_are_exact_past_the_window(real_models):
    """Gemma 3 attends over 512 tokens in 5 of 6 layers; the arena keeps every slot and
    the engine's masks must apply the window exactly."""
    m = real_models["gemma3-270m"]
    text = " ".join(f"item {i} is {i * 7 % 13}." for i in range(140))
    prompt = m.tokenizer.encode_prompt(text)
    assert len(prompt) > 700
    state = await m.engine.open("t4", prompt)
    cand = m.tokenizer.encode(" item 140 is 7.")
    [got] = await m.engine.score(state, [cand])
    assert got == pytest.approx(reference_logprobs(m.engine._model, prompt, cand), abs=5e-4)
    await m.engine.release(state)


async def test_release_stops_a_running_generation(real_models):
    import asyncio

    m = real_models["smollm2-135m"]
    state = await m.engine.open("t5", m.tokenizer.encode_prompt("Tell a long story:"))
    task = asyncio.ensure_future(m.engine.generate(state, 400, frozenset(), lambda ids: False))
    await asyncio.sleep(0.5)
    await m.engine.release(state)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(state.book.ahead) < 400


async def test_repeated_failures_make_the_engine_unhealthy_until_it_recovers(model_dirs):
    from fusion.engine import EngineError
    from fusion.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine("smollm2-135m", model_dirs["smollm2-135m"])
    await engine.start()
    healthy_forward = engine._model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    engine._model.forward = broken
    for i in range(3):
        state = await engine.open(f"f{i}", [1, 2, 3])
        with pytest.raises(EngineError, match="device lost"):
            await engine.generate(state, 2, frozenset(), lambda ids: False)
        await engine.release(state)
    with pytest.raises(EngineError, match="failed"):
        await engine.check_health()
    engine._model.forward = healthy_forward
    state = await engine.open("ok", [1, 2, 3])
    await engine.generate(state, 2, frozenset(), lambda ids: False)
    await engine.check_health()
    assert engine.open_states == 1
    await engine.release(state)
    assert engine.open_states == 0
    await engine.shutdown()


async def test_release_does_not_queue_behind_other_requests_calls(real_models):
    """Regression (issue 14, item 3): release truncated the cache on the engine thread,
    so it waited for every generate/score call queued before it."""
    import asyncio
    import time

    m = real_models["qwen2.5-0.5b"]
    prompt = m.tokenizer.encode_prompt("Tell a long story:")
    busy = await m.engine.open("busy", prompt)
    idle = await m.engine.open("idle", prompt)
    await m.engine.generate(idle, 2, frozenset(), lambda ids: False)
    task = asyncio.ensure_future(m.engine.generate(busy, 300, frozenset(), lambda ids: False))
    await asyncio.sleep(0.3)
    started = time.perf_counter()
    await m.engine.release(idle)
    # before the fix it waited for the whole 300-token generation (70 s here)
    assert time.perf_counter() - started < 0.5 and not task.done()
    assert idle.cache.nbytes == 0  # freed at once, not when the busy call is over
    await m.engine.release(busy)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_model_hung_mid_generate_is_dropped_and_released_without_waiting(
    model_dirs, real_models
):
    """Regression (issue 14, item 1): a step timeout only cancelled the awaiting future;
    the engine thread kept running the hung call and the dropped model's release queued
    behind it, so the request (its last chunk, [DONE], its admission slot) waited too."""
    import asyncio
    import threading

    from fusion.engines.transformers_engine import TransformersEngine
    from fusion.health import FaultPolicy
    from fusion.loop import Fuser
    from fusion.models import build_source_model
    from fusion.types import FusionOutcome, FusionParams, Prompt

    folder = model_dirs["smollm2-135m"]
    engine = TransformersEngine("smollm2-135m", folder)
    await engine.start()
    hung = build_source_model("smollm2-135m", engine, folder, step_timeout=5.0)
    entered, unblock = threading.Event(), threading.Event()
    forward = engine._model.forward
    calls = 0

    def hanging_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:  # the third token of the first segment
            entered.set()
            unblock.wait(300)
        return forward(*args, **kwargs)

    engine._model.forward = hanging_forward
    opened = []
    open_state = engine.open

    async def recording_open(request_id, prompt_ids, room=None):
        opened.append(await open_state(request_id, prompt_ids, room))
        return opened[-1]

    engine.open = recording_open
    prompt = Prompt(messages=({"role": "user", "content": "Write one sentence about the sea."},))
    outcome = FusionOutcome()

    # no probe brings the ejected model back during the test: it would open a state of
    # its own and run a forward after the hung one
    stay_out = FaultPolicy(eject_seconds=600, max_eject_seconds=600)
    fuser = Fuser([hung, real_models["qwen2.5-0.5b"]], faults=stay_out)

    async def consume() -> None:
        async for _ in fuser.run(prompt, FusionParams(max_tokens=12), outcome):
            pass

    try:
        await asyncio.wait_for(consume(), 60)
        # done while the hung forward still blocks the engine thread
        assert entered.is_set() and not unblock.is_set()
        assert "step timeout" in (outcome.usage["smollm2-135m"].dropped or "")
        assert outcome.text.strip()
        assert engine.open_states == 0 and opened[0].cancelled
    finally:
        unblock.set()
    # the hung call resumes, stops at its next token and frees the state as it ends
    for _ in range(100):
        if opened[0].cache.nbytes == 0:
            break
        await asyncio.sleep(0.05)
    assert opened[0].cache.nbytes == 0 and calls == 3
    await fuser.close()
    await engine.shutdown()


async def test_an_open_request_keeps_single_distribution_rows(real_models):
    """Regression (issue 14, item 4): kept distributions were row views of whole
    [rows, vocab] forward outputs (about 1 MiB a row with Gemma's vocabulary), plus one
    full row per look-ahead token."""
    m = real_models["gemma3-270m"]
    row = m.engine._model.config.get_text_config().vocab_size * 4
    state = await m.engine.open("mem", m.tokenizer.encode_prompt("List the planets in order:"))
    for step in range(4):
        gen = await m.engine.generate(state, 8, frozenset(), lambda ids: len(ids) >= 6)
        other = m.tokenizer.encode(" and then some other words")
        await m.engine.score(state, [list(gen.ids[:3]), other, m.tokenizer.encode(" no")])
        # own prefix (look-ahead kept) and another model's candidate (its scoring block)
        await m.engine.commit(state, gen.ids[:3] if step % 2 == 0 else other)
        assert state.held_bytes() - state.cache.nbytes <= 2 * row
    await m.engine.release(state)


@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-0.5b"])
async def test_scores_after_committing_part_of_the_look_ahead_equal_plain_forwards(
    real_models, name
):
    """The distribution after the context is not kept when only part of the look-ahead is
    committed; the next scoring forward derives it."""
    m = real_models[name]
    prompt = m.tokenizer.encode_prompt("The capital of France is Paris. The capital of Italy is")
    state = await m.engine.open("part", prompt)
    gen = await m.engine.generate(state, 6, frozenset(), lambda ids: False)
    await m.engine.commit(state, gen.ids[:2])
    assert state.book.ctx_row is None
    context = prompt + list(gen.ids[:2])
    cands = [list(gen.ids[2:4]), m.tokenizer.encode(" Rome")]
    scores = await m.engine.score(state, cands)
    for cand, got in zip(cands, scores):
        assert got == pytest.approx(reference_logprobs(m.engine._model, context, cand), abs=2e-4)
    forwards = state.forwards
    await m.engine.commit(state, gen.ids[2:4])
    again = await m.engine.generate(state, 3, frozenset(), lambda ids: False)
    assert list(again.ids) == greedy_reference(m.engine._model, prompt + list(gen.ids[:4]), 3)
    assert again.reused == 2 and state.forwards - forwards == 0  # the scoring pass fed it all
    await m.engine.release(state)


async def test_state_invariants_are_checked_after_every_call(real_models):
    """Regression (issue 14, item 17): nothing checked that the state's cursors agree."""
    from fusion.engine import EngineError

    m = real_models["smollm2-135m"]
    state = await m.engine.open("inv", m.tokenizer.encode_prompt("Hello"))
    gen = await m.engine.generate(state, 4, frozenset(), lambda ids: False)
    state.check()
    state.book.ahead_done = len(gen.ids) + 1  # a broken cursor
    with pytest.raises(EngineError, match="look-ahead done beyond look-ahead"):
        await m.engine.commit(state, [])
    await m.engine.release(state)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
async def test_mixed_steps_keep_scores_exact_and_the_state_consistent(real_models, name):
    """Every way a step can end (own prefix, all of the look-ahead, another model's scored
    candidate, text never seen) in a seeded mix: scores and greedy tokens stay those of
    plain forwards, and the state's layout check passes after every call."""
    import random

    rng = random.Random(7)
    m = real_models[name]
    context = m.tokenizer.encode_prompt("Once upon a time, in a small village by the sea,")
    state = await m.engine.open("mix", context)
    other = m.tokenizer.encode(" and then the wind")
    for _ in range(10):
        n = rng.randint(2, 6)
        gen = await m.engine.generate(state, n, frozenset(), lambda ids: False)
        assert list(gen.ids) == greedy_reference(m.engine._model, context, len(gen.ids))
        own = list(gen.ids[: rng.randint(1, len(gen.ids))])
        choice = rng.choice(["own", "all", "other", "unseen"])
        if choice != "unseen":
            cands = [own, other] if rng.random() < 0.5 else [other, list(gen.ids)]
            for cand, got in zip(cands, await m.engine.score(state, cands)):
                want = reference_logprobs(m.engine._model, context, cand)
                assert got == pytest.approx(want, abs=5e-4)
        ids = {"own": own, "all": list(gen.ids), "other": other, "unseen": other[:2]}[choice]
        await m.engine.commit(state, ids)
        context = context + ids
        state.check()
    await m.engine.release(state)


def reference_rows(model, prefix: list[int], cand: list[int]) -> torch.Tensor:
    """The log-prob rows at each of ``cand``'s positions, by a plain forward."""
    with torch.inference_mode():
        logits = model(torch.tensor([prefix + cand])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prefix) - 1 : len(prefix) - 1 + len(cand)]


def assert_most_likely(tops, rows: torch.Tensor, n: int) -> None:
    """Each reported top is the row's ``n`` most likely tokens, most likely first, to
    within the cached and plain forwards' difference (2e-4: a near-tie may swap)."""
    for top, row in zip(tops, rows, strict=True):
        assert len(top) == n
        assert [lp for _, lp in top] == pytest.approx([float(row[t]) for t, _ in top], abs=2e-4)
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert top[-1][1] >= float(row.topk(n).values[-1]) - 2e-4


async def test_the_most_likely_tokens_reported_are_a_plain_forwards(real_models):
    m = real_models["smollm2-135m"]
    model = m.engine._model
    prompt = m.tokenizer.encode_prompt("The three primary colours are")
    state = await m.engine.open("t-top", prompt)
    sampling = Sampling(top_logprobs=4)
    gen = await m.engine.generate(state, 6, frozenset(), lambda ids: len(ids) >= 4, sampling)
    ids = list(gen.ids)
    assert_most_likely(gen.top, reference_rows(model, prompt, ids), 4)
    assert [top[0][0] for top in gen.top] == ids  # greedy: the argmax
    await m.engine.commit(state, ids[:2])  # the rest is look-ahead, replayed with its tops
    again = await m.engine.generate(state, 3, frozenset(), lambda ids: False, sampling)
    assert again.reused == 2 and again.top[:2] == gen.top[2:4]
    cand = m.tokenizer.encode(" red, yellow and blue")
    lps, tops = await m.engine.score_top(state, cand, 3)
    context = prompt + ids[:2]
    assert lps == pytest.approx(reference_logprobs(model, context, cand), abs=2e-4)
    assert_most_likely(tops, reference_rows(model, context, cand), 3)
    await m.engine.release(state)
