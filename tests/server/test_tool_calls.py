"""Tool calls over the HTTP API in-process (scripted engines at the engine boundary): the
answer's shape, streamed deltas, and the checks OpenAI makes."""

from __future__ import annotations

import json

from tests.server.test_api import sse_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
ASK = {
    "model": "fusion",
    "messages": [{"role": "user", "content": "Weather in Paris?"}],
    "tools": [WEATHER],
}


async def test_a_call_comes_back_as_tool_calls_with_finish_reason_tool_calls(client, trio):
    async with client(models=trio(CALL)) as http:
        r = await http.post("/v1/chat/completions", json={**ASK, "tool_choice": "required"})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["content"] is None and message["role"] == "assistant"
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_auto_returns_text_when_the_answer_is_text(client, trio):
    async with client(models=trio("It is sunny in Paris.")) as http:
        r = await http.post("/v1/chat/completions", json=ASK)  # tool_choice: auto
        choice = r.json()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "It is sunny in Paris."}
        assert choice["finish_reason"] == "stop"


async def test_a_streamed_call_is_one_delta_per_call_then_the_finish(client, trio):
    async with client(models=trio(CALL)) as http:
        body = {**ASK, "tool_choice": "required", "stream": True}
        r = await http.post("/v1/chat/completions", json=body)
        events = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert not any(d.get("content") for d in deltas)  # nothing of the call as text
    (call,) = [c for d in deltas for c in d.get("tool_calls", [])]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_streamed_text_under_auto_streams_as_content(client, trio):
    async with client(models=trio("It is sunny in Paris.")) as http:
        r = await http.post("/v1/chat/completions", json={**ASK, "stream": True})
        events = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == "It is sunny in Paris."
    assert sum(1 for e in events if e["choices"][0]["delta"].get("content")) > 1
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_named_function_must_be_one_of_the_tools(client):
    async with client() as http:
        choice = {"type": "function", "function": {"name": "get_time"}}
        r = await http.post("/v1/chat/completions", json={**ASK, "tool_choice": choice})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == "tool_choice" and "get_time" in error["message"]


async def test_tool_choice_without_tools_and_tools_with_a_format_are_refused(client):
    async with client() as http:
        bare = {k: v for k, v in ASK.items() if k != "tools"}
        r = await http.post("/v1/chat/completions", json={**bare, "tool_choice": "required"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        fmt = {"type": "json_object"}
        r = await http.post(
            "/v1/chat/completions",
            json={**ASK, "tool_choice": "required", "response_format": fmt},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        r = await http.post("/v1/chat/completions", json={**ASK, "tools": [WEATHER, WEATHER]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


async def test_the_history_with_calls_and_results_is_accepted(client, trio):
    history = [
        *ASK["messages"],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    async with client(models=trio("It is 18C.")) as http:
        r = await http.post("/v1/chat/completions", json={**ASK, "messages": history})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "It is 18C."
