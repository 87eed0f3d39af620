"""Requests with several choices (prompt lists × n): limits, capacity, seeds, usage,
concurrent streaming."""

from __future__ import annotations

import asyncio
import json

import httpx

from fusion.engine import GREEDY, EngineError
from fusion.models import ChatTemplate, SourceModel
from tests.conftest import SCRIPT, TEMPLATE
from tests.fusion.fake_engine import ScriptedEngine
from tests.server.test_api import sse_events

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "hi"}]}
NAMES = ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")


class SeedWriter(ScriptedEngine):
    """Sampling (temperature > 0), it writes the seed it was given: the engine boundary
    shows which seed each choice's model sampled with."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.seeds: list[int | None] = []

    async def generate(self, state, max_tokens, stop_ids, should_stop, sampling=GREEDY):
        if not sampling.greedy:
            self.seeds.append(sampling.seed)
            state.script = f"Sampled with seed {sampling.seed}."
        return await super().generate(state, max_tokens, stop_ids, should_stop, sampling)

    def _rest(self, st):
        script = getattr(st, "script", self.script)
        written = self._written(st)
        if not script.startswith(written):
            return None
        return self.adapter.encode(script)[len(self.adapter.encode(written)) :]


def seed_writers(adapters) -> list[SourceModel]:
    models = []
    for name in NAMES:
        end = adapters[name].eos_ids[0]
        engine = SeedWriter(name, adapters[name], SCRIPT, end_id=end)
        models.append(
            SourceModel(name, engine, adapters[name], ChatTemplate(TEMPLATE), chat_end_id=end)
        )
    return models


async def test_too_many_choices_is_a_400_that_names_the_limit(client):
    async with client(max_choices=4) as http:
        r = await http.post(
            "/v1/completions", json={"model": "fusion", "prompt": ["a", "b", "c"], "n": 2}
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "n"
        assert "6 choices" in err["message"] and "at most 4" in err["message"]
        assert (await http.post("/v1/chat/completions", json={**CHAT, "n": 5})).status_code == 400
        ok = await http.post("/v1/chat/completions", json={**CHAT, "n": 4, "max_tokens": 4})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


async def test_each_choice_counts_against_capacity(client, trio):
    """Regression: a request's choices all ran under one admission slot."""
    async with client(models=trio(delay=0.05), max_concurrent=2, max_queue=0) as http:
        first = asyncio.ensure_future(http.post("/v1/chat/completions", json={**CHAT, "n": 2}))
        await asyncio.sleep(0.1)
        second = await http.post("/v1/chat/completions", json=CHAT)
        assert second.status_code == 429  # both slots are the first request's
        assert (await first).status_code == 200
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_more_choices_than_capacity_run_alone(client, trio):
    async with client(models=trio(delay=0.01), max_concurrent=2, max_queue=1) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "n": 3, "max_tokens": 4})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3


async def test_usage_counts_each_prompt_once_not_once_per_choice(client, trio):
    """Regression: prompt_tokens was the first choice's prompt × the number of choices."""
    models = trio()
    first = models[0]
    prompts = ["A", "A much longer prompt, with many more tokens than the first one"]
    expected = sum(len(first.completion_prompt_ids(p)) for p in prompts)
    async with client(models=models) as http:
        r = await http.post(
            "/v1/completions", json={"model": "fusion", "prompt": prompts, "n": 2, "max_tokens": 4}
        )
        assert r.json()["usage"]["prompt_tokens"] == expected
        one = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
        three = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4, "n": 3})
        assert three.json()["usage"]["prompt_tokens"] == one.json()["usage"]["prompt_tokens"] > 0
        usage = three.json()["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_n_choices_with_a_seed_differ_and_repeat(client, default_adapters):
    """Regression: with a seed, all n choices sampled with the same seed (identical)."""
    models = seed_writers(default_adapters)
    body = {**CHAT, "n": 3, "seed": 7, "temperature": 0.8, "max_tokens": 32}
    async with client(models=models) as http:
        r = await http.post("/v1/chat/completions", json=body)
        texts = [c["message"]["content"] for c in r.json()["choices"]]
        assert len(set(texts)) == 3, texts
        for k, m in enumerate(models):
            # choice j, model k: seed + j × 3 (models) + k; the first choice keeps the seed
            assert set(m.engine.seeds) == {7 + k, 10 + k, 13 + k}, m.name
        again = await http.post("/v1/chat/completions", json=body)
        assert [c["message"]["content"] for c in again.json()["choices"]] == texts
        single = await http.post("/v1/chat/completions", json={**body, "model": "gemma3-270m"})
        alone = [c["message"]["content"] for c in single.json()["choices"]]
        assert alone == [f"Sampled with seed {s}." for s in (7, 8, 9)]


async def test_streamed_choices_run_concurrently_and_interleave(client, trio):
    """Regression: with n > 1 the streamed choices ran one after another."""
    async with client(models=trio(delay=0.01)) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True})
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    order = [c["choices"][0]["index"] for c in chunks]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # 1 starts before 0 ends
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == SCRIPT
        assert mine[-1]["finish_reason"] == "stop"


async def test_a_client_leaving_a_streamed_n_request_stops_every_choice(live_server, trio):
    models = trio("one two three four five six seven eight nine ten " * 8, delay=0.02)
    body = {**CHAT, "n": 2, "stream": True, "max_tokens": 200}
    async with live_server(models) as url, httpx.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if '"content": "one"' in line:
                    break
        await asyncio.sleep(0.5)
        done = [len(m.engine.commits) for m in models]
        await asyncio.sleep(0.5)
        assert [len(m.engine.commits) for m in models] == done  # nothing runs any more
        for m in models:
            assert len(m.engine.states) == 2, m.name  # both choices had started
            assert all(s.released for s in m.engine.states), m.name


class FailsOneChoice(ScriptedEngine):
    """Fails the generation of the choice sampled from ``seed`` (all of its models do,
    so that choice fails), and is slow for every other choice."""

    def __init__(self, *args, fail_seeds=(), **kw) -> None:
        super().__init__(*args, **kw)
        self.fail_seeds = set(fail_seeds)

    async def generate(self, state, max_tokens, stop_ids, should_stop, sampling=GREEDY):
        if sampling.seed in self.fail_seeds:
            raise EngineError(f"{self.name} failed for seed {sampling.seed}")
        return await super().generate(state, max_tokens, stop_ids, should_stop, sampling)


async def test_a_failing_choice_stops_the_others_before_the_error_answer(client, default_adapters):
    """Regression (issue 21, item 5): with several choices, one failing choice answered
    the error while the others went on running, their engine states held, the admission
    permit already given back and their exceptions never retrieved."""
    models = []
    for k, name in enumerate(NAMES):
        end = default_adapters[name].eos_ids[0]
        engine = FailsOneChoice(
            name, default_adapters[name], SCRIPT * 8, end_id=end, delay=0.05, fail_seeds={7 + k}
        )
        models.append(
            SourceModel(
                name, engine, default_adapters[name], ChatTemplate(TEMPLATE), chat_end_id=end
            )
        )
    body = {**CHAT, "n": 3, "seed": 7, "temperature": 0.8, "max_tokens": 200}
    async with client(models=models, max_concurrent=3) as http:
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and "every source model failed" in r.text
        for m in models:  # at the moment the answer came, nothing was left running
            assert len(m.engine.states) == 3 and all(s.released for s in m.engine.states)
        calls = [m.engine.calls for m in models]
        await asyncio.sleep(0.3)
        assert [m.engine.calls for m in models] == calls
        assert http.app.state.fusion.admission.fused.free == 3


async def test_a_negative_seed_is_taken_and_wrapped(client, default_adapters):
    """OpenAI's API takes any integer seed: -3 samples as 2**63 - 3 does, everywhere."""
    models = seed_writers(default_adapters)
    body = {**CHAT, "seed": -3, "temperature": 0.8, "max_tokens": 32}
    async with client(models=models) as http:
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    assert set(models[0].engine.seeds) == {2**63 - 3} and set(models[1].engine.seeds) == {2**63 - 2}
