"""Structured outputs with real clients over real HTTP, against `make serve`'s default
config (the three packaged models on llama.cpp): the OpenAI SDK's ``parse`` with a
Pydantic model, for each member alone and for the fused model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from bench.extraction import Person, examples

pytestmark = pytest.mark.integration
MODELS = ("qwen2.5-0.5b", "smollm2-135m", "gemma3-270m", "fusion")


@pytest.fixture(scope="module")
def server_url(default_server_url: str) -> str:
    return default_server_url


async def test_sdk_parse_gives_a_parsed_object_for_every_member_and_the_fused_model(server_url):
    client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="none", max_retries=0)
    gate = asyncio.Semaphore(4)

    async def parse(model: str, prompt: str) -> tuple[str, Person | None, str | None]:
        async with gate:
            answer = await client.chat.completions.parse(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                response_format=Person,
                max_tokens=64,
            )
        choice = answer.choices[0]
        return model, choice.message.parsed, choice.finish_reason

    prompts = [e.prompt for e in examples(20)]
    results = await asyncio.gather(*(parse(m, p) for m in MODELS for p in prompts))
    for model in MODELS:
        mine = [(parsed, finish) for name, parsed, finish in results if name == model]
        assert len(mine) == 20
        assert all(isinstance(parsed, Person) for parsed, _ in mine), model
        assert all(finish == "stop" for _, finish in mine), model


def test_streamed_json_schema_answer_is_valid_json(server_url):
    client = OpenAI(base_url=f"{server_url}/v1", api_key="none", max_retries=0)
    schema = Person.model_json_schema()
    stream = client.chat.completions.create(
        model="fusion",
        messages=[{"role": "user", "content": examples(1)[0].prompt}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        max_tokens=64,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert set(json.loads(text)) == {"name", "age", "city"}


def test_vllm_structured_outputs_on_completions_and_chat(server_url):
    client = OpenAI(base_url=f"{server_url}/v1", api_key="none", max_retries=0)
    done = client.completions.create(
        model="fusion",
        prompt="Call me on ",
        max_tokens=12,
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
    )
    assert len(done.choices[0].text) == 8 and done.choices[0].text[3] == "-"
    chat = client.chat.completions.create(
        model="fusion",
        messages=[{"role": "user", "content": "Is water wet? Answer yes or no."}],
        max_tokens=4,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert chat.choices[0].message.content in ("yes", "no")


def test_a_bad_grammar_is_a_400_naming_the_field(server_url):
    answer = httpx.post(
        f"{server_url}/v1/chat/completions",
        json={
            "model": "fusion",
            "messages": [{"role": "user", "content": "x"}],
            "structured_outputs": {"regex": "("},
        },
        timeout=30,
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "structured_outputs" and "does not compile" in error["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "strict": True,  # its arguments and no others (the SDK's pydantic_function_tool's)
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("model", ["fusion", "smollm2-135m"])
def test_a_streamed_required_tool_call_parses(server_url, model):
    client = OpenAI(base_url=f"{server_url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
