"""Fakes at the vLLM engines' boundaries, on one deterministic "model".

``FakeVllm`` speaks vLLM's token-in/token-out API (``/inference/v1/generate``, streamed
and not, ``/tokenize``, ``/health``) through an ``httpx.MockTransport``, for the remote
engine. ``FakeAsyncLLM`` is vLLM's ``AsyncLLM`` (``generate`` on token ids with
``SamplingParams``, ``abort``) on the same model, for the in-process engine; it records
its requests in the wire's shape, so tests read both engines alike.

The "model" is a deterministic function of the prefix, so every score and every greedy
continuation has an exact expected value. Like vLLM it keeps a prefix cache of full
blocks: a request that reads it gets stale entries in ``prompt_logprobs`` at the
positions it did not recompute (some with the right token and a wrong value, so an
engine that trusts them is caught).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx

BLOCK = 4
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "it",
    "was",
    "warm",
    "so",
    "we",
    "went",
    "home",
    "to",
    "sleep",
]


class SseStream(httpx.AsyncByteStream):
    """An SSE body that records whether the client closed it before its end."""

    def __init__(self, chunks: AsyncIterator[bytes], server: FakeVllm) -> None:
        self.chunks = chunks
        self.server = server
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for c in self.chunks:
            yield c
        self.finished = True

    async def aclose(self) -> None:
        if not self.finished:
            self.server.aborted += 1


class FakeVllm:
    """A deterministic 'model' behind vLLM's wire protocol, with a block prefix cache."""

    def __init__(self, tokenizer, *, report_cached: bool = True, salt: int = 0) -> None:
        self.tokenizer = tokenizer
        self.salt = salt  # another salt: another "model" on the same vocabulary
        self.words = [tokenizer.token_to_id("Ġ" + w) for w in WORDS if w]
        self.words = [w for w in self.words if w is not None]
        self.report_cached = report_cached
        self.cache: set[tuple[int, ...]] = set()
        self.requests: list[dict[str, Any]] = []
        self.aborted = 0
        self.token_delay = 0.0
        self.fault: Callable[[httpx.Request, dict[str, Any]], httpx.Response | None] | None = None
        self.tokenize_shift = 0

    # -- the "model" ----------------------------------------------------------------------
    def top(self, prefix: list[int]) -> dict[int, float]:
        """Top-20 log-probs after ``prefix`` (word tokens, deterministic)."""
        h = sum((i + 1) * t for i, t in enumerate(prefix[-6:])) + len(prefix) + self.salt
        order = [self.words[(h + 7 * k) % len(self.words)] for k in range(len(self.words))]
        order = list(dict.fromkeys(order))[:20]
        return {t: -0.3 - 0.25 * k for k, t in enumerate(order)}

    def logprob(self, prefix: list[int], tok: int) -> float:
        return self.top(prefix).get(tok, -12.0 - (tok % 13) * 0.1)

    def expected(self, context: list[int], cand: list[int]) -> list[float]:
        return [self.logprob(context + cand[:j], t) for j, t in enumerate(cand)]

    # -- wire -----------------------------------------------------------------------------
    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if self.fault is not None:
            answer = self.fault(request, body)
            if answer is not None:
                return answer
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/tokenize":
            ids = self.tokenizer.encode(body["prompt"], add_special_tokens=False).ids
            ids = [i + self.tokenize_shift for i in ids]
            return httpx.Response(
                200, json={"tokens": ids, "count": len(ids), "max_model_len": 512}
            )
        if path == "/inference/v1/generate":
            self.requests.append(body)
            if body.get("stream"):
                return httpx.Response(
                    200,
                    stream=SseStream(self._sse(body), self),
                    headers={"content-type": "text/event-stream"},
                )
            return httpx.Response(200, json=self._full(body))
        return httpx.Response(404, json={"detail": "Not Found"})

    def _cached(self, ids: list[int], sp: dict[str, Any]) -> int:
        reads = sp.get("skip_reading_prefix_cache") is False or (
            sp.get("skip_reading_prefix_cache") is None and sp.get("prompt_logprobs") is None
        )
        n = 0
        while reads and n + BLOCK <= len(ids) - 1 and tuple(ids[: n + BLOCK]) in self.cache:
            n += BLOCK
        return n

    def _remember(self, ids: list[int]) -> None:
        for end in range(BLOCK, len(ids) + 1, BLOCK):
            self.cache.add(tuple(ids[:end]))

    def _sample(self, ids: list[int], sp: dict[str, Any]) -> list[tuple[int, dict[int, float]]]:
        out: list[tuple[int, dict[int, float]]] = []
        stops = set(sp.get("stop_token_ids") or ())
        for _ in range(sp.get("max_tokens", 16)):
            top = self.top(ids + [t for t, _ in out])
            tok = next(iter(top))
            out.append((tok, top))
            if tok in stops:
                break
        return out

    @staticmethod
    def _content(tok: int, top: dict[int, float]) -> dict[str, Any]:
        tops = [{"token_id": t, "logprob": lp} for t, lp in top.items()]
        return {"token_id": tok, "logprob": top[tok], "top_logprobs": tops}

    def _full(self, body: dict[str, Any]) -> dict[str, Any]:
        ids, sp = body["token_ids"], body["sampling_params"]
        cached = self._cached(ids, sp)
        out = self._sample(ids, sp)
        self._remember(ids + [t for t, _ in out])
        answer: dict[str, Any] = {
            "choices": [
                {
                    "index": 0,
                    "token_ids": [t for t, _ in out],
                    "logprobs": {"content": [self._content(t, top) for t, top in out]},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": len(ids)},
        }
        if sp.get("prompt_logprobs") is not None:
            plp: list[Any] = [None]
            for i in range(1, len(ids)):
                if i - 1 < cached:  # not recomputed: stale memory
                    stale = ids[i] if i % 2 else 7
                    plp.append({str(stale): {"logprob": 5.0 + i, "rank": 3}})
                else:  # the token's entry, then the most likely ones asked for
                    entry = {str(ids[i]): {"logprob": self.logprob(ids[:i], ids[i]), "rank": 1}}
                    for t, lp in list(self.top(ids[:i]).items())[: sp["prompt_logprobs"]]:
                        entry.setdefault(str(t), {"logprob": lp, "rank": 1})
                    plp.append(entry)
            answer["prompt_logprobs"] = plp
        if self.report_cached:
            answer["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
        return answer

    async def _sse(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        ids, sp = body["token_ids"], body["sampling_params"]
        out = self._sample(ids, sp)
        self._remember(ids + [t for t, _ in out[:-1]])  # the KV of what it generated
        for k, (tok, top) in enumerate(out):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            last = k == len(out) - 1
            choice = {
                "index": 0,
                "token_ids": [tok],
                "logprobs": {"content": [self._content(tok, top)]},
                "finish_reason": ("stop" if tok in (sp.get("stop_token_ids") or ()) else "length")
                if last
                else None,
            }
            yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
        yield b"data: [DONE]\n\n"


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Output:
    """The parts of vLLM's ``RequestOutput`` the engine reads."""

    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]]
    num_cached_tokens: int
    prompt_logprobs: list[dict[int, _Logprob] | None] | None = None
    outputs: list[SimpleNamespace] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outputs = [SimpleNamespace(token_ids=self.token_ids, logprobs=self.logprobs)]


def _tops(content: list[dict[str, Any]]) -> list[dict[int, _Logprob]]:
    return [
        {int(t["token_id"]): _Logprob(float(t["logprob"])) for t in c["top_logprobs"]}
        for c in content
    ]


class FakeAsyncLLM:
    """vLLM's ``AsyncLLM`` on ``FakeVllm``'s model: ``DELTA`` requests stream token by
    token, ``FINAL_ONLY`` ones answer once (with ``prompt_logprobs`` when asked)."""

    def __init__(self, model: FakeVllm) -> None:
        self.model = model
        self.model_config = SimpleNamespace(max_model_len=512)
        self.running: set[str] = set()
        self.error: Exception | None = None  # raised by the next requests (a dead core)

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str
    ) -> AsyncIterator[_Output]:
        from vllm.sampling_params import RequestOutputKind

        ids = list(prompt["prompt_token_ids"])
        sp = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "seed": params.seed,
            "logprobs": params.logprobs,
            "stop_token_ids": list(params.stop_token_ids or ()),
            "prompt_logprobs": params.prompt_logprobs,
            "skip_reading_prefix_cache": params.skip_reading_prefix_cache,
        }
        stream = params.output_kind == RequestOutputKind.DELTA
        body = {"token_ids": ids, "sampling_params": sp, "stream": stream}
        self.model.requests.append(body)
        if self.error is not None:
            raise self.error
        self.running.add(request_id)
        answer = self.model._full(body)
        cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        choice = answer["choices"][0]
        tops = _tops(choice["logprobs"]["content"])
        if stream:
            for k, (tok, top) in enumerate(zip(choice["token_ids"], tops)):
                await asyncio.sleep(self.model.token_delay)
                if k == len(tops) - 1:  # the output that finishes the request
                    self.running.discard(request_id)
                yield _Output([tok], [top], cached)
        else:
            plp = [
                {int(t): _Logprob(v["logprob"]) for t, v in e.items()} if e else None
                for e in answer.get("prompt_logprobs") or ()
            ]
            self.running.discard(request_id)
            yield _Output(choice["token_ids"], tops, cached, plp or None)

    async def abort(self, request_ids: str | list[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            if rid in self.running:
                self.running.discard(rid)
                self.model.aborted += 1
