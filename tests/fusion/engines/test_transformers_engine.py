"""The transformers engine against plain, cache-free forwards of the same real models."""

from __future__ import annotations

import pytest
import torch

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
    assert len(state.ahead) < 400


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
