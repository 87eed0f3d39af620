"""The request's penalties on the llama.cpp engine with the real SmolLM2: a greedy answer
that loops stops looping under a strong presence penalty, the penalty counts the
answer committed by earlier calls, and off values leave the greedy answer as it was.

Each comparison is between runs that decode the same tokens in the same shapes (one
sequence, one token per decode) up to where they are compared, so ids are compared
exactly; no test pins a trajectory across differently shaped computations (STYLE 16).
"""

from __future__ import annotations

import asyncio

import pytest

from fusion.engine import Sampling
from fusion.sources import resolve_gguf

pytestmark = pytest.mark.integration

NEVER = lambda ids: False  # noqa: E731
# SmolLM2-135M's greedy answer to this loops ("A bicycle is a marvel of engineering.")
LOOPING = "Explain how a bicycle works."
STRONG = Sampling(presence_penalty=2.0)  # OpenAI's and vLLM's largest


@pytest.fixture(scope="module")
def smollm():
    from fusion.engines.llamacpp_engine import LlamaCppEngine
    from fusion.models import build_source_model

    found = resolve_gguf("pip:smollm2-135m-instruct")
    loop = asyncio.new_event_loop()
    engine = LlamaCppEngine("smollm2-135m", found.gguf, found.tokenizer_dir, n_ctx=2048)
    loop.run_until_complete(engine.start())
    model = build_source_model("smollm2-135m", engine, found.tokenizer_dir)
    yield loop, model
    loop.run_until_complete(engine.shutdown())
    loop.close()


def answer(smollm, sampling: Sampling, n: int = 40, *, split: int | None = None) -> list[int]:
    """``n`` tokens of the looping prompt's answer in one call, or in two with the first
    ``split`` committed in between (this model's own look-ahead: no decode)."""
    loop, model = smollm
    engine = model.engine

    async def run() -> list[int]:
        prompt = model.chat_prompt_ids([{"role": "user", "content": LOOPING}])
        st = await engine.open("r", prompt)
        try:
            if split is None:
                return list((await engine.generate(st, n, frozenset(), NEVER, sampling)).ids)
            first = (await engine.generate(st, split, frozenset(), NEVER, sampling)).ids
            await engine.commit(st, first)
            rest = (await engine.generate(st, n - split, frozenset(), NEVER, sampling)).ids
            return [*first, *rest]
        finally:
            await engine.release(st)

    return loop.run_until_complete(run())


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_a_strong_presence_penalty_breaks_a_greedy_loop(smollm):
    plain, penalised = answer(smollm, Sampling()), answer(smollm, STRONG)
    assert repeats(plain) >= 15, plain  # the loop (28 of 40 here)
    assert repeats(penalised) <= repeats(plain) // 2, penalised
    # the two agree until the penalty first bites, and it bites on a token the answer
    # already has: there the plain pick is a repeat and the penalised one is not it
    first = next(i for i, (a, b) in enumerate(zip(plain, penalised)) if a != b)
    assert plain[first] in plain[:first]


def test_the_penalty_counts_the_answer_committed_by_earlier_calls(smollm):
    whole = answer(smollm, STRONG, 24)
    assert answer(smollm, STRONG, 24, split=12) == whole
    assert answer(smollm, STRONG, 24, split=5) == whole


def test_off_values_and_greedy_cuts_leave_the_greedy_answer(smollm):
    off = Sampling(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    cuts = Sampling(top_k=2, min_p=0.5)  # they cut what sampling draws from: not greedy
    plain = answer(smollm, Sampling(), 16)
    assert answer(smollm, off, 16) == plain
    assert answer(smollm, cuts, 16) == plain
