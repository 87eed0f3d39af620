"""Fused generation with the three real default models (CPU)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from fusion.loop import Fuser
from fusion.types import FusionOutcome, FusionParams, Prompt

pytestmark = pytest.mark.integration

SEA = Prompt(messages=({"role": "user", "content": "Write one sentence about the sea."},))


async def fuse(models, prompt, **params):
    outcome = FusionOutcome()
    segments = [s async for s in Fuser(models).run(prompt, FusionParams(**params), outcome)]
    return segments, outcome


def looks_fluent(text: str) -> bool:
    words = text.split()
    return len(words) >= 5 and sum(w.isascii() for w in words) / len(words) > 0.9


async def test_trio_writes_fluent_text_that_several_models_win(real_models, default_adapters):
    segments, outcome = await fuse(list(real_models.values()), SEA, max_tokens=48)
    assert looks_fluent(outcome.text), outcome.text
    assert len({s.winner for s in segments}) >= 2
    # every cut between emitted segments is a word boundary of every tokenizer
    full = "".join(s.text for s in segments)
    cut = 0
    for seg in segments[:-1]:
        cut += len(seg.text)
        for adapter in default_adapters.values():
            assert cut in adapter.word_ends(full), (adapter.name, full[:cut])


@pytest.mark.parametrize(
    "pair", list(itertools.combinations(["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"], 2))
)
async def test_every_pair_fuses(real_models, pair):
    models = [real_models[n] for n in pair]
    segments, outcome = await fuse(models, SEA, max_tokens=24)
    assert outcome.text.strip() and outcome.finish_reason in ("stop", "length")
    assert {c.proposers[0] for s in segments for c in s.candidates} <= set(pair)


async def test_single_model_through_the_fuser_is_plain_greedy(real_models):
    import torch

    m = real_models["qwen2.5-0.5b"]
    _, outcome = await fuse([m], SEA, max_tokens=20)
    prompt = m.chat_prompt_ids(SEA.messages)
    ids: list[int] = []
    with torch.inference_mode():
        for _ in range(20):
            tok = int(m.engine._model(torch.tensor([prompt + ids])).logits[0, -1].argmax())
            if tok in m.stop_ids:
                break
            ids.append(tok)
    assert outcome.text == m.tokenizer.decode(ids).lstrip()


@pytest.mark.parametrize("method", ["rerank", "cool_rerank", "cool_shortest"])
async def test_other_methods_answer(real_models, method):
    models = [real_models["smollm2-135m"], real_models["qwen2.5-0.5b"]]
    segments, outcome = await fuse(models, SEA, max_tokens=20, method=method)
    assert outcome.text.strip()
    if method != "cool_shortest":
        assert len(segments) == 1 and len(segments[0].candidates) >= 2


async def test_completion_prompt_continues_the_text(real_models):
    prompt = Prompt(text="The capital of France is")
    _, outcome = await fuse(list(real_models.values()), prompt, max_tokens=8)
    assert "Paris" in outcome.text


def test_cli_generate_prints_text_and_trace(model_dirs, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--log-level",
            "WARNING",
            "generate",
            "--trace",
            "--max-tokens",
            "12",
            "--models",
            "smollm2-135m,qwen2.5-0.5b",
            "What is 2 plus 2?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "[segment 0] winner=" in proc.stderr and "segments won:" in proc.stderr


async def test_gate_and_packllm_policies_on_the_real_models(real_models):
    from fusion.types import SelectionPolicy

    models = list(real_models.values())
    gate = SelectionPolicy("gate", leader="qwen2.5-0.5b")
    segments, outcome = await fuse(models, SEA, max_tokens=24, selection=gate)
    assert outcome.text.strip()
    assert not [u.dropped for u in outcome.usage.values() if u.dropped]
    gated = [s for s in segments if s.step == "gated"]
    assert gated and all(s.winner == "qwen2.5-0.5b" and len(s.candidates) == 1 for s in gated)
    assert all(s.rule == "weighted" for s in segments if s.step == "fused")
    segments, outcome = await fuse(models, SEA, max_tokens=16, selection=SelectionPolicy("packllm"))
    assert outcome.text.strip()
    assert not [u.dropped for u in outcome.usage.values() if u.dropped]
    assert {s.rule for s in segments if len(s.candidates) > 1} <= {"packllm"}
    for m in models:  # the prompt-scoring scratch states were released with the rest
        assert getattr(m.engine, "open_states", 0) == 0


async def test_generated_tokens_count_replayed_look_ahead_once(real_models):
    """Regression (issue 14, item 8): every step re-counted the look-ahead the engine
    replayed from the step before, so generated_tokens grew with the number of segments."""
    m = real_models["qwen2.5-0.5b"]
    segments, outcome = await fuse([m], SEA, max_tokens=24)
    assert len(segments) > 4
    generated = outcome.usage[m.name].generated_tokens
    # a single model commits its own text: what it generated is the answer, plus at most
    # the look-ahead past the last cut (and the end token)
    assert outcome.completion_tokens <= generated <= outcome.completion_tokens + 2
