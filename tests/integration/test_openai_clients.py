"""The official OpenAI SDK (sync and async) and curl against `fusion-server serve` on
loopback, with the three real default models."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.fixtures.processes import free_port, launch

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def server_url(model_dirs) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "FUSION_SERVER__MAX_CONCURRENT": "2"}
    args = ["server", "serve", "--config", "config.yaml", "--port", str(port)]
    proc, url = launch(args, port, env=env)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_sync_sdk_plain_and_streamed_answers_are_equal(server_url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    assert "fusion" in [m.id for m in client.models.list().data]
    plain = client.chat.completions.create(model="fusion", messages=MESSAGES, max_tokens=16)
    text = plain.choices[0].message.content
    assert text and plain.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="fusion",
        messages=MESSAGES,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_async_sdk_streams_completions_and_traces(server_url):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused")
    stream = await client.completions.create(
        model="fusion", prompt="The capital of France is", max_tokens=6, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream])
    assert "Paris" in text
    traced = await client.chat.completions.create(
        model="fusion",
        messages=MESSAGES,
        max_tokens=8,
        extra_body={"fusion": {"trace": True, "method": "cool"}},
    )
    segments = traced.model_dump()["choices"][0]["fusion"]["segments"]
    assert segments and all(s["candidates"] for s in segments)
    single = await client.chat.completions.create(
        model="qwen2.5-0.5b", messages=MESSAGES, max_tokens=8
    )
    assert single.choices[0].message.content


def test_curl_streams_sse_until_done(server_url):
    body = json.dumps({"model": "fusion", "messages": MESSAGES, "max_tokens": 8, "stream": True})
    proc = subprocess.run(
        [
            "curl",
            "-sN",
            f"{server_url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_sdk_sees_openai_errors(server_url):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="fusion", messages=MESSAGES, max_tokens=-5)
    assert err.value.status_code == 400


def test_the_sdk_gets_a_voted_answer_from_the_real_models(server_url):
    """fusion-vote (config.yaml) on the three real models: Qwen samples first, and the
    answer returned is one whose last number is the winning key."""
    import openai
    from openai import OpenAI

    from fusion.answers import last_number

    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    card = next(m for m in client.models.list().data if m.id == "fusion-vote")
    assert card.model_extra["fusion"]["method"] == "vote"
    question = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many now?"}]
    answer = client.chat.completions.create(
        model="fusion-vote",
        messages=question,
        max_tokens=48,
        extra_body={"fusion": {"trace": True}},
    )
    text = answer.choices[0].message.content
    vote = answer.choices[0].model_extra["fusion"]["segments"][0]["vote"]
    samples = vote["samples"]
    assert len(samples) >= 4 and {s["model"] for s in samples[:4]} == {"qwen2.5-0.5b"}
    assert len(samples) <= 8  # the budget
    assert vote["key"] is None or last_number(text) == vote["key"]
    if vote["key"] is not None:
        assert vote["tally"][vote["key"]] == max(vote["tally"].values())
    # the tally counts each sample's key with its member's weight (config.yaml's)
    weights = {"qwen2.5-0.5b": 2.59, "smollm2-135m": 0.29, "gemma3-270m": 0.12}
    expected: dict[str, float] = {}
    for s in samples:
        if s["key"] is not None:
            expected[s["key"]] = expected.get(s["key"], 0.0) + weights[s["model"]]
    assert vote["tally"] == pytest.approx(expected)
    assert answer.usage.model_extra["models"]["qwen2.5-0.5b"]["generated_tokens"] > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="fusion", messages=question, extra_body={"fusion": {"method": "vote"}}
        )
    assert "last_number" in str(err.value)
