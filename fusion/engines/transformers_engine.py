"""Transformers backend of the engine protocol: one model, its own thread, KV kept per request.

What a fusion step costs here, per model: one forward per generated token, plus one
forward that scores every other model's candidate side by side (all candidates packed
into one sequence after the shared context, each seeing the context and itself only).
Nothing is thrown away that a later call can use:

- tokens generated past a segment boundary stay as look-ahead (with their KV) and are
  reused when this model's own candidate wins;
- the scoring forward over the winning candidate already produced its KV and the
  next-token distribution after it, so committing it moves a few cache slots and the
  next generation starts without a forward;
- committed text the engine has not seen is fed lazily with the next forward.

Each engine runs its PyTorch work on one dedicated thread (``threads`` intra-op threads),
so several models run side by side on separate cores. Releasing a state never goes
through that thread: it marks the state cancelled (a running call stops at its next token
or forward) and frees it at once, or as that call ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from fusion.engine import GREEDY, EngineError, Generation, Sampling, StopCheck
from fusion.engines.kv_arena import ArenaCache
from fusion.engines.transformers_state import Block, TransformersState, free_if_released

log = logging.getLogger(__name__)
T = TypeVar("T")


def _inference(fn: Callable[..., T], *args: Any) -> T:
    # Cache tensors are created under inference mode, so every later in-place edit of
    # them (appends, slot moves) must run under it too.
    with torch.inference_mode():
        return fn(*args)


class TransformersEngine:
    """Engine protocol on a Hugging Face causal LM (CPU fp32 by default)."""

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        *,
        threads: int = 1,
        device: str = "auto",
        dtype: str = "float32",
    ) -> None:
        self.name = name
        self.model_dir = Path(model_dir)
        self.threads = max(1, threads)
        self.device = device
        self.dtype = dtype
        self.max_model_len = 0
        self._model: Any = None
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"engine-{name}",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self._sliding_window: int | None = None
        self._dead: BaseException | None = None
        self._failures = 0
        self.open_states = 0  # requests holding a state here (metrics, leak checks)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self._run(self._load)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        started = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(
            str(self.model_dir), dtype=getattr(torch, self.dtype)
        )
        model = model.to(device)  # type: ignore[arg-type]
        model.eval()
        config = model.config.get_text_config()
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 0)
        layer_types = getattr(config, "layer_types", None) or []
        if "sliding_attention" in layer_types:
            self._sliding_window = int(config.sliding_window)
        self._num_layers = int(config.num_hidden_layers)
        self._device = torch.device(device)
        self._model = model
        log.info(
            "engine %s: loaded %s on %s in %.1f s (%d threads)",
            self.name,
            self.model_dir.name,
            device,
            time.monotonic() - started,
            self.threads,
        )

    async def shutdown(self) -> None:
        self._model = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineError(f"engine {self.name} failed: {self._dead}")
        if self._model is None:
            raise EngineError(f"engine {self.name} is not loaded")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(_inference, fn, *args)
            )
        except (EngineError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self._failed(exc)
            what = "out of memory" if isinstance(exc, MemoryError) else f"{type(exc).__name__}"
            raise EngineError(f"engine {self.name}: {what}: {exc}") from exc

    async def _call(self, fn: Callable[..., T], st: TransformersState, *args: Any) -> T:
        """``fn(st, *args)`` on the engine thread, holding the state, checked afterwards."""
        result: T = await self._run(self._locked, fn, st, *args)
        if fn != self._commit:  # model work succeeded: healthy again
            self._failures = 0
            self._dead = None
        return result

    @staticmethod
    def _locked(fn: Callable[..., T], st: TransformersState, *args: Any) -> T:
        try:
            with st.lock:
                if st.cancelled:
                    raise asyncio.CancelledError()
                result = fn(st, *args)
                st.check()
                return result
        finally:
            free_if_released(st)  # released while this call ran: free it now

    def _failed(self, exc: BaseException) -> None:
        # One failure may belong to one request's input; several in a row mean the
        # engine itself is broken: /health reports it until a call succeeds again.
        self._failures += 1
        if self._failures >= 3:
            self._dead = exc

    # -- protocol -----------------------------------------------------------------------
    async def open(self, request_id: str, prompt_ids: Sequence[int]) -> TransformersState:
        if self._model is None:
            raise EngineError(f"engine {self.name} is not loaded")
        if not prompt_ids:
            raise EngineError(f"engine {self.name}: empty prompt")
        self.open_states += 1
        return TransformersState(
            request_id=request_id, cache=ArenaCache(self._num_layers), ids=list(prompt_ids)
        )

    async def generate(
        self,
        state: TransformersState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling = GREEDY,
    ) -> Generation:
        return await self._call(self._generate, state, max_tokens, stop_ids, should_stop, sampling)

    async def score(
        self, state: TransformersState, candidates: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        if not candidates:
            return []
        return await self._call(self._score, state, [tuple(c) for c in candidates])

    async def commit(self, state: TransformersState, ids: Sequence[int]) -> None:
        # Bookkeeping only (slot moves are a few tokens); runs on the engine thread so it
        # is ordered with the forwards of this state.
        await self._call(self._commit, state, tuple(ids))

    async def release(self, state: TransformersState) -> None:
        """Cancel and free the state at once, without a trip through the engine thread
        (which may be busy with other requests or stuck in this one's call): a call
        running for it stops at its next token or forward and frees it as it ends."""
        if state.cancelled:
            return
        self.open_states -= 1
        state.cancelled = True
        free_if_released(state)

    # -- forwards -----------------------------------------------------------------------
    def _forward(
        self, st: TransformersState, blocks: Sequence[tuple[Sequence[int], int]], last_only: bool
    ) -> torch.Tensor:
        """Feed ``blocks`` of (ids, visible) after the cache end; each block sees cache
        slots ``[0, visible)`` and its own earlier tokens, at positions from ``visible``.
        Returns log-probs [tokens, vocab] (only the last row when ``last_only``)."""
        if st.cancelled:
            raise asyncio.CancelledError()
        start = st.cache.length
        ids = [t for b, _ in blocks for t in b]
        n = len(ids)
        block_start = torch.empty(n, dtype=torch.long)
        visible = torch.empty(n, dtype=torch.long)
        offset = 0
        for b, vis in blocks:
            block_start[offset : offset + len(b)] = start + offset
            visible[offset : offset + len(b)] = vis
            offset += len(b)
        positions = visible + (torch.arange(start, start + n) - block_start)
        plain = len(blocks) == 1 and blocks[0][1] == start
        masks = None if plain else self._masks(start, n, visible, block_start, positions)
        out = self._model(
            input_ids=torch.tensor([ids], device=self._device),
            position_ids=positions[None, :].to(self._device),
            attention_mask=masks,
            past_key_values=st.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        st.forwards += 1
        st.fed_tokens += n
        return torch.log_softmax(out.logits[0].float(), dim=-1).cpu()

    def _masks(
        self,
        start: int,
        n: int,
        visible: torch.Tensor,
        block_start: torch.Tensor,
        positions: torch.Tensor,
    ) -> Any:
        """Attention masks for packed blocks. (A plain causal append gets none: transformers
        builds its own, which keeps SDPA's fast paths, no mask for one token, native GQA.)"""
        q_slot = torch.arange(start, start + n)
        kv = torch.arange(start + n)
        allowed = (kv[None, :] < visible[:, None]) | (
            (kv[None, :] >= block_start[:, None]) & (kv[None, :] <= q_slot[:, None])
        )
        dtype = next(self._model.parameters()).dtype
        if self._sliding_window is None:
            return self._additive(allowed, dtype)
        kv_pos = kv.clone()
        kv_pos[start:] = positions
        in_window = (positions[:, None] - kv_pos[None, :]) < self._sliding_window
        return {
            "full_attention": self._additive(allowed, dtype),
            "sliding_attention": self._additive(allowed & in_window, dtype),
        }

    def _additive(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(self._device)

    def _feed_pending(self, st: TransformersState) -> None:
        st.cache.truncate(st.fed)
        st.blocks = []
        st.ahead_fed = 0
        st.ahead_next = None
        dists = self._forward(st, [(st.pending, st.fed)], last_only=True)
        st.fed = len(st.ids)
        st.next_lp = dists[-1]  # a one-row output: nothing larger is pinned

    def _drop_blocks(self, st: TransformersState) -> None:
        st.cache.truncate(st.fed + st.ahead_fed)
        st.blocks = []

    # -- generate -----------------------------------------------------------------------
    def _generate(
        self,
        st: TransformersState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling = GREEDY,
    ) -> Generation:
        self._drop_blocks(st)
        if st.pending:
            self._feed_pending(st)
        out: list[int] = []
        lps: list[float] = []
        stopped_on: int | None = None
        reused = 0
        while len(out) < max_tokens:
            if st.cancelled:  # released (e.g. timed out): stop at the next token
                raise asyncio.CancelledError()
            i = len(out)
            if i < len(st.ahead):
                reused += 1
            else:
                if i == 0:
                    dist = st.next_lp if st.next_lp is not None else self._refeed_last(st)
                elif st.ahead_fed == i and st.ahead_next is not None:
                    dist = st.ahead_next  # fed along with the last scoring pass
                else:
                    dist = self._dist_after_ahead(st, i)
                st.ahead_next = None
                tok = self._pick(st, dist, sampling)
                st.ahead.append(tok)
                st.ahead_lp.append(float(dist[tok]))
            out.append(st.ahead[i])
            lps.append(st.ahead_lp[i])
            if out[-1] in stop_ids:
                stopped_on = out[-1]
                break
            if should_stop(out):
                break
        return Generation(tuple(out), tuple(lps), stopped_on=stopped_on, reused=reused)

    def _refeed_last(self, st: TransformersState) -> torch.Tensor:
        """``next_lp`` when it was not kept and no look-ahead is fed: one token re-fed."""
        st.fed -= 1
        self._feed_pending(st)
        assert st.next_lp is not None
        return st.next_lp

    @staticmethod
    def _pick(st: TransformersState, dist: torch.Tensor, sampling: Sampling) -> int:
        if sampling.greedy:
            return int(torch.argmax(dist))
        if st.generator is None:
            st.generator = torch.Generator()
            if sampling.seed is not None:
                st.generator.manual_seed(sampling.seed)
            else:
                st.generator.seed()
        probs = torch.softmax(dist / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=st.generator))

    def _dist_after_ahead(self, st: TransformersState, i: int) -> torch.Tensor:
        """Distribution of the token after ``ahead[:i]``: feeds the unfed look-ahead."""
        st.cache.truncate(st.fed + st.ahead_fed)
        todo = st.ahead[st.ahead_fed : i]
        dists = self._forward(st, [(todo, st.fed + st.ahead_fed)], last_only=True)
        st.ahead_fed = i
        return dists[-1]

    # -- score --------------------------------------------------------------------------
    def _score(self, st: TransformersState, candidates: list[tuple[int, ...]]) -> list[list[float]]:
        self._drop_blocks(st)
        if st.pending:
            self._feed_pending(st)
        # The unfed look-ahead rides along in the same forward (nearly free when batched):
        # if this model's own candidate wins, its next generation needs no forward.
        extra = st.ahead[st.ahead_fed :] if st.ahead_next is None else []
        blocks: list[tuple[Sequence[int], int]] = []
        if extra:
            blocks.append((extra, st.fed + st.ahead_fed))
        # next_lp not kept (part of the look-ahead was committed): the last context token
        # once more, seeing the context before it, gives it in the same forward
        derive = st.next_lp is None
        if derive:
            blocks.append(([st.ids[-1]], st.fed - 1))
        blocks += [(c, st.fed) for c in candidates]
        skip = len(extra) + derive
        start = st.cache.length + skip
        dists = self._forward(st, blocks, last_only=False)
        if extra:
            st.ahead_fed = len(st.ahead)
            st.ahead_next = dists[len(extra) - 1].clone()
        if derive:
            st.next_lp = dists[skip - 1].clone()
        assert st.next_lp is not None
        results: list[list[float]] = []
        offset = skip
        for cand in candidates:
            n = len(cand)
            lps = [float(st.next_lp[cand[0]])]
            lps += [float(dists[offset + j - 1][cand[j]]) for j in range(1, n)]
            results.append(lps)
            after = dists[offset + n - 1].clone()
            st.blocks.append(Block(ids=cand, start=start + offset - skip, after=after))
            offset += n
        return results

    # -- commit -------------------------------------------------------------------------
    def _commit(self, st: TransformersState, ids: tuple[int, ...]) -> None:
        n = len(ids)
        if n == 0:
            return
        block = next((b for b in st.blocks if b.ids == ids), None)
        if not st.pending and tuple(st.ahead[:n]) == ids:
            self._commit_ahead(st, n)
        elif block is not None and not st.pending:
            st.cache.move(block.start, st.fed, n)
            st.cache.truncate(st.fed + n)
            st.ids.extend(ids)
            st.fed += n
            st.next_lp = block.after
            self._clear_ahead(st)
        else:
            st.cache.truncate(st.fed)
            st.ids.extend(ids)
            st.next_lp = None
            self._clear_ahead(st)
        st.blocks = []

    def _commit_ahead(self, st: TransformersState, n: int) -> None:
        st.cache.truncate(st.fed + st.ahead_fed)
        kept = min(st.ahead_fed, n)  # the rest becomes pending
        st.ids.extend(st.ahead[:n])
        st.fed += kept
        st.ahead_fed -= kept
        if n == len(st.ahead) and not st.pending:
            st.next_lp = st.ahead_next
            st.ahead_next = None
        else:
            st.next_lp = None  # fed with the pending tokens, or derived when scoring
        st.ahead = st.ahead[n:]
        st.ahead_lp = st.ahead_lp[n:]

    @staticmethod
    def _clear_ahead(st: TransformersState) -> None:
        st.ahead, st.ahead_lp, st.ahead_fed = [], [], 0
        st.ahead_next = None
