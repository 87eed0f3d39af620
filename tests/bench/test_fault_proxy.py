"""bench/fault_proxy.py against a real upstream on loopback: a small starlette app under
uvicorn in a thread, with a JSON echo route and an SSE-like route of five chunks 0.1 s
apart. Timing bounds leave a wide margin (a loaded machine is slower, never faster)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.fault_proxy import FaultProxy

CHUNKS = 5
GAP = 0.1  # seconds between the stream route's chunks


class Upstream:
    """The upstream's record of what reached it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.streams_closed_early = 0
        self.url = ""

    def app(self) -> Starlette:
        async def health(request: Request) -> Response:
            self.hits.append("/health")
            return Response(status_code=200)

        async def echo(request: Request) -> JSONResponse:
            self.hits.append(request.url.path)
            body = {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body": (await request.body()).decode(),
            }
            return JSONResponse(body, status_code=201, headers={"x-upstream": "yes"})

        async def stream(request: Request) -> StreamingResponse:
            self.hits.append(request.url.path)

            async def events() -> AsyncIterator[bytes]:
                sent = 0
                try:
                    for i in range(CHUNKS):
                        await asyncio.sleep(GAP)
                        yield f"data: {i}\n\n".encode()
                        sent += 1
                finally:
                    if sent < CHUNKS:
                        self.streams_closed_early += 1

            return StreamingResponse(events(), media_type="text/event-stream")

        routes = [
            Route("/health", health),
            Route("/v1/echo", echo, methods=["GET", "POST"]),
            Route("/v1/stream", stream),
        ]
        return Starlette(routes=routes)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    record = Upstream()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    record.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(record.app(), lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the upstream did not start"
        time.sleep(0.01)
    yield record
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    upstream.hits.clear()
    upstream.streams_closed_early = 0
    with FaultProxy(upstream.url) as running:
        yield running


@pytest.fixture
def client(proxy: FaultProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=10, trust_env=False) as http:
        yield http


def stream_arrivals(client: httpx.Client) -> tuple[list[str], list[float]]:
    """The stream route's events and the seconds after the request at which each came."""
    start = time.monotonic()
    events, arrivals = [], []
    with client.stream("GET", "/v1/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                events.append(line)
                arrivals.append(time.monotonic() - start)
    return events, arrivals


def test_pass_forwards_method_path_query_headers_and_body(
    client: httpx.Client, proxy: FaultProxy
) -> None:
    r = client.post(
        "/v1/echo?x=1&y=a%20b",
        content=b'{"prompt": "hi"}',
        headers={"x-test": "kept", "content-type": "application/json", "connection": "close"},
    )
    assert r.status_code == 201
    assert r.headers["x-upstream"] == "yes"
    echoed = r.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/v1/echo"
    assert echoed["query"] == "x=1&y=a%20b"
    assert echoed["body"] == '{"prompt": "hi"}'
    assert echoed["headers"]["x-test"] == "kept"
    assert echoed["headers"]["content-length"] == "16"
    assert echoed["headers"]["host"] == proxy.upstream_url.removeprefix("http://")
    assert echoed["headers"].get("connection") != "close"  # hop-by-hop: not forwarded
    assert proxy.mode == "pass"
    assert (proxy.requests_seen, proxy.requests_failed) == (1, 0)


def test_pass_streams_incrementally(client: httpx.Client) -> None:
    events, arrivals = stream_arrivals(client)
    assert events == [f"data: {i}" for i in range(CHUNKS)]
    # the first event comes long before the last: not buffered to the end
    assert arrivals[-1] - arrivals[0] >= 0.6 * (CHUNKS - 1) * GAP


def test_slow_stretches_each_exchange(client: httpx.Client, proxy: FaultProxy) -> None:
    _, passed = stream_arrivals(client)
    proxy.slow(5)
    assert proxy.mode == "slow"
    events, slowed = stream_arrivals(client)
    assert events == [f"data: {i}" for i in range(CHUNKS)]
    assert slowed[-1] >= 3 * passed[-1]
    # still incremental: each event is let go at its own time, not all at the end
    assert slowed[-1] - slowed[0] >= 3 * (CHUNKS - 1) * GAP * 0.6
    proxy.pass_through()
    _, again = stream_arrivals(client)
    assert again[-1] < 2 * passed[-1] + 0.5


def test_fail_every_other_call_spares_health(
    client: httpx.Client, proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.fail_every(2)
    statuses = []
    for _ in range(6):
        assert client.get("/health").status_code == 200
        r = client.post("/v1/echo", json={})
        statuses.append(r.status_code)
        if r.status_code == 500:
            error = r.json()["error"]
            assert error["code"] == 500
            assert error["type"] == "InternalServerError"
            assert "injected" in error["message"]
    assert statuses == [201, 500] * 3
    assert (proxy.requests_seen, proxy.requests_failed) == (6, 3)
    assert upstream.hits.count("/v1/echo") == 3  # failed calls never reach upstream
    assert upstream.hits.count("/health") == 6


def test_fail_every_restarts_its_pattern_and_takes_a_status(
    client: httpx.Client, proxy: FaultProxy
) -> None:
    client.get("/v1/echo")
    proxy.fail_every(3, status=503)
    responses = [client.get("/v1/echo") for _ in range(6)]
    assert [r.status_code for r in responses] == [201, 201, 503, 201, 201, 503]
    assert responses[2].json()["error"]["type"] == "ServiceUnavailableError"
    proxy.pass_through()
    assert [client.get("/v1/echo").status_code for _ in range(3)] == [201] * 3
    assert (proxy.requests_seen, proxy.requests_failed) == (10, 2)


def test_pause_holds_a_request_until_resume(client: httpx.Client, proxy: FaultProxy) -> None:
    proxy.pause()
    assert proxy.paused
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/echo", json={})
        time.sleep(0.5)
        assert not pending.done()
        proxy.resume()
        assert pending.result(timeout=2).status_code == 201
    assert not proxy.paused


def test_pause_holds_the_bytes_of_a_running_stream(client: httpx.Client, proxy: FaultProxy) -> None:
    with client.stream("GET", "/v1/stream") as response:
        lines = (line for line in response.iter_lines() if line)
        assert next(lines) == "data: 0"
        proxy.pause()
        paused_at = time.monotonic()
        # upstream sends the rest meanwhile (0.4 s); none of it may come before resume
        threading.Timer(0.8, proxy.resume).start()
        assert next(lines) == "data: 1"
        assert time.monotonic() - paused_at >= 0.7
        assert list(lines) == [f"data: {i}" for i in range(2, CHUNKS)]


def test_pause_can_spare_the_exempt_paths(client: httpx.Client, proxy: FaultProxy) -> None:
    proxy.pause(hold_exempt=False)
    assert client.get("/health", timeout=2).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        client.get("/v1/echo", timeout=0.3)
    proxy.resume()


def test_a_client_that_leaves_closes_the_upstream_stream(
    client: httpx.Client, upstream: Upstream
) -> None:
    with client.stream("GET", "/v1/stream") as response:
        assert next(line for line in response.iter_lines() if line) == "data: 0"
    deadline = time.monotonic() + 2
    while upstream.streams_closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.streams_closed_early == 1


def test_a_client_that_leaves_a_held_request_never_reaches_upstream(
    client: httpx.Client, proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.pause()
    with pytest.raises(httpx.ReadTimeout):
        client.get("/v1/echo", timeout=0.3)
    proxy.resume()
    time.sleep(0.2)
    assert upstream.hits == []


def test_exit_while_paused_is_quick_and_releases_held_requests(upstream: Upstream) -> None:
    with ThreadPoolExecutor(1) as pool:
        with FaultProxy(upstream.url) as proxy:
            proxy.pause()
            url = f"{proxy.url}/v1/echo"
            pending = pool.submit(httpx.post, url, json={}, timeout=5, trust_env=False)
            time.sleep(0.2)
            exiting = time.monotonic()
        assert time.monotonic() - exiting < 2
        assert pending.result(timeout=2).status_code == 201
    assert not any(t.name.startswith("fault-proxy-") for t in threading.enumerate())


def test_an_unreachable_upstream_is_a_502() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
        with FaultProxy(dead) as proxy:
            r = httpx.get(f"{proxy.url}/v1/models", timeout=5, trust_env=False)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "BadGatewayError"


def test_settings_are_checked() -> None:
    proxy = FaultProxy("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="slow factor"):
        proxy.slow(0.5)
    with pytest.raises(ValueError, match="n >= 1"):
        proxy.fail_every(0)
    with pytest.raises(ValueError, match="status"):
        proxy.fail_every(2, status=200)
    with pytest.raises(RuntimeError, match="not started"):
        _ = proxy.url
