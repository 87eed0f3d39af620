"""docs/API.md's field table against the OpenAI SDK's own request types, and against the
app: every field the SDK knows is in the table, every field marked refused gets a 400
that names it, every one supported or ignored is accepted (scripted engines)."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENDPOINTS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
}
BASE: dict[str, dict[str, Any]] = {
    "chat": {"model": "fusion", "messages": [{"role": "user", "content": "hi"}]},
    "completions": {"model": "fusion", "prompt": "hi", "max_tokens": 4},
    "responses": {"model": "fusion", "input": "hi", "max_output_tokens": 4},
}
SOURCE = "qwen2.5-0.5b"  # a source model by name: where logit_bias and logprobs are honoured
ONE_VOCABULARY = ("logit_bias", "logprobs", "top_logprobs")  # token ids of one model
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
RESPONSES_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object"}}

# a value that asks for something, per field the table marks refused somewhere
REFUSED_EXAMPLES: dict[str, Any] = {
    "add_generation_prompt": False,
    "allowed_token_ids": [1, 2],
    "audio": {"voice": "alloy", "format": "mp3"},
    "background": True,
    "background_options": {"completion_window": "soonest"},
    "bad_words": ["cat"],
    "best_of": 3,
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": False},
    "context_management": [{"type": "compaction"}],
    "continue_final_message": True,
    "conversation": "conv_1",
    "echo": True,
    "function_call": "auto",
    "functions": [TOOL["function"]],
    "ignore_eos": True,
    "include": ["message.output_text.logprobs"],
    "include_stop_str_in_output": True,
    "length_penalty": 0.5,
    "min_tokens": 3,
    "modalities": ["text", "audio"],
    "moderation": {"model": "omni-moderation-latest"},
    "previous_response_id": "resp_1",
    "prompt": {"id": "pmpt_1"},
    "prompt_logprobs": 1,
    "reasoning": {"effort": "low"},
    "reasoning_effort": "low",
    "stop_token_ids": [2],
    "store": True,
    "suffix": " end",
    "tool_choice": "required",
    "tools": [RESPONSES_TOOL],
    "top_logprobs": 2,
    "truncate_prompt_tokens": 8,
    "truncation": "auto",
    "use_beam_search": True,
    "verbosity": "low",
    "web_search_options": {},
}
# values that ask for nothing, accepted where the field is refused otherwise
INERT = {
    "chat": {
        "store": False,
        "functions": [],
        "function_call": "none",
        "modalities": ["text"],
        "add_generation_prompt": True,
        "echo": False,
        "best_of": 1,
        "min_tokens": 0,
    },
    "completions": {"suffix": "", "best_of": 1, "ignore_eos": False, "stop_token_ids": []},
    "responses": {
        "store": False,
        "background": False,
        "context_management": [],
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "none"},
        "top_logprobs": 0,
        "truncation": "disabled",
    },
}
# a value to send, per field the table marks supported or ignored (other than the base)
ACCEPTED_EXAMPLES: dict[str, Any] = {
    "access_programs": {"cyber": "standard"},
    "echo": True,
    "frequency_penalty": 0.5,
    "fusion": {"trace": True},
    "image": {"context_compression": "auto"},
    "instructions": "Be brief.",
    "logit_bias": {"5": 2.0},
    "logprobs": {"chat": True, "completions": 1},
    "max_completion_tokens": 8,
    "max_output_tokens": 8,
    "max_tokens": 8,
    "max_tool_calls": 2,
    "metadata": {"k": "v"},
    "min_p": 0.1,
    "n": 2,
    "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "The cat"},
    "presence_penalty": -0.5,
    "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "explicit"},
    "prompt_cache_retention": "24h",
    "repetition_penalty": 1.2,
    "response_format": {"type": "text"},
    "safety_identifier": "someone",
    "seed": 7,
    "service_tier": "flex",
    "stop": ["\n\n"],
    "stream": True,
    "stream_options": {
        "chat": {"include_usage": True},
        "completions": {"include_usage": True},
        "responses": {"include_obfuscation": False},
    },
    "structured_outputs": {"choice": ["The cat sat on the mat. It was warm."]},
    "temperature": 0.7,
    "text": {"format": {"type": "text"}},
    "tool_choice": "none",
    "tools": {"chat": [TOOL], "responses": [RESPONSES_TOOL]},
    "top_k": 5,
    "top_logprobs": 2,
    "top_p": 0.9,
    "user": "someone",
}


def field_table() -> dict[str, dict[str, str]]:
    """The table under "Every request field": field -> {column: first word of the cell}."""
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    section = text.split("## Every request field", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0])
        assert name, line
        table[name[1]] = {h: (c.split() or [""])[0] for h, c in zip(header[1:4], cells[1:4])}
    return table


def sdk_fields() -> dict[str, set[str]]:
    """Every request field the ``openai`` SDK's types have, per endpoint (each type is a
    union of its streaming and non-streaming TypedDicts)."""
    from openai.types import CompletionCreateParams
    from openai.types.chat import CompletionCreateParams as ChatParams
    from openai.types.responses import ResponseCreateParams

    def names(union: Any) -> set[str]:
        return {f for t in typing.get_args(union) for f in typing.get_type_hints(t)}

    return {
        "chat": names(ChatParams),
        "completions": names(CompletionCreateParams),
        "responses": names(ResponseCreateParams),
    }


def test_every_field_of_the_sdks_types_is_in_the_table():
    table = field_table()
    for endpoint, fields in sdk_fields().items():
        assert "model" in fields and len(fields) > 15, endpoint  # the walk found them
        missing = sorted(f for f in fields if table.get(f, {}).get(endpoint, "—") == "—")
        assert missing == [], f"{endpoint}: not in docs/API.md's field table: {missing}"


def test_the_table_says_only_what_the_checks_read():
    statuses = {s for row in field_table().values() for s in row.values()}
    assert statuses <= {"supported", "ignored", "refused", "404", "—"}, statuses


def marked(status: str) -> list[tuple[str, str]]:
    return sorted(
        (endpoint, name)
        for name, row in field_table().items()
        for endpoint, cell in row.items()
        if cell == status and endpoint in ENDPOINTS
    )


def example_for(endpoint: str, example: Any) -> Any:
    """The endpoint's own value where the example differs per endpoint."""
    if isinstance(example, dict) and example and set(example) <= set(ENDPOINTS):
        return example[endpoint]
    return example


def request(endpoint: str, name: str, value: Any) -> dict[str, Any]:
    body = {**BASE[endpoint], name: value}
    if name in ONE_VOCABULARY and endpoint != "responses":
        body["model"] = SOURCE
    if name == "top_logprobs" and endpoint == "chat":
        body["logprobs"] = True
    return body


async def test_every_refused_field_gets_a_400_that_names_it(client):
    refused = marked("refused")
    assert len(refused) > 30
    async with client() as http:
        for endpoint, name in refused:
            example = example_for(endpoint, REFUSED_EXAMPLES[name])
            r = await http.post(ENDPOINTS[endpoint], json=request(endpoint, name, example))
            assert r.status_code == 400, (endpoint, name, r.text)
            err = r.json()["error"]
            assert err["param"] == name and name in err["message"], (endpoint, name, err)


async def test_values_that_ask_for_nothing_are_accepted(client):
    table = field_table()
    async with client() as http:
        for endpoint, values in INERT.items():
            for name, value in values.items():
                assert table[name][endpoint] == "refused", (endpoint, name)
                r = await http.post(ENDPOINTS[endpoint], json=request(endpoint, name, value))
                assert r.status_code == 200, (endpoint, name, r.text)


@pytest.mark.parametrize("status", ["supported", "ignored"])
async def test_every_supported_or_ignored_field_is_accepted(client, status):
    fields = marked(status)
    assert fields
    async with client() as http:
        for endpoint, name in fields:
            if name in BASE[endpoint]:
                continue  # every request sends it
            value = example_for(endpoint, ACCEPTED_EXAMPLES[name])
            body = request(endpoint, name, value)
            if name == "stream_options":
                body["stream"] = True
            r = await http.post(ENDPOINTS[endpoint], json=body)
            assert r.status_code == 200, (endpoint, name, r.text)


async def test_logit_bias_is_refused_for_the_fused_model_and_checked_for_a_source(client):
    async with client() as http:
        fused = await http.post(ENDPOINTS["chat"], json={**BASE["chat"], "logit_bias": {"5": 1}})
        assert fused.status_code == 400
        err = fused.json()["error"]
        assert err["param"] == "logit_bias" and "vocabulary" in err["message"]
        assert SOURCE in err["message"]  # where to send it instead
        for bad in ({"99999999": 1}, {"x": 1}, {"-3": 1}):
            r = await http.post(ENDPOINTS["chat"], json=request("chat", "logit_bias", bad))
            assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", bad
        empty = await http.post(ENDPOINTS["chat"], json={**BASE["chat"], "logit_bias": {}})
        assert empty.status_code == 200


async def test_sampling_fields_outside_vllms_ranges_are_a_400_that_names_them(client):
    bad = {
        "presence_penalty": [2.5, -2.1],
        "frequency_penalty": [2.01, -3],
        "repetition_penalty": [0, -1.0],
        "top_k": [-2, 1.5, "many"],
        "min_p": [-0.1, 1.5],
    }
    async with client() as http:
        for endpoint in ENDPOINTS:
            for name, values in bad.items():
                for value in values:
                    r = await http.post(ENDPOINTS[endpoint], json=request(endpoint, name, value))
                    assert r.status_code == 400, (endpoint, name, value)
                    assert r.json()["error"]["param"] == name, (endpoint, name, value)
                ok = await http.post(ENDPOINTS[endpoint], json=request(endpoint, name, None))
                assert ok.status_code == 200
