"""HTTP client of one remote ``vllm serve --enable-scale-out``: the wire, not the engine.

What it speaks (vLLM's ``entrypoints/scale_out/token_in_token_out``, vLLM >= 0.32):

- ``POST /inference/v1/generate`` with ``token_ids`` and the engine's own
  ``sampling_params``. With ``stream: true`` the answer is SSE: ``data: {"choices":
  [{"token_ids": [...], "logprobs": {"content": [{"token_id", "logprob", "top_logprobs":
  [{"token_id", "logprob"}, ...]}]}, "finish_reason"}]}`` chunks, then ``data: [DONE]``
  (an error mid-stream is a ``data: {"error": {...}}`` chunk). Closing the stream makes
  vLLM abort the request. Without streaming one body also carries ``prompt_logprobs``
  (``[null, {"<id>": {"logprob", "rank"}}, ...]``, one entry per prompt token) and, on a
  server started with ``--enable-prompt-tokens-details``,
  ``usage.prompt_tokens_details.cached_tokens``.
- ``POST /tokenize`` (``tokens``, ``max_model_len``) and ``GET /health``.

Every failure becomes an ``EngineError`` naming the model and the URL. Connection
failures, connections closed before an answer and 502/503/504 are retried with back-off
within a call. Whether the server is left out of later requests after a failure is not
the wire's concern: every engine's model is ejected and probed back the same way
(``fusion.health``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx

from fusion.engine import EngineError, RequestRejected

GENERATE = "/inference/v1/generate"
_RETRY_STATUS = frozenset({502, 503, 504})
# failures before any answer: safe to send again (a RemoteProtocolError here is mostly a
# pooled keep-alive connection the server closed, e.g. after it restarted)
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class ServerError(EngineError):
    """The remote answered 5xx, or could not encode its answer (worth one recompute
    without the cache when scoring)."""


# vLLM fails to JSON-encode non-finite log-probs (garbage at stale cached positions); the
# scale-out route turns that ValueError into HTTP 400, other paths into 500
_UNENCODABLE = "Out of range float values are not JSON compliant"


class RemoteVllm:
    """Requests to one vLLM server (one keep-alive ``httpx.AsyncClient``)."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        api_key: str | None,
        timeout: httpx.Timeout,
        retries: int,
        retry_backoff: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.retries = retries
        self.retry_backoff = retry_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, headers=headers, transport=transport
        )

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise EngineError(f"engine {self.name}: its client to {self.url} is closed")
        return self._http

    async def health(self) -> None:
        """Raise ``EngineError`` unless ``/health`` answers 200."""
        try:
            r = await self._client().get("/health", timeout=self._timeout.connect or 5.0)
        except httpx.HTTPError as exc:
            raise EngineError(
                f"engine {self.name}: vLLM at {self.url} is unreachable: {why(exc)}"
            ) from None
        if r.status_code != 200:
            raise EngineError(
                f"engine {self.name}: vLLM at {self.url} is unhealthy (HTTP {r.status_code})"
            )

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One JSON request and its JSON answer."""
        async with self._request(path, body) as r:
            try:
                data = json.loads(await r.aread())
            except httpx.HTTPError as exc:
                raise EngineError(f"engine {self.name}: {self.url}{path}: {why(exc)}") from None
            except ValueError:
                data = None
        if not isinstance(data, dict):
            raise EngineError(f"engine {self.name}: unexpected answer from {self.url}{path}")
        return data

    @asynccontextmanager
    async def events(self, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The chunks of a streamed generation; leaving the block closes the stream."""
        async with self._request(GENERATE, body) as r, aclosing(self._chunks(r)) as chunks:
            yield chunks

    async def _chunks(self, r: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise EngineError(f"engine {self.name}: vLLM: {message(chunk)}")
                yield chunk
        except httpx.HTTPError as exc:
            raise EngineError(
                f"engine {self.name}: stream from {self.url} broke off: {why(exc)}"
            ) from None
        raise EngineError(f"engine {self.name}: stream from {self.url} ended without [DONE]")

    @asynccontextmanager
    async def _request(self, path: str, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """One POST with its body unread; connection failures and 502/503/504 retried."""
        http = self._client()
        for attempt in itertools.count():
            try:
                r = await http.send(http.build_request("POST", path, json=body), stream=True)
            except _NOT_SENT as exc:
                if attempt < self.retries:
                    await asyncio.sleep(self.retry_backoff * 2**attempt)
                    continue
                raise EngineError(
                    f"engine {self.name}: vLLM at {self.url} is unreachable: {why(exc)}"
                ) from None
            except httpx.HTTPError as exc:  # read timeout, dropped connection
                raise EngineError(f"engine {self.name}: {self.url}{path}: {why(exc)}") from None
            try:
                if r.status_code in _RETRY_STATUS and attempt < self.retries:
                    await asyncio.sleep(self.retry_backoff * 2**attempt)
                    continue
                if r.status_code != 200:
                    raise await self._status_error(r, path)
                yield r
                return
            finally:
                await r.aclose()

    async def _status_error(self, r: httpx.Response, path: str) -> EngineError:
        try:
            detail = message(json.loads(await r.aread()))
        except (ValueError, httpx.HTTPError):
            detail = ""
        what = f"engine {self.name}: {self.url}{path} answered HTTP {r.status_code}: {detail}"
        if r.status_code >= 500 or _UNENCODABLE in detail:
            return ServerError(what)
        if r.status_code in (401, 403, 404, 408, 429):  # the server's state, not the input's
            return EngineError(what)
        return RequestRejected(what)


def cached_tokens(answer: dict[str, Any]) -> int | None:
    """Prompt tokens the remote read from its prefix cache (None: it does not say)."""
    details = (answer.get("usage") or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return int(cached) if cached is not None else None


def message(data: Any) -> str:
    """The message of an error body (vLLM's ``{"error": {"message"}}`` or FastAPI's)."""
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    return str(data)


def why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
