"""The HTTP API in-process: shapes, streaming, errors, limits (scripted engines)."""

from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SCRIPT

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "hi"}]}


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


async def test_models_lists_the_fused_model_and_every_source(client):
    async with client() as http:
        r = await http.get("/v1/models")
        ids = [m["id"] for m in r.json()["data"]]
        assert ids == ["fusion", "smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
        assert (await http.get("/v1/models/qwen2.5-0.5b")).json()["id"] == "qwen2.5-0.5b"
        missing = await http.get("/v1/models/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


async def test_chat_completion_shape_and_usage(client):
    async with client() as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": SCRIPT}
        assert choice["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert set(usage["models"]) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}
        assert all(m["generated_tokens"] > 0 for m in usage["models"].values())


async def test_unknown_fields_ignored_nulls_accepted_and_text_parts_joined(client):
    async with client() as http:
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "fusion",
                "frobnicate": 3,
                "max_tokens": None,
                "stop": None,
                "seed": None,
                "temperature": 0,
                "stream_options": None,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ],
            },
        )
        assert r.status_code == 200, r.text


async def test_bad_requests_get_400_with_the_openai_envelope(client):
    cases = [
        {"model": "fusion"},
        {"model": "fusion", "messages": []},
        {"model": "fusion", "messages": [{"role": "wizard", "content": "x"}]},
        {**CHAT, "max_tokens": -1},
        {**CHAT, "max_tokens": "many"},
        {**CHAT, "n": 0},
        {**CHAT, "temperature": 7},
        {**CHAT, "max_tokens": 10**9},
        {**CHAT, "logprobs": True},
        {**CHAT, "fusion": {"method": "vote"}},
        {**CHAT, "fusion": {"models": ["nope"]}},
        {**CHAT, "fusion": {"models": ["qwen2.5-0.5b", "qwen2.5-0.5b"]}},
        {**CHAT, "seed": 2**63},  # vLLM's range: a 64-bit signed integer
        {
            "model": "fusion",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
    ]
    async with client() as http:
        for case in cases:
            r = await http.post("/v1/chat/completions", json=case)
            assert r.status_code == 400, (case, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error"
        r = await http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
        assert r.status_code == 404


async def test_logprobs_refusal_says_why(client):
    async with client() as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "logprobs": True})
        assert "tokenizers" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "logprobs"


async def test_completions_with_prompt_list_n_and_echo(client):
    async with client() as http:
        r = await http.post(
            "/v1/completions",
            json={"model": "fusion", "prompt": ["A", "B"], "n": 2, "echo": True, "max_tokens": 4},
        )
        body = r.json()
        assert body["object"] == "text_completion"
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        assert body["choices"][0]["text"].startswith("A")
        assert body["choices"][2]["text"].startswith("B")
        assert all(c["finish_reason"] == "length" for c in body["choices"])
        bad = await http.post("/v1/completions", json={"model": "fusion", "prompt": [1, 2]})
        assert bad.status_code == 400 and "token-id" in bad.json()["error"]["message"]
        empty = await http.post("/v1/completions", json={"model": "fusion", "prompt": []})
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
        # regression (issue 21, item 7): an empty prompt got a 503 or one model's answer
        for prompt in ("", ["A", ""]):
            empty = await http.post("/v1/completions", json={"model": "fusion", "prompt": prompt})
            assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
        # regression (issue 21, item 7): streamed, the echo was dropped
        body = {"model": "fusion", "prompt": ["A", "B"], "echo": True, "max_tokens": 4}
        streamed = await http.post("/v1/completions", json={**body, "stream": True})
        texts = {0: "", 1: ""}
        for e in sse_events(streamed.text)[:-1]:
            c = json.loads(e)["choices"][0]
            texts[c["index"]] += c["text"]
        whole = (await http.post("/v1/completions", json=body)).json()["choices"]
        assert [texts[0], texts[1]] == [c["text"] for c in whole]
        assert texts[0].startswith("A") and texts[1].startswith("B")


async def test_stop_string_spanning_segments_is_cut_and_not_emitted(client):
    async with client() as http:
        body = {**CHAT, "stop": ["mat. It"]}
        r = await http.post("/v1/chat/completions", json=body)
        assert r.json()["choices"][0]["message"]["content"] == "The cat sat on the "
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
        text = "".join(
            json.loads(e)["choices"][0]["delta"].get("content", "")
            for e in sse_events(streamed.text)[:-1]
            if json.loads(e)["choices"]
        )
        assert text == "The cat sat on the "


async def test_stream_chunks_one_per_segment_and_equal_the_plain_answer(client):
    async with client() as http:
        plain = (await http.post("/v1/chat/completions", json=CHAT)).json()
        streamed = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        r = await http.post("/v1/chat/completions", json=streamed)
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("x-accel-buffering") == "no"
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        content = [c for c in chunks[1:] if c["choices"] and "content" in c["choices"][0]["delta"]]
        assert len(content) >= 8  # one per segment, not one blob
        assert (
            "".join(c["choices"][0]["delta"]["content"] for c in content)
            == plain["choices"][0]["message"]["content"]
        )
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        no_usage = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert all(json.loads(e).get("usage") is None for e in sse_events(no_usage.text)[:-1])


async def test_trace_carries_candidates_and_perplexities(client, trio):
    models = trio()
    models[1] = trio("The cat sat on the rug. It was warm.")[1]
    async with client(models=models) as http:
        body = {**CHAT, "fusion": {"trace": True}}
        plain = (await http.post("/v1/chat/completions", json=body)).json()
        segments = plain["choices"][0]["fusion"]["segments"]
        split = next(s for s in segments if len(s["candidates"]) > 1)
        assert {c["text"] for c in split["candidates"]} == {" mat.", " rug."}
        assert set(split["candidates"][0]["perplexities"]) == {
            "smollm2-135m",
            "gemma3-270m",
            "qwen2.5-0.5b",
        }
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
        traced = [json.loads(e) for e in sse_events(streamed.text)[1:-2]]
        assert all("fusion" in c["choices"][0] for c in traced)


async def test_single_source_model_by_name(client):
    async with client() as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "gemma3-270m"})
        usage = r.json()["usage"]["models"]
        assert list(usage) == ["gemma3-270m"]


async def test_api_keys_guard_v1_but_not_health(client):
    async with client(api_keys=["s3cret"]) as http:
        assert (await http.get("/health")).status_code == 200
        r = await http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


async def test_oversized_body_is_413(client):
    async with client(max_body_bytes=2048) as http:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = await http.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        # regression (issue 21, item 7): chunked, with no content-length, it was a 400
        async def chunks():
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        r = await http.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        small = json.dumps(CHAT).encode()

        async def one_chunk():
            yield small

        r = await http.post(
            "/v1/chat/completions",
            content=one_chunk(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text


def with_limits(models, limits):
    return [m.__class__(**{**m.__dict__, "max_model_len": n}) for m, n in zip(models, limits)]


def prompt_len(model) -> int:
    return len(model.chat_prompt_ids(tuple(CHAT["messages"])))


async def test_context_length_exceeded(client, trio):
    models = with_limits(trio(), [64, 64, 64])
    async with client(models=models) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_context_length_is_checked_in_every_models_own_tokens(client, trio):
    """Only the last model's context is too short: the 400 names it, before the first byte."""
    models = trio()
    limits = [4096, 4096, prompt_len(models[2]) + 10]
    async with client(models=with_limits(models, limits)) as http:
        for stream in (False, True):
            body = {**CHAT, "max_tokens": 20, "stream": stream}
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
            assert "qwen2.5-0.5b" in err["message"] and str(limits[2]) in err["message"]


async def test_without_max_tokens_a_prompt_that_leaves_room_is_served(client, trio):
    """Regression: the server's default max_tokens (256) counted as asked for, so a prompt
    that fit every model was refused; as in vLLM, the default is cut to the room left, and
    only a prompt that leaves no room for generation is refused."""
    models = trio()
    room = 4
    limits = [prompt_len(m) + room for m in models]
    async with client(models=with_limits(models, limits)) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert 0 < r.json()["usage"]["completion_tokens"] <= room
    full = [4096, prompt_len(models[1]), 4096]
    async with client(models=with_limits(trio(), full)) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "gemma3-270m" in err["message"]


async def test_full_queue_answers_429_with_retry_after(client, trio):
    async with client(models=trio(delay=0.05), max_concurrent=1, max_queue=0) as http:
        first = asyncio.ensure_future(http.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.1)
        second = await http.post("/v1/chat/completions", json=CHAT)
        assert second.status_code == 429 and second.headers["retry-after"]
        assert (await first).status_code == 200


async def test_concurrent_requests_are_all_served(client, trio):
    async with client(models=trio(delay=0.01), max_concurrent=4) as http:
        rs = await asyncio.gather(*(http.post("/v1/chat/completions", json=CHAT) for _ in range(4)))
        assert [r.status_code for r in rs] == [200] * 4
        assert len({r.json()["choices"][0]["message"]["content"] for r in rs}) == 1


async def test_engine_failure_mid_stream_is_an_error_event_then_done(client, trio):
    async with client(models=trio(fail_at_call=6)) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "engine_unavailable" and "failed" in err["message"]
        plain = await http.post("/v1/chat/completions", json=CHAT)
        assert plain.status_code == 503


async def test_one_failing_model_does_not_fail_the_request(client, trio):
    models = trio()
    models[1] = trio(fail_at_call=4)[1]
    async with client(models=models) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == SCRIPT
        assert "dropped" in r.json()["usage"]["models"]["gemma3-270m"]


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) of every sample called ``name`` in a Prometheus exposition."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


async def test_metrics_count_requests_segments_and_wins(client):
    """Regression: the token assertion also held for a fresh ``Metrics()`` without traffic."""
    async with client() as http:
        await http.post("/v1/chat/completions", json=CHAT)
        text = (await http.get("/metrics")).text
    requests = samples(text, "fusion_requests_total")
    assert requests == [({"endpoint": "chat", "model": "fusion", "status": "200"}, 1.0)]
    assert sum(v for _, v in samples(text, "fusion_segment_wins_total")) > 0
    assert sum(v for _, v in samples(text, "fusion_step_seconds_count")) > 0
    assert sum(v for _, v in samples(text, "fusion_tokens_total")) > 0
    generated = [
        v
        for labels, v in samples(text, "fusion_source_tokens_total")
        if labels["kind"] == "generated"
    ]
    assert len(generated) == 3 and all(v > 0 for v in generated)


async def test_metrics_label_the_requested_model_and_the_method_separately(client):
    """Regression: ``fusion_tokens{model="cool"}`` put the method where a model name belongs."""
    async with client() as http:
        await http.post("/v1/chat/completions", json=CHAT)
        await http.post("/v1/chat/completions", json={**CHAT, "model": "gemma3-270m"})
        text = (await http.get("/metrics")).text
    for name in ("fusion_tokens_total", "fusion_segments_total"):
        series = {(labels["model"], labels["method"]): v for labels, v in samples(text, name)}
        assert set(series) == {("fusion", "cool"), ("gemma3-270m", "cool")}, name
        assert all(v > 0 for v in series.values()), name
    sources = {labels["source"] for labels, _ in samples(text, "fusion_source_tokens_total")}
    assert sources == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}
