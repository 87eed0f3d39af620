"""A client that goes away stops its request's work in every engine (real HTTP)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
LONG = "one two three four five six seven eight nine ten " * 8


def committed_segments(models) -> int:
    return max(len(m.engine.commits) for m in models)


async def test_streaming_client_disconnect_stops_all_engines(live_server, trio):
    models = trio(LONG, delay=0.02)
    async with live_server(models) as url, httpx.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            async for line in r.aiter_lines():
                if '"content": "one"' in line:
                    break
        await asyncio.sleep(0.5)
        done = committed_segments(models)
        await asyncio.sleep(0.5)
        assert committed_segments(models) == done  # nothing runs any more
        assert done < 20  # far from the ~80 segments of the whole answer
        for m in models:
            assert m.engine.states and all(s.released for s in m.engine.states), m.name


async def test_non_streaming_client_disconnect_stops_all_engines(live_server, trio, capfd):
    models = trio(LONG, delay=0.02)
    async with live_server(models) as url, httpx.AsyncClient(base_url=url) as http:
        with contextlib.suppress(httpx.TimeoutException):
            await http.post("/v1/chat/completions", json=CHAT, timeout=0.4)
        await asyncio.sleep(1.0)
        done = committed_segments(models)
        await asyncio.sleep(0.5)
        assert committed_segments(models) == done
        assert done < 40
        for m in models:
            assert m.engine.states and all(s.released for s in m.engine.states), m.name
    # regression (issue 21, item 7): a client that leaves is no server error
    assert "Exception in ASGI application" not in capfd.readouterr().err
