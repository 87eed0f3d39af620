"""The request's logit processors on the vLLM engines: passed to vLLM as its own
``SamplingParams`` fields, and a penalised greedy request never replays look-ahead that a
plain greedy scoring pass generated."""

from __future__ import annotations

import dataclasses

import pytest

from fusion.engine import Sampling
from fusion.engines.vllm_logprobs import LookAhead, Taker
from fusion.engines.vllm_requests import generate_fields
from tests.fusion.engines.test_vllm_lookahead import AT_TWO, KINDS, make, others

NEVER = lambda ids: False  # noqa: E731
SHAPED = Sampling(
    presence_penalty=0.5,
    frequency_penalty=-0.25,
    repetition_penalty=1.2,
    top_k=20,
    min_p=0.05,
    logit_bias=((7, 3.0),),
)


def fields_of(sampling: Sampling) -> dict:
    taker = Taker(LookAhead.after([1, 2, 3]), 8, frozenset(), NEVER)
    return generate_fields(taker, sampling, 3)


def test_generation_requests_carry_the_processors_set_and_only_those():
    plain = fields_of(Sampling())
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k"):
        assert name not in plain
    assert "min_p" not in plain and "logit_bias" not in plain
    assert fields_of(Sampling(top_k=-1)) == plain
    got = fields_of(SHAPED)
    assert {k: got[k] for k in got.keys() - plain.keys()} == {
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "repetition_penalty": 1.2,
        "top_k": 20,
        "min_p": 0.05,
        "logit_bias": {7: 3.0},
    }


def test_vllm_takes_them_as_sampling_params():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    sampled = dataclasses.replace(SHAPED, temperature=0.7)  # greedy: vLLM drops top_k, min_p
    params = SamplingParams(**fields_of(sampled))
    got = (params.presence_penalty, params.repetition_penalty, params.top_k, params.min_p)
    assert got == (0.5, 1.2, 20, 0.05) and params.logit_bias == {7: 3.0}


@KINDS
async def test_a_penalised_greedy_request_never_replays_a_scoring_passs_tokens(kind, fake, tok_dir):
    engine = await make(kind, fake, tok_dir)
    context = fake.words[:6]
    st = await engine.open("penalised", context)
    sampling = Sampling(presence_penalty=1.5)
    gen = await engine.generate(st, 8, frozenset(), AT_TWO, sampling)
    c1, c2 = others(fake, list(gen.ids[:1]))
    before = len(fake.requests)
    await engine.score(st, [c1, c2])
    sent = fake.requests[before:]
    assert len(sent) == 2 and all(r["sampling_params"]["max_tokens"] == 1 for r in sent)
    await engine.commit(st, c1)
    before = len(fake.requests)
    nxt = await engine.generate(st, 8, frozenset(), AT_TWO, sampling)
    [asked] = fake.requests[before:]  # vLLM picks the next tokens, penalised
    assert asked["token_ids"] == context + c1 and nxt.reused == 0
    if kind == "remote":  # the in-process fake records only some fields
        assert asked["sampling_params"]["presence_penalty"] == 1.5
    await engine.release(st)
