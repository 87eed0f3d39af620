"""``POST /v1/responses`` in-process (scripted engines): the response object and every
stream event parse as the OpenAI SDK's own types, refused fields get a 400 naming them,
``text.format`` gives valid JSON, and the SDK's ``responses`` calls work end to end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from tests.conftest import SCRIPT

ASK = {"model": "fusion", "input": "hi"}
PERSON_JSON = '{"name":"Ada","age":36}'
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
EVENT = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    # response.output_text.delta, one per segment
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


class Person(BaseModel):
    name: str
    age: int


def sse(body: str) -> list[dict[str, Any]]:
    """The data of every SSE event, each checked to be named by its ``type``."""
    out = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and line[0] != ":")
        if "data" in fields:
            data = json.loads(fields["data"])
            assert fields.get("event") == data["type"], block
            out.append(data)
    return out


def sdk(http: httpx.AsyncClient) -> AsyncOpenAI:
    """The OpenAI SDK over the app in-process."""
    transport = httpx.ASGITransport(app=http.app)  # type: ignore[attr-defined]
    client = httpx.AsyncClient(transport=transport, base_url="http://test")
    return AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=client)


async def test_a_string_input_gets_a_response_the_sdk_type_parses(client):
    async with client() as http:
        r = await http.post("/v1/responses", json={**ASK, "metadata": {"k": "v"}, "user": "u"})
        assert r.status_code == 200, r.text
        body = r.json()
        parsed = Response.model_validate(body)
        assert parsed.output_text == SCRIPT
        assert body["id"].startswith("resp_") and body["object"] == "response"
        assert body["status"] == "completed" and body["incomplete_details"] is None
        assert body["model"] == "fusion" and body["metadata"] == {"k": "v"}
        (item,) = body["output"]
        assert item["type"] == "message" and item["id"].startswith("msg_")
        assert item["role"] == "assistant" and item["status"] == "completed"
        assert item["content"] == [
            {"type": "output_text", "text": SCRIPT, "annotations": [], "logprobs": []}
        ]
        usage = body["usage"]
        assert usage["output_tokens"] > 0 and usage["input_tokens"] > 0
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        assert usage["input_tokens_details"]["cached_tokens"] == 0
        assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
        assert body["tools"] == [] and body["tool_choice"] == "auto"
        assert body["temperature"] == 0.0 and body["top_p"] == 1.0  # greedy, as chat
        assert body["text"] == {"format": {"type": "text"}, "verbosity": None}


async def test_instructions_and_message_items_become_the_chat_messages(client, trio):
    models = trio()
    async with client(models=models) as http:
        r = await http.post(
            "/v1/responses",
            json={
                "model": "smollm2-135m",
                "instructions": "Be brief.",
                "input": [
                    {"role": "user", "content": "first"},
                    {
                        "type": "message",
                        "id": "msg_earlier",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "ok", "annotations": []}],
                    },
                    {
                        "type": "message",
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "a"},
                            {"type": "input_text", "text": "b"},
                        ],
                    },
                ],
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "smollm2-135m"  # a source model by name, as on chat
        engine = models[0].engine
        prompt = models[0].tokenizer.decode(engine.states[-1].prompt)
        assert "system: Be brief.\nuser: first\nassistant: ok\nuser: ab\nassistant:" in prompt


async def test_a_cut_answer_is_incomplete_with_the_reason(client):
    async with client() as http:
        r = await http.post("/v1/responses", json={**ASK, "max_output_tokens": 3})
        body = r.json()
        Response.model_validate(body)
        assert body["status"] == "incomplete" and body["output"][0]["status"] == "incomplete"
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert body["max_output_tokens"] == 3 and body["usage"]["output_tokens"] <= 3


async def test_text_format_json_schema_gives_valid_json_and_is_echoed(client, trio):
    # scripted engines cannot constrain: the grammar cuts their chatter off
    async with client(models=trio(PERSON_JSON + " Hope this helps.")) as http:
        fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
        r = await http.post("/v1/responses", json={**ASK, "text": {"format": fmt}})
        body = r.json()
        assert json.loads(Response.model_validate(body).output_text) == {"name": "Ada", "age": 36}
        assert body["text"]["format"] == {**fmt, "description": None}
        loose = await http.post(
            "/v1/responses", json={**ASK, "text": {"format": {"type": "json_object"}}}
        )
        assert json.loads(loose.json()["output"][0]["content"][0]["text"]) == json.loads(
            PERSON_JSON
        )
        free = await http.post("/v1/responses", json={**ASK, "text": {"format": {"type": "text"}}})
        assert free.json()["output"][0]["content"][0]["text"].endswith("Hope this helps.")


REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("store", {"store": True}),
    ("previous_response_id", {"previous_response_id": "resp_123"}),
    ("conversation", {"conversation": "conv_123"}),
    ("background", {"background": True}),
    ("background_options", {"background_options": {"completion_window": "soonest"}}),
    ("prompt", {"prompt": {"id": "pmpt_1"}}),
    ("context_management", {"context_management": [{"type": "compaction"}]}),
    ("moderation", {"moderation": {"model": "omni-moderation-latest"}}),
    ("top_logprobs", {"top_logprobs": 2}),
    ("truncation", {"truncation": "auto"}),
    ("include", {"include": ["message.output_text.logprobs"]}),
    ("include", {"include": ["file_search_call.results"]}),
    ("reasoning", {"reasoning": {"effort": "low"}}),
    ("text.verbosity", {"text": {"verbosity": "low"}}),
    ("tools", {"tools": [{"type": "web_search"}]}),
    ("tool_choice", {"tool_choice": "required"}),  # without tools
    ("tool_choice", {"tool_choice": {"type": "function", "name": "f"}}),
    ("tool_choice", {"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}),
    ("input", {"input": []}),
    ("input", {"input": [{"type": "reasoning", "summary": []}]}),
    ("input", {"input": [{"role": "wizard", "content": "x"}]}),
    ("input", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
    # refused by the chat path, named in this API's terms
    ("temperature", {"temperature": 7}),
    ("max_output_tokens", {"max_output_tokens": 0}),
    ("max_output_tokens", {"max_output_tokens": 10**9}),
    (
        "text.format",
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}},
    ),
    ("text.format", {"text": {"format": {"type": "json_schema", "name": "x"}}}),
    ("fusion.models", {"fusion": {"models": ["nope"]}}),
    ("stop_token_ids", {"stop_token_ids": [2]}),  # vLLM's extension, refused as on chat
]


@pytest.mark.parametrize(
    ("param", "extra"), REFUSED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REFUSED)]
)
async def test_each_refused_field_gets_a_400_that_names_it(client, param, extra):
    async with client() as http:
        r = await http.post("/v1/responses", json={**ASK, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param, err
        if param not in ("text.format", "fusion.models"):  # chat's messages say the rule
            assert param.split(".")[0] in err["message"], err
        assert err["type"] == "invalid_request_error"
        assert "max_tokens" not in err["message"] and "messages" not in err["message"]


async def test_stateless_refusals_say_why_and_tools_name_their_seam(client):
    async with client() as http:
        for extra in ({"store": True}, {"previous_response_id": "resp_1"}):
            r = await http.post("/v1/responses", json={**ASK, **extra})
            assert "keeps no state" in r.json()["error"]["message"]
        r = await http.post("/v1/responses", json={**ASK, "tools": [{"type": "web_search"}]})
        assert "built-in tools (web_search) are not served" in r.text


ACCEPTED: list[dict[str, Any]] = [
    {"store": False},
    {"background": False},
    {"include": ["reasoning.encrypted_content"]},
    {"top_logprobs": 0},
    {"truncation": "disabled"},
    {"tools": [], "tool_choice": "none"},
    {"tool_choice": "auto", "parallel_tool_calls": False},
    {"reasoning": {"effort": None, "summary": None}},
    {"metadata": {"a": "b"}, "user": "someone", "safety_identifier": "x"},
    {"service_tier": "flex", "prompt_cache_key": "k", "prompt_cache_retention": "24h"},
    {"stream_options": {"include_obfuscation": False}, "max_tool_calls": 3},
    {"temperature": 0.5, "top_p": 0.9, "seed": 1, "top_k": 5},
    {"instructions": None, "text": None, "max_output_tokens": None},
]


async def test_values_that_ask_for_nothing_and_harmless_fields_are_accepted(client):
    async with client() as http:
        for extra in ACCEPTED:
            r = await http.post("/v1/responses", json={**ASK, **extra})
            assert r.status_code == 200, (extra, r.text)
            Response.model_validate(r.json())


async def test_a_stream_is_the_responses_event_sequence_equal_to_the_plain_answer(client):
    async with client() as http:
        plain = (await http.post("/v1/responses", json=ASK)).json()
        traced = await http.post("/v1/responses", json={**ASK, "fusion": {"trace": True}})
        segments = [s for s in traced.json()["fusion"]["segments"] if s["text"]]
        r = await http.post("/v1/responses", json={**ASK, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
        for event in events:
            EVENT.validate_python(event)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        kinds = [e["type"] for e in events]
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert [k for k in kinds if k != "response.output_text.delta"] == STREAM_ORDER
        assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
        assert len(deltas) == len(segments) > 1  # one per fused segment
        text = "".join(d["delta"] for d in deltas)
        assert text == plain["output"][0]["content"][0]["text"] == SCRIPT
        assert events[0]["response"]["status"] == "in_progress"
        assert events[0]["response"]["output"] == [] and events[0]["response"]["usage"] is None
        done = events[-1]["response"]
        Response.model_validate(done)
        assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == text
        assert done["id"] == events[0]["response"]["id"]
        assert {d["item_id"] for d in deltas} == {done["output"][0]["id"]}
        assert done["usage"]["output_tokens"] == plain["usage"]["output_tokens"]


async def test_a_cut_stream_completes_with_status_incomplete(client):
    async with client() as http:
        r = await http.post("/v1/responses", json={**ASK, "stream": True, "max_output_tokens": 3})
        done = sse(r.text)[-1]
        assert done["type"] == "response.completed"
        assert done["response"]["status"] == "incomplete"
        assert done["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_the_trace_comes_with_the_answer_and_with_each_delta(client):
    async with client() as http:
        body = {**ASK, "fusion": {"trace": True}}
        plain = (await http.post("/v1/responses", json=body)).json()
        assert all(s["candidates"] for s in plain["fusion"]["segments"])
        events = sse((await http.post("/v1/responses", json={**body, "stream": True})).text)
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert deltas and all(len(d["fusion"]["segments"]) == 1 for d in deltas)


async def test_engine_failure_mid_stream_is_an_error_event_then_the_end(client, trio):
    async with client(models=trio(fail_at_call=6)) as http:
        r = await http.post("/v1/responses", json={**ASK, "stream": True})
        events = sse(r.text)
        assert events[0]["type"] == "response.created"
        last = events[-1]
        EVENT.validate_python(last)
        assert last["type"] == "error" and last["code"] == "engine_unavailable"
        assert "failed" in last["message"]
        assert "response.completed" not in [e["type"] for e in events]
        plain = await http.post("/v1/responses", json=ASK)
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_unavailable"


async def test_the_openai_sdk_creates_streams_and_parses(client, trio):
    async with client(models=trio(PERSON_JSON + " Hope this helps.")) as http:
        openai = sdk(http)
        plain = await openai.responses.create(model="fusion", input="hi", max_output_tokens=32)
        assert plain.status == "completed" and plain.output_text.startswith(PERSON_JSON)
        async with openai.responses.stream(model="fusion", input="hi", max_output_tokens=32) as s:
            deltas = [e.delta async for e in s if e.type == "response.output_text.delta"]
            final = await s.get_final_response()
        assert "".join(deltas) == final.output_text == plain.output_text
        parsed = await openai.responses.parse(model="fusion", input="hi", text_format=Person)
        assert parsed.output_parsed == Person(name="Ada", age=36)


async def test_a_streaming_client_that_leaves_stops_every_engine(live_server, trio):
    models = trio("one two three four five six seven eight nine ten " * 8, delay=0.02)
    body = {**ASK, "stream": True, "max_output_tokens": 200}
    async with live_server(models) as url, httpx.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/responses", json=body) as r:
            async for line in r.aiter_lines():
                if '"delta": "one' in line:
                    break
        await asyncio.sleep(0.5)
        done = max(len(m.engine.commits) for m in models)
        await asyncio.sleep(0.5)
        assert max(len(m.engine.commits) for m in models) == done < 20
        for m in models:
            assert m.engine.states and all(s.released for s in m.engine.states), m.name


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'


async def test_a_function_call_is_a_function_call_output_item(client, trio):
    async with client(models=trio(CALL)) as http:
        body = {**ASK, "tools": [WEATHER], "tool_choice": "required"}
        r = await http.post("/v1/responses", json=body)
        assert r.status_code == 200, r.text
        resp = Response.model_validate(r.json())
    (item,) = resp.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Paris"}
    assert item.call_id.startswith("call_") and item.id.startswith("fc_")
    assert resp.tool_choice == "required" and resp.tools[0].name == "get_weather"


async def test_a_streamed_function_call_is_its_item_and_argument_events(client, trio):
    async with client(models=trio(CALL)) as http:
        body = {**ASK, "tools": [WEATHER], "tool_choice": "required", "stream": True}
        r = await http.post("/v1/responses", json=body)
        events = sse(r.text)
    for e in events:
        TypeAdapter(ResponseStreamEvent).validate_python(e)
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-1]["response"]["output"]
    assert [o["type"] for o in done] == ["function_call"]
    assert json.loads(events[4]["arguments"]) == {"city": "Paris"}


async def test_earlier_calls_and_their_outputs_go_back_into_the_conversation(client, trio):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ]
    async with client(models=trio("It is 18C.")) as http:
        r = await http.post("/v1/responses", json={**ASK, "input": history, "tools": [WEATHER]})
        assert r.status_code == 200, r.text
        assert Response.model_validate(r.json()).output_text == "It is 18C."
