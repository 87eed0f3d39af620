"""Remote vLLM backend of the engine protocol: each source model on its own ``vllm serve``.

Source models too big to share a machine each run on a vLLM server started with
``--enable-scale-out`` (token-in/token-out API, vLLM >= 0.32); this engine drives it over
HTTP (the wire and its faults: ``vllm_remote_client.py``).

State is client-side: the committed context's token ids, resent with every call (vLLM's
prefix cache makes that cheap), plus the look-ahead shared with the in-process engine
(``vllm_logprobs.LookAhead``), and the same requests (``vllm_requests.py``).
``generate`` replays the look-ahead, then (if it needs more) streams and closes the
stream once the segment is known (vLLM aborts the request); the tokens that arrived past
it stay as look-ahead. ``score`` sends one ``prompt_logprobs`` request per candidate that
reads the prefix cache and generates ``score_lookahead_tokens`` after the candidate, plus
one that continues this model's own look-ahead, all at once: the winner's tokens are the
next step's (one round trip per model per step). Positions vLLM served from its cache
have stale entries and are filled from what the state saw before, else the candidate is
recomputed without the cache. A server that does not report cached tokens is scored
without reading the cache (correct, slower; a warning says so).

Structured outputs: a server started with our grammar processor (``--logits-processors
fusion.engines.vllm_grammar_processor:GrammarLogitsProcessor``) constrains this model's
sampling under a request's grammar; ``start`` checks with a probe request that it does
(``vllm_grammar.py``), and without it the model's candidates are cut to the grammar's
longest valid prefix instead.

Faults: a remote that is down, slow, answers 5xx or drops a stream raises ``EngineError``
(the loop drops the model from that request, the others finish); the model is then
ejected and probed back as any engine's is (``fusion.health``). ``release`` cancels the
state's running calls, which closes their connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from fusion.engine import EngineError
from fusion.engines.vllm_calls import Answer, Chunk, VllmCalls, VllmState
from fusion.engines.vllm_logprobs import Top, candidate_entries
from fusion.engines.vllm_remote_client import GENERATE, RemoteVllm, ServerError, cached_tokens
from fusion.engines.vllm_requests import LOOKAHEAD_TOKENS

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBE_TEXT = "Natalia sold clips to 48 of her friends in April.\n  Größe: 3.5 km²; 你好! <b>"


class VllmRemoteEngine(VllmCalls):
    """Engine protocol on a remote ``vllm serve --enable-scale-out``."""

    def __init__(
        self,
        name: str,
        tokenizer_dir: str | Path,
        *,
        url: str,
        api_key: str | None = None,
        connect_timeout_seconds: float = 5.0,
        read_timeout_seconds: float = 120.0,
        start_timeout_seconds: float = 600.0,
        retries: int = 2,
        retry_backoff_seconds: float = 0.5,
        score_lookahead_tokens: int = LOOKAHEAD_TOKENS,
        transport: httpx.AsyncBaseTransport | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.name = name
        self.tokenizer_dir = Path(tokenizer_dir)
        self.trust_remote_code = trust_remote_code
        self.url = url.rstrip("/")
        self.start_timeout = start_timeout_seconds
        self.score_lookahead = max(0, score_lookahead_tokens)
        self.max_model_len = 0
        self.read_cache = True  # False when the remote does not report cached tokens
        self.open_states = 0
        # (prompt tokens, prefix-cached tokens) of scoring requests, for benchmarks/metrics
        self.prefill_log: deque[tuple[int, int]] = deque(maxlen=100_000)
        self._client_args: dict[str, Any] = {
            "api_key": api_key,
            "timeout": httpx.Timeout(read_timeout_seconds, connect=connect_timeout_seconds),
            "retries": retries,
            "retry_backoff": retry_backoff_seconds,
            "transport": transport,
        }
        self._remote: RemoteVllm | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._remote = RemoteVllm(self.name, self.url, **self._client_args)
        started = time.monotonic()
        await self._wait_up()
        adapter = await self._check_vocabulary()
        await self._probe_cache_reporting()
        await self._detect_grammar(adapter)
        log.info(
            "engine %s: remote vLLM at %s ready in %.1f s (max_model_len %d%s%s)",
            self.name,
            self.url,
            time.monotonic() - started,
            self.max_model_len,
            "" if self.read_cache else "; scoring without the prefix cache",
            "; grammars constrained in vLLM" if self.constrains else "",
        )

    def _rv(self) -> RemoteVllm:
        if self._remote is None:
            raise EngineError(f"engine {self.name} is not started")
        return self._remote

    async def _wait_up(self) -> None:
        """Wait for ``/health`` (a server may still be loading its model)."""
        deadline = time.monotonic() + self.start_timeout
        delay = 0.5
        while True:
            try:
                await self.check_health()
                return
            except EngineError as exc:
                if time.monotonic() + delay > deadline:
                    raise EngineError(
                        f"engine {self.name}: vLLM at {self.url} did not become healthy "
                        f"within {self.start_timeout:g} s: {exc}"
                    ) from None
                log.info("engine %s: waiting for vLLM at %s (%s)", self.name, self.url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _check_vocabulary(self) -> Any:
        """The remote must serve the vocabulary alignment and templates use (ours); the
        model's ``TokenizerAdapter``."""
        from fusion.tokenizer_loading import load_tokenizer

        adapter = await asyncio.to_thread(
            load_tokenizer,
            self.tokenizer_dir,
            self.name,
            trust_remote_code=self.trust_remote_code,
        )
        ours = adapter.encode(PROBE_TEXT)
        body = {"prompt": PROBE_TEXT, "add_special_tokens": False}
        answer = await self._rv().post("/tokenize", body)
        theirs = [int(t) for t in answer.get("tokens", [])]
        self.max_model_len = int(answer.get("max_model_len") or 0)
        if ours != theirs:
            raise EngineError(
                f"engine {self.name}: the vLLM server at {self.url} does not serve this "
                f"model's vocabulary: a probe text encodes as {theirs[:12]} there and "
                f"{ours[:12]} with the tokenizer in {self.tokenizer_dir}. Point the model's "
                "url at a server of the same model as its source."
            )
        return adapter

    async def _probe_cache_reporting(self) -> None:
        """Read the prefix cache when scoring only if the remote says what it read."""
        probe = {
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "skip_reading_prefix_cache": False,
        }
        try:
            answer = await self._rv().post(GENERATE, _body([0, 0], probe, stream=False))
        except EngineError as exc:
            raise EngineError(
                f"{exc} (is the server started with --enable-scale-out? it serves "
                f"{GENERATE} from vLLM 0.32 on)"
            ) from None
        if cached_tokens(answer) is None:
            self.read_cache = False
            log.warning(
                "engine %s: vLLM at %s does not report cached prompt tokens (start it with "
                "--enable-prompt-tokens-details): scoring recomputes every context",
                self.name,
                self.url,
            )

    async def shutdown(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.aclose()

    async def check_health(self) -> None:
        await self._rv().health()

    # -- protocol -----------------------------------------------------------------------
    async def open(
        self, request_id: str, prompt_ids: Sequence[int], room: int | None = None
    ) -> VllmState:
        if not prompt_ids:
            raise EngineError(f"engine {self.name}: empty prompt")
        if self.max_model_len and len(prompt_ids) >= self.max_model_len:
            raise EngineError(
                f"engine {self.name}: prompt of {len(prompt_ids)} tokens leaves no room "
                f"in its {self.max_model_len}-token context"
            )
        self.open_states += 1
        return VllmState.opened(request_id, prompt_ids)

    async def release(self, state: VllmState) -> None:
        if state.cancelled:
            return
        state.cancelled = True
        self.open_states -= 1
        for task in list(state.live):  # closes their streams: vLLM aborts the requests
            task.cancel()

    # -- the transport (``vllm_calls``) ------------------------------------------------
    async def _stream(
        self, st: VllmState, prompt: list[int], fields: dict[str, Any]
    ) -> AsyncGenerator[Chunk, None]:
        body = _body(prompt, fields, stream=True, rid=st.next_rid())
        async with self._rv().events(body) as events:
            async for chunk in events:
                for choice in chunk.get("choices") or ():
                    toks = choice.get("token_ids") or []
                    content = (choice.get("logprobs") or {}).get("content") or []
                    if len(content) != len(toks):
                        raise EngineError(f"engine {self.name}: tokens without log-probs")
                    yield Chunk([(int(t), _top(e)) for t, e in zip(toks, content)])
                    if choice.get("finish_reason") == "abort":
                        raise EngineError(f"engine {self.name}: vLLM aborted the request")
                    if choice.get("finish_reason") is not None:
                        return

    async def _once(
        self, st: VllmState, prompt: list[int], fields: dict[str, Any], n: int
    ) -> Answer:
        body = _body(prompt, fields, stream=False, rid=st.next_rid())
        answer = await self._rv().post(GENERATE, body)
        entries = candidate_entries(answer.get("prompt_logprobs") or [], n)
        ids, tops = _generated(answer)
        return Answer(cached_tokens(answer), [_entry(e) for e in entries], ids, tops)

    def _retry_without_cache(self, exc: EngineError) -> bool:
        # stale cached entries may hold non-finite garbage vLLM cannot encode
        return isinstance(exc, ServerError)

    async def _call(self, st: VllmState, work: Coroutine[Any, Any, T]) -> T:
        """Run one HTTP call as a task ``release`` can cancel (closing its connection)."""
        return await self._live(st, work)

    # -- calls ------------------------------------------------------------------------------
    async def _live(self, st: VllmState, work: Coroutine[Any, Any, T]) -> T:
        """Run one HTTP call as a task ``release`` can cancel (closing its connection)."""
        if st.cancelled:
            work.close()
            raise EngineError(f"engine {self.name}: request {st.request_id} was released")
        task = asyncio.ensure_future(work)
        st.live.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if st.cancelled and task.cancelled() and not (me and me.cancelling()):
                raise EngineError(
                    f"engine {self.name}: request {st.request_id} was released"
                ) from None
            raise
        finally:
            st.live.discard(task)


def _body(
    ids: list[int], params: dict[str, Any], *, stream: bool, rid: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"token_ids": ids, "sampling_params": params, "stream": stream}
    if rid is not None:
        body["request_id"] = rid
    return body


def _generated(answer: dict[str, Any]) -> tuple[list[int], list[Top]]:
    """The tokens a non-streamed answer generated, with their top log-probs."""
    choice = (answer.get("choices") or [{}])[0]
    content = (choice.get("logprobs") or {}).get("content") or []
    return [int(t) for t in choice.get("token_ids") or []], [_top(e) for e in content]


def _top(entry: dict[str, Any]) -> Top:
    """Top log-probs of one generated position (the sampled token included)."""
    top = {int(t["token_id"]): float(t["logprob"]) for t in entry.get("top_logprobs") or ()}
    top[int(entry["token_id"])] = float(entry["logprob"])
    return top


def _entry(entry: Any) -> dict[int, float] | None:
    """One ``prompt_logprobs`` entry as {token id: log-prob} (None if unusable: a cached
    position's entry is garbage and may not even parse)."""
    if not isinstance(entry, dict):
        return None
    try:
        return {int(t): float(v["logprob"]) for t, v in entry.items()}
    except (TypeError, ValueError, KeyError):
        return None
