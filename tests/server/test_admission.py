"""Admission: capacity in choices, two lanes, and a slot that always comes back."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.admission import Admission
from server.errors import Overloaded
from server.metrics import Metrics

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "hi"}]}


async def test_releasing_a_permit_twice_gives_its_units_back_once():
    admission = Admission(Metrics(), fused=2, single=1, max_queue=0)
    permit = await admission.acquire(2, single=False)
    permit.release()
    permit.release()
    assert admission.fused.free == 2
    await admission.acquire(2, single=False)
    with pytest.raises(Overloaded):  # a double release would have made room here
        await admission.acquire(1, single=False)


async def test_a_release_right_after_a_waiter_is_cancelled_loses_no_units():
    """Regression (issue 21, item 7): cancelling a waiting task cancels its future at
    once but resumes the task later; a release in between woke the cancelled future
    (InvalidStateError in the releasing request, the units gone for good)."""
    admission = Admission(Metrics(), fused=1, single=1, max_queue=2)
    held = await admission.acquire(1, single=False)
    gone = asyncio.ensure_future(admission.acquire(1, single=False))
    later = asyncio.ensure_future(admission.acquire(1, single=False))
    await asyncio.sleep(0)
    gone.cancel()
    held.release()  # before ``gone`` resumes
    [result] = await asyncio.gather(gone, return_exceptions=True)
    assert isinstance(result, asyncio.CancelledError)
    permit = await asyncio.wait_for(later, 1)  # the unit went to the next waiter
    assert admission.fused.waiting == 0 and admission.fused.free == 0
    permit.release()
    assert admission.fused.free == 1


async def test_a_waiter_cancelled_in_the_queue_lets_the_next_one_in():
    admission = Admission(Metrics(), fused=2, single=1, max_queue=2)
    held = await admission.acquire(2, single=False)
    big = asyncio.ensure_future(admission.acquire(2, single=False))
    small = asyncio.ensure_future(admission.acquire(1, single=False))
    await asyncio.sleep(0)
    assert admission.fused.waiting == 2
    big.cancel()
    await asyncio.gather(big, return_exceptions=True)
    held.release()
    permit = await asyncio.wait_for(small, 1)
    assert permit.units == 1 and admission.fused.free == 1 and admission.fused.waiting == 0


def _asgi_post(path: str, body: dict) -> dict:
    raw = json.dumps(body).encode()
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "body": raw,
    }


async def test_a_stream_whose_client_left_before_the_first_event_gives_its_slot_back(client):
    """Regression: the slot was given back in the SSE generator's ``finally``; when the
    client left while the response was starting, the generator never started and the slot
    leaked (every later request got 429)."""
    async with client(max_concurrent=1, max_queue=0) as http:
        scope = _asgi_post("/v1/chat/completions", {**CHAT, "stream": True})
        messages = [{"type": "http.request", "body": scope.pop("body"), "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            return {"type": "http.disconnect"}  # the client is gone

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.05)  # a server waiting for its socket to drain

        await http.app(scope, receive, send)
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        metrics = (await http.get("/metrics")).text
        assert "fusion_requests_in_flight 0.0" in metrics
        assert 'fusion_requests_total{endpoint="chat",model="fusion",status="499"} 1.0' in metrics


async def test_a_stream_whose_send_fails_gives_its_slot_back(client):
    async with client(max_concurrent=1, max_queue=0) as http:
        scope = _asgi_post("/v1/chat/completions", {**CHAT, "stream": True})
        messages = [{"type": "http.request", "body": scope.pop("body"), "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            raise OSError("connection reset by peer")

        with pytest.raises(OSError):
            await http.app(scope, receive, send)
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text


async def test_single_model_requests_do_not_queue_behind_fused_ones(client, trio):
    """A chat UI's background tasks (title, tags) addressed to one source model are served
    while fused requests hold every slot."""
    async with client(models=trio(delay=0.05), max_concurrent=1, max_queue=0) as http:
        fused = asyncio.ensure_future(http.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.1)
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 429
        task = {**CHAT, "model": "qwen2.5-0.5b", "max_tokens": 4}
        single = await http.post("/v1/chat/completions", json=task)
        assert single.status_code == 200
        assert not fused.done()  # served while the fused request was still running
        assert (await fused).status_code == 200


async def test_the_single_model_lane_has_its_own_bound(client, trio):
    models = trio(delay=0.05)
    async with client(models=models, max_concurrent_single=1, max_queue=0) as http:
        task = {**CHAT, "model": "qwen2.5-0.5b"}
        first = asyncio.ensure_future(http.post("/v1/chat/completions", json=task))
        await asyncio.sleep(0.1)
        assert (await http.post("/v1/chat/completions", json=task)).status_code == 429
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await first).status_code == 200
