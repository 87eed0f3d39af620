"""One round trip per model per step: scoring requests also generate the look-ahead.

Both vLLM engines, each against a fake at its boundary (``vllm_fakes.py``): the remote
one against ``FakeVllm`` over HTTP, the in-process one with ``FakeAsyncLLM`` as its
``AsyncLLM``. Both record requests in the wire's shape, so every test runs on both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fusion.engine import Generation, Sampling
from fusion.engines.vllm_logprobs import LookAhead
from fusion.engines.vllm_remote_engine import VllmRemoteEngine
from tests.fusion.engines.vllm_fakes import FakeAsyncLLM, FakeVllm

URL = "http://vllm-a.test:8000"
NEVER = lambda ids: False  # noqa: E731
AT_TWO = lambda ids: len(ids) >= 2  # noqa: E731  (a segment boundary after two tokens)


async def make(kind: str, fake: FakeVllm, tok_dir: Path, lookahead: int | None = None) -> Any:
    """A started engine of ``kind`` on ``fake`` (``lookahead`` None: the default)."""
    opts = {} if lookahead is None else {"score_lookahead_tokens": lookahead}
    if kind == "remote":
        engine = VllmRemoteEngine(
            "remote-a",
            tok_dir,
            url=URL,
            transport=httpx.MockTransport(fake.handle),
            retries=0,
            start_timeout_seconds=0.1,
            **opts,
        )
        await engine.start()
        return engine
    from fusion.engines.vllm_engine import VllmEngine

    engine = VllmEngine("local-a", tok_dir, opts)
    engine._llm = FakeAsyncLLM(fake)  # the AsyncLLM ``start`` would build
    engine.max_model_len = 512
    return engine


KINDS = pytest.mark.parametrize("kind", ["remote", "in-process"])


def is_scoring(request: dict[str, Any]) -> bool:
    return request["sampling_params"].get("prompt_logprobs") is not None


def greedy(fake: FakeVllm, prefix: list[int], n: int) -> list[int]:
    return [t for t, _ in fake._sample(prefix, {"max_tokens": n})]


def others(fake: FakeVllm, own: list[int]) -> tuple[list[int], list[int]]:
    """Two candidates that differ from ``own`` and from each other."""
    words = [w for w in fake.words if w not in own[:1]]
    return [words[0]], [words[1], words[2]]


@KINDS
async def test_a_step_is_one_request_per_candidate_and_the_winner_needs_none(kind, fake, tok_dir):
    engine = await make(kind, fake, tok_dir)
    context = fake.words[:6]
    st = await engine.open("step", context)
    gen = await engine.generate(st, 8, frozenset({2}), AT_TWO)
    own = list(gen.ids[:1])
    c1, c2 = others(fake, own)
    before = len(fake.requests)
    got = await engine.score(st, [c1, c2])  # the step's candidates: own, c1, c2
    sent = fake.requests[before:]
    assert len(sent) == 3, sent  # one per candidate, all in one round
    scoring = [r for r in sent if is_scoring(r)]
    assert [r["token_ids"] for r in scoring] == [context + c1, context + c2]
    assert all(r["sampling_params"]["max_tokens"] == 4 for r in scoring)
    assert all(r["sampling_params"]["stop_token_ids"] == [2] for r in scoring)
    [more] = [r for r in sent if not is_scoring(r)]  # its own candidate, continued
    assert more["token_ids"] == context + list(gen.ids) and not more["stream"]
    assert got == [fake.expected(context, c1), fake.expected(context, c2)]

    await engine.commit(st, c1)
    before = len(fake.requests)
    nxt = await engine.generate(st, 8, frozenset({2}), AT_TWO)
    assert len(fake.requests) == before  # no generation request for the next segment
    want = greedy(fake, context + c1, 2)
    assert list(nxt.ids) == want and nxt.reused == 2
    assert list(nxt.logprobs) == fake.expected(context + c1, want)
    await engine.release(st)


@KINDS
async def test_when_its_own_candidate_wins_its_continued_look_ahead_is_replayed(
    kind, fake, tok_dir
):
    engine = await make(kind, fake, tok_dir)
    context = fake.words[:6]
    st = await engine.open("own", context)
    gen = await engine.generate(st, 8, frozenset(), AT_TWO)
    own = list(gen.ids[:1])
    await engine.score(st, list(others(fake, own)))
    await engine.commit(st, own)
    before = len(fake.requests)
    nxt = await engine.generate(st, 8, frozenset(), lambda ids: len(ids) >= 4)
    assert len(fake.requests) == before
    assert list(nxt.ids) == greedy(fake, context + own, 4) and nxt.reused == 4
    await engine.release(st)


@KINDS
async def test_a_losing_candidates_look_ahead_is_never_used(kind, fake, tok_dir):
    engine = await make(kind, fake, tok_dir)
    context = fake.words[:6]
    st = await engine.open("lose", context)
    gen = await engine.generate(st, 8, frozenset(), AT_TWO)
    c1, c2 = others(fake, list(gen.ids[:1]))
    await engine.score(st, [c1, c2])
    await engine.commit(st, c2)
    nxt = await engine.generate(st, 8, frozenset(), AT_TWO)
    assert list(nxt.ids) == greedy(fake, context + c2, 2) != greedy(fake, context + c1, 2)

    # a winner this model neither wrote nor scored: nothing is replayed
    d = [w for w in fake.words if w != nxt.ids[0]][:1]
    await engine.score(st, [d])
    c3 = [w for w in fake.words if w not in (nxt.ids[0], d[0])][:1]
    await engine.commit(st, c3)
    before = len(fake.requests)
    fresh = await engine.generate(st, 8, frozenset(), AT_TWO)
    [asked] = fake.requests[before:]
    assert asked["token_ids"] == context + c2 + c3 and asked["stream"]
    assert fresh.reused == 0
    assert list(fresh.ids) == greedy(fake, context + c2 + c3, 2)
    await engine.release(st)


async def _run_steps(engine: Any, fake: FakeVllm) -> list[Generation]:
    """A fixed sequence of steps: stop ids and stop checks that fall inside the
    look-ahead, token caps, own and scored winners. The same calls on any engine."""
    context = fake.words[2:8]
    st = await engine.open("same", context)
    out = []
    for step in range(8):
        ahead = greedy(fake, st.ids, 6)
        stop_ids = frozenset({ahead[2]}) if step == 3 else frozenset({5000})
        check: Callable[[list[int]], bool] = NEVER if step == 3 else AT_TWO
        if step == 4:
            check = lambda ids, t=ahead[1]: ids[-1] == t  # noqa: E731  (a stop string)
        cap = 1 if step == 5 else 8
        gen = await engine.generate(st, cap, stop_ids, check)
        out.append(gen)
        own = list(gen.ids[:1])
        c1, c2 = others(fake, own)
        await engine.score(st, [c1, c2])
        await engine.commit(st, (own, c1, c2)[step % 3])
    await engine.release(st)
    return out


@KINDS
async def test_generations_are_the_same_with_the_look_ahead_on_and_off(kind, tokenizer, tok_dir):
    """Stop ids, stop checks and the token cap end a replayed look-ahead exactly where
    they ended a fresh generation before; only the requests differ."""
    on, off = FakeVllm(tokenizer), FakeVllm(tokenizer)
    with_look = await _run_steps(await make(kind, on, tok_dir), on)
    without = await _run_steps(await make(kind, off, tok_dir, lookahead=0), off)
    assert [(g.ids, g.logprobs, g.stopped_on) for g in with_look] == [
        (g.ids, g.logprobs, g.stopped_on) for g in without
    ]
    assert with_look[3].stopped_on is not None and len(with_look[5].ids) == 1
    streams = lambda fake: sum(bool(r.get("stream")) for r in fake.requests)  # noqa: E731
    # generation requests: the first step, and after the answer "ended" (stop id, cap);
    # off, every step whose segment the kept look-ahead did not cover
    assert streams(on) == 2 and streams(off) == 6
    assert sum(g.reused for g in with_look) > sum(g.reused for g in without)


@KINDS
async def test_look_ahead_off_sends_the_requests_it_sent_before(kind, fake, tok_dir):
    engine = await make(kind, fake, tok_dir, lookahead=0)
    context = fake.words[:6]
    st = await engine.open("off", context)
    gen = await engine.generate(st, 8, frozenset({2}), AT_TWO)
    c1, c2 = others(fake, list(gen.ids[:1]))
    before = len(fake.requests)
    await engine.score(st, [c1, c2])
    sent = fake.requests[before:]
    assert len(sent) == 2 and all(is_scoring(r) for r in sent)
    assert all(r["sampling_params"]["max_tokens"] == 1 for r in sent)
    assert not any(r["sampling_params"].get("stop_token_ids") for r in sent)
    await engine.commit(st, c1)
    before = len(fake.requests)
    nxt = await engine.generate(st, 8, frozenset({2}), AT_TWO)
    [asked] = fake.requests[before:]
    assert asked["stream"] and asked["token_ids"] == context + c1 + greedy(fake, context + c1, 1)
    assert nxt.reused == 1
    await engine.release(st)


@KINDS
async def test_a_sampling_request_keeps_the_requests_it_sent_before(kind, fake, tok_dir):
    engine = await make(kind, fake, tok_dir)
    context = fake.words[:6]
    st = await engine.open("sampled", context)
    sampling = Sampling(temperature=0.8, seed=3)
    gen = await engine.generate(st, 8, frozenset(), AT_TWO, sampling)
    c1, c2 = others(fake, list(gen.ids[:1]))
    before = len(fake.requests)
    await engine.score(st, [c1, c2])
    sent = fake.requests[before:]
    assert len(sent) == 2 and all(r["sampling_params"]["max_tokens"] == 1 for r in sent)
    await engine.commit(st, c1)
    before = len(fake.requests)
    nxt = await engine.generate(st, 8, frozenset(), AT_TWO, sampling)
    [asked] = fake.requests[before:]  # the greedy scoring token is not replayed
    assert asked["token_ids"] == context + c1 and nxt.reused == 0
    assert asked["sampling_params"]["seed"] == 3 + len(context + c1)
    await engine.release(st)


async def test_a_failed_look_ahead_request_leaves_the_scores(fake, tok_dir):
    engine = await make("remote", fake, tok_dir)
    context = fake.words[:6]
    st = await engine.open("fail", context)
    gen = await engine.generate(st, 8, frozenset(), AT_TWO)
    own = list(gen.ids[:1])
    c1, c2 = others(fake, own)

    def no_continuation(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | None:
        sp = body.get("sampling_params") or {}
        if request.url.path.endswith("/generate") and "prompt_logprobs" not in sp:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        return None

    fake.fault = no_continuation
    got = await engine.score(st, [c1, c2])
    assert got == [fake.expected(context, c1), fake.expected(context, c2)]
    fake.fault = None
    await engine.commit(st, own)
    before = len(fake.requests)
    nxt = await engine.generate(st, 8, frozenset(), lambda ids: len(ids) >= 3)
    assert len(fake.requests) == before + 1  # asks for what the look-ahead lacks
    assert list(nxt.ids) == greedy(fake, context + own, 3)
    await engine.release(st)


def test_commit_keeps_the_longer_known_continuation_and_drops_the_others():
    look = LookAhead.after([1, 2])
    for tok in (5, 6):
        look.push(tok, {tok: -0.5, 9: -2.0})
    look.generated(2, True, frozenset())
    look.record_scored([5], [6, 7, 8], [{6: -0.1}, {7: -0.2}, {8: -0.3}])
    look.record_scored([4], [1, 2, 3], [{1: -0.1}, {2: -0.2}, {3: -0.3}])
    look.commit([5])  # its own text, and scored: the scoring request saw further
    assert look.ids == [6, 7, 8] and look.lps == [-0.1, -0.2, -0.3] and look.taken == 0
    assert not look.book.branches
    look.record_scored([1], [2, 3], [{2: -0.1}, {3: -0.1}])
    look.commit([6])  # its own text only: the scored [1] lost
    assert look.ids == [7, 8] and look.next_top == {7: -0.2}
    look.commit([9])  # neither: nothing is known after it
    assert look.ids == [] and look.next_top == {}


async def _fuse(
    tokenizer: Any, tok_dir: Path, lookahead: int
) -> tuple[Any, list[Any], list[FakeVllm]]:
    from fusion.loop import Fuser
    from fusion.models import build_source_model
    from fusion.types import FusionOutcome, FusionParams, Prompt

    fakes = [FakeVllm(tokenizer, salt=salt) for salt in (0, 3, 7)]
    models = [
        build_source_model(f"m{i}", await make("remote", f, tok_dir, lookahead), tok_dir)
        for i, f in enumerate(fakes)
    ]
    for f in fakes:
        f.requests.clear()  # the start-up probes
    outcome = FusionOutcome()
    run = Fuser(models).run(Prompt(text="Count:"), FusionParams(max_tokens=24), outcome)
    segments = [s async for s in run]
    return outcome, segments, fakes


async def test_a_fused_answer_is_the_same_with_one_round_trip_per_model_per_step(
    tokenizer, tok_dir
):
    on, segments, fakes_on = await _fuse(tokenizer, tok_dir, 4)
    off, _, fakes_off = await _fuse(tokenizer, tok_dir, 0)
    assert on.text == off.text and on.text.strip()
    assert all(len(s.candidates) == 3 for s in segments) and len(segments) > 10
    # every step: one request per candidate each model did not write (its scores and the
    # tokens after it) and one continuing its own; generation only at the first step
    for on_, off_ in zip(fakes_on, fakes_off):
        assert sum(bool(r["stream"]) for r in on_.requests) == 1
        assert len(on_.requests) <= 1 + 3 * len(segments)
        assert sum(bool(r["stream"]) for r in off_.requests) >= len(segments) - 2
