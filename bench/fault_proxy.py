"""A reverse proxy on loopback that injects faults between a client and one upstream HTTP
server (a vLLM OpenAI server), for benchmarks (bench/faults.py) and integration tests.

    with FaultProxy(vllm.url) as proxy:
        engine_url = proxy.url        # point the client here
        proxy.slow(5)                 # each response takes about 5x as long
        proxy.fail_every(2)           # every other call is a 500, upstream never sees it
        proxy.pause(); proxy.resume() # a hung host: requests and bytes are held, not refused
        proxy.pass_through()          # back to forwarding unchanged

The proxy is a plain ASGI app served by uvicorn on its own event loop in a daemon thread,
so synchronous code drives it; every control method takes effect before it returns.
Requests go upstream through one ``httpx.AsyncClient`` (environment proxies ignored), with
their method, raw path and query, body and headers (hop-by-hop ones and Host excepted);
responses come back chunk by chunk as they arrive, so SSE flows incrementally. A client
that leaves closes its upstream request too (vLLM aborts the generation), also while the
request is held or its response headers are still awaited.

``slow(f)`` releases a byte that arrived ``t`` seconds after the request went upstream at
``f * t`` (the response headers too): each chunk waits ``(f - 1)`` times the gap since the
previous one, so the whole exchange takes about ``f`` times as long. Chunks are read from
upstream as they come, whatever is still held, so arrival times are upstream's own.

An upstream that cannot be reached is answered with 502 and the OpenAI error envelope; an
upstream that breaks off a response already started breaks off the client's too."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any, Literal

import httpx
import uvicorn

log = logging.getLogger(__name__)

Mode = Literal["pass", "slow", "fail"]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# RFC 9110 section 7.6.1: headers that describe one connection, never forwarded (plus
# whatever a Connection header names). Host and Content-Length are the client's to set.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
START_TIMEOUT = 10.0  # seconds for uvicorn to listen
STOP_GRACE = 1.0  # seconds running responses get to finish when the proxy stops
STOP_TIMEOUT = 5.0  # more seconds for the thread to end
CONTROL_TIMEOUT = 5.0  # seconds for a pause/resume to reach the event loop


@dataclass(frozen=True)
class _Faults:
    """What the proxy does to the next request and the next chunk."""

    mode: Mode = "pass"
    slow_factor: float = 1.0
    fail_every: int = 0
    fail_status: int = 500


def openai_error(status: int, message: str) -> dict[str, Any]:
    """The OpenAI error envelope vLLM answers with, its type named after the status
    (500 -> ``InternalServerError``, 503 -> ``ServiceUnavailableError``)."""
    phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    kind = phrase if phrase.endswith("Error") else f"{phrase}Error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class FaultProxy:
    """A loopback reverse proxy in front of ``upstream_url`` whose faults are switched at
    run time (see the module docstring). Requests to ``exempt_paths`` (``/health``) are
    neither counted nor failed, so a health check does not shift the failure pattern."""

    def __init__(self, upstream_url: str, *, exempt_paths: Sequence[str] = ("/health",)) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.exempt_paths = frozenset(exempt_paths)
        self._base = httpx.URL(self.upstream_url)
        # the caller's thread sets the faults and reads the counters while the proxy's
        # loop reads the faults and counts: _lock guards the counters and every change
        # (_faults is frozen and replaced whole, the flags are single values: reading
        # them needs no lock)
        self._lock = threading.Lock()
        self._faults = _Faults()
        self._paused = False
        self._hold_exempt = True
        self._seen = 0
        self._failed = 0
        self._since_fail_set = 0  # requests counted since fail_every(), for its pattern
        # the loop's own, set up by the thread (the pause gate lives on the loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resumed: asyncio.Event | None = None
        self._answering: set[asyncio.Future[None]] = set()  # for stop() to cut off
        self._client: httpx.AsyncClient | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._port: int | None = None

    # --- control, from any thread --------------------------------------------------------

    @property
    def url(self) -> str:
        """The proxy's base URL, ``http://127.0.0.1:PORT`` (once started)."""
        if self._port is None:
            raise RuntimeError("the fault proxy is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def mode(self) -> Mode:
        return self._faults.mode

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def requests_seen(self) -> int:
        """Requests received on non-exempt paths (the ones ``fail_every`` counts)."""
        with self._lock:
            return self._seen

    @property
    def requests_failed(self) -> int:
        """Requests the proxy answered with an injected error."""
        with self._lock:
            return self._failed

    def pass_through(self) -> None:
        """Forward everything unchanged (pause is separate: see ``resume``)."""
        with self._lock:
            self._faults = _Faults()

    def slow(self, factor: float) -> None:
        """Make each exchange take about ``factor`` (>= 1) times as long."""
        if not factor >= 1:
            raise ValueError(f"slow factor must be >= 1, got {factor}")
        with self._lock:
            self._faults = replace(_Faults(), mode="slow", slow_factor=float(factor))

    def fail_every(self, n: int, status: int = 500) -> None:
        """Answer the n-th, 2n-th, ... counted request from now on with ``status`` and the
        OpenAI error envelope, without reaching upstream (n=1: every request fails)."""
        if n < 1:
            raise ValueError(f"fail_every needs n >= 1, got {n}")
        if status not in {known.value for known in HTTPStatus if known >= 400}:
            raise ValueError(f"an injected failure is a known 4xx or 5xx status, got {status}")
        with self._lock:
            self._faults = replace(_Faults(), mode="fail", fail_every=n, fail_status=status)
            self._since_fail_set = 0

    def pause(self, *, hold_exempt: bool = True) -> None:
        """Hold new requests and the bytes of running responses until ``resume``, like a
        hung host; connections stay open. ``hold_exempt=False`` lets the exempt paths
        answer still (a hung engine behind a live API server)."""
        with self._lock:
            self._paused, self._hold_exempt = True, hold_exempt
        self._on_loop(lambda: self._gate().clear())

    def resume(self) -> None:
        """Release everything ``pause`` held."""
        with self._lock:
            self._paused = False
        self._on_loop(lambda: self._gate().set())

    def _on_loop(self, change: Callable[[], None]) -> None:
        """Run ``change`` on the proxy's loop and wait until it has run, so that what the
        caller does next meets the new state. Not running: nothing to change (``_serve``
        sets the pause gate from ``_paused``)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def apply() -> None:
            change()
            done.set_result(None)

        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop ended meanwhile
            loop.call_soon_threadsafe(apply)
            done.result(timeout=CONTROL_TIMEOUT)

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on a loopback port of the kernel's choosing (bound here, so no other
        process can take it first) and return once uvicorn accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the fault proxy is already started")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            interface="asgi3",  # a bound method: uvicorn would guess ASGI2
            lifespan="off",
            log_config=None,  # leave the process's logging alone
            access_log=False,
            server_header=False,  # upstream's Server and Date headers go through
            date_header=False,
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"fault-proxy-{self._port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fault proxy did not start") from self._thread_error
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Resume whatever is held, then shut down: running responses get ``STOP_GRACE``
        seconds to finish, then they are cut off as if their clients had left (their
        clients see the connection close)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.resume()
        self._on_loop(self._cut_off_later)
        server.should_exit = True
        thread.join(STOP_GRACE + STOP_TIMEOUT)
        if thread.is_alive():
            log.warning("fault proxy thread %s did not end", thread.name)
        self._server = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as exc:  # uvicorn exits via SystemExit when it cannot start
            self._thread_error = exc
            log.exception("fault proxy stopped")

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        self._resumed = asyncio.Event()
        if not self._paused:
            self._resumed.set()
        self._loop = asyncio.get_running_loop()  # from here on pause() reaches the gate
        # no proxy of the environment's, no connection limit, no timeout: the client
        # in front keeps its own, and the proxy adds no queueing or deadline of its own
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        client = httpx.AsyncClient(timeout=None, limits=limits, trust_env=False)
        async with client:
            self._client = client
            try:
                await self._server.serve(sockets=[sock])
            finally:
                self._loop = self._resumed = self._client = None

    # --- the ASGI app, on the proxy's loop -----------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        exempt = scope["path"] in self.exempt_paths
        failure = self._admit(exempt)
        body = await _read_body(receive)
        if body is None:
            return  # the client left before its request was complete
        await self._unless_client_leaves(self._answer(scope, body, exempt, failure, send), receive)

    async def _unless_client_leaves(self, answer: Awaitable[None], receive: Receive) -> None:
        """Run ``answer``, cancelled (which closes its upstream request) if the client
        disconnects first or the proxy stops; its errors propagate (uvicorn then drops
        the connection)."""
        work = asyncio.ensure_future(answer)
        left = asyncio.ensure_future(_until_disconnect(receive))
        self._answering.add(work)
        try:
            await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._answering.discard(work)
            left.cancel()
            if not work.done():
                work.cancel()
            await asyncio.wait({work, left})
        if not work.cancelled():
            work.result()

    def _cut_off_later(self) -> None:
        def cut_off() -> None:
            for work in list(self._answering):
                work.cancel()

        asyncio.get_running_loop().call_later(STOP_GRACE, cut_off)

    def _gate(self) -> asyncio.Event:
        assert self._resumed is not None, "the pause gate exists while the loop runs"
        return self._resumed

    def _admit(self, exempt: bool) -> tuple[int, str] | None:
        """Count a request; the status and message to fail it with, if it fails."""
        if exempt:
            return None
        with self._lock:
            self._seen += 1
            faults = self._faults
            if faults.mode != "fail":
                return None
            self._since_fail_set += 1
            if self._since_fail_set % faults.fail_every:
                return None
            self._failed += 1
            seen = self._seen
        message = f"injected fault: request {seen} failed by the fault proxy"
        log.debug("%s (%d)", message, faults.fail_status)
        return faults.fail_status, message

    async def _answer(
        self, scope: Scope, body: bytes, exempt: bool, failure: tuple[int, str] | None, send: Send
    ) -> None:
        """Hold while paused, then fail the request or forward it."""
        await self._held(exempt)
        if failure is not None:
            await _send_json(send, failure[0], openai_error(*failure))
            return
        assert self._client is not None
        request = httpx.Request(
            scope["method"],
            self._upstream_url(scope),
            headers=_forwarded(scope["headers"], request=True),
            content=body,
        )
        sent_at = time.monotonic()
        try:
            upstream = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            message = f"fault proxy: upstream {self.upstream_url} unreachable: {exc!r}"
            await _send_json(send, 502, openai_error(502, message))
            return
        try:
            await self._release(sent_at, time.monotonic(), exempt)
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status_code,
                    "headers": _forwarded(upstream.headers.raw, request=False),
                }
            )
            await self._relay(upstream, sent_at, exempt, send)
        finally:
            await upstream.aclose()

    async def _relay(
        self, upstream: httpx.Response, sent_at: float, exempt: bool, send: Send
    ) -> None:
        """Send the response body on, each chunk when ``_release`` lets it go. A reader
        task takes the chunks from upstream as they arrive, so a chunk's arrival time is
        upstream's and not when the previous one was let go."""
        chunks: asyncio.Queue[tuple[float, bytes] | Exception | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for chunk in upstream.aiter_raw():
                    chunks.put_nowait((time.monotonic(), chunk))
            except Exception as exc:
                chunks.put_nowait(exc)
            else:
                chunks.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, Exception):
                    raise item  # upstream broke off: so does this response
                arrived, chunk = item
                await self._release(sent_at, arrived, exempt)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            reader.cancel()
            await asyncio.wait({reader})  # done reading before the caller closes upstream
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _release(self, sent_at: float, arrived: float, exempt: bool) -> None:
        """Wait until what arrived at ``arrived`` may go on: at ``factor`` times its time
        since the request went upstream, and not while paused."""
        factor = self._faults.slow_factor
        if factor > 1:
            await asyncio.sleep(max(0.0, sent_at + factor * (arrived - sent_at) - time.monotonic()))
        await self._held(exempt)

    async def _held(self, exempt: bool) -> None:
        if not exempt or self._hold_exempt:
            await self._gate().wait()

    def _upstream_url(self, scope: Scope) -> httpx.URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        prefix = self._base.raw_path.split(b"?")[0].rstrip(b"/")
        return self._base.copy_with(raw_path=prefix + raw_path + (b"?" + query if query else b""))


def _forwarded(
    headers: Iterable[tuple[bytes, bytes]], *, request: bool
) -> list[tuple[bytes, bytes]]:
    """Headers minus the hop-by-hop ones (and, on a request, Host and Content-Length,
    which httpx sets for the upstream connection)."""
    headers = list(headers)
    drop = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == b"connection":
            drop |= {token.strip().lower() for token in value.decode("latin-1").split(",")}
    if request:
        drop |= {"host", "content-length"}
    return [(name, value) for name, value in headers if name.decode("latin-1").lower() not in drop]


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None when the client disconnects first."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
