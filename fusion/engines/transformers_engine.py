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

from fusion.engine import GREEDY, EngineError, Generation, Sampling, StopCheck, TopLogprobs
from fusion.engines.kv_arena import ArenaCache
from fusion.engines.ledger import Branch
from fusion.engines.sampler import shaped_logits, shift_of, top_of, truncates, with_shift
from fusion.engines.transformers_state import TransformersState, free_if_released

log = logging.getLogger(__name__)
T = TypeVar("T")


def _row(dists: torch.Tensor, i: int) -> torch.Tensor:
    """Row ``i`` of a forward's log-probs as a row of its own (a one-row output's view
    pins nothing larger), remembering its log-normaliser (``sampler.with_shift``)."""
    row = dists[i] if len(dists) == 1 else dists[i].clone()
    return with_shift(row, float(dists.shifts[i]))  # type: ignore[attr-defined]


def _inference(fn: Callable[..., T], *args: Any) -> T:
    # Cache tensors are created under inference mode, so every later in-place edit of
    # them (appends, slot moves) must run under it too.
    with torch.inference_mode():
        return fn(*args)


class TransformersEngine:
    """Engine protocol on a Hugging Face causal LM (CPU fp32 by default)."""

    constrains = True  # honours Sampling.constraint (grammars) in its own sampling

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        *,
        threads: int = 1,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        self.name = name
        self.trust_remote_code = trust_remote_code
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
        # auto: float32 on CPU (bfloat16 is ~10x slower there), the model's own on a GPU
        dtype: Any = getattr(torch, self.dtype) if self.dtype != "auto" else "auto"
        if self.dtype == "auto" and device == "cpu":
            dtype = torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            str(self.model_dir),
            dtype=dtype,
            trust_remote_code=self.trust_remote_code,
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
    async def open(
        self, request_id: str, prompt_ids: Sequence[int], room: int | None = None
    ) -> TransformersState:
        if self._model is None:
            raise EngineError(f"engine {self.name} is not loaded")
        if not prompt_ids:
            raise EngineError(f"engine {self.name}: empty prompt")
        self.open_states += 1
        return TransformersState.opened(request_id, ArenaCache(self._num_layers), list(prompt_ids))

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
        scores, _ = await self._call(self._score, state, [tuple(c) for c in candidates])
        return scores

    async def score_top(
        self, state: TransformersState, ids: Sequence[int], n: int
    ) -> tuple[list[float], list[TopLogprobs]]:
        if not ids:
            return [], []
        scores, tops = await self._call(self._score, state, [tuple(ids)], n)
        return scores[0], tops[0]

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
        logits = out.logits[0].float()
        lps = torch.log_softmax(logits, dim=-1)
        dists = lps.cpu()
        # each row's log-normaliser, for the rows kept (``_row``): logits = row + shift
        dists.shifts = (logits.amax(dim=-1) - lps.amax(dim=-1)).cpu()  # type: ignore[attr-defined]
        return dists

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
        book = st.book
        st.cache.truncate(book.done)
        book.take_branches()
        dists = self._forward(st, [(book.pending, book.done)], last_only=True)
        book.decoded_pending(_row(dists, -1))

    def _drop_blocks(self, st: TransformersState) -> None:
        st.book.take_branches()
        st.cache.truncate(st.in_cache)

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
        book = st.book
        if book.pending:
            self._feed_pending(st)
        out: list[int] = []
        lps: list[float] = []
        stopped_on: int | None = None
        reused = 0
        grammar = sampling.constraint
        while len(out) < max_tokens:
            if st.cancelled:  # released (e.g. timed out): stop at the next token
                raise asyncio.CancelledError()
            i = len(out)
            if i < len(book.ahead):
                reused += 1
            else:
                dist = book.tail
                if dist is None:
                    dist = self._refeed_last(st) if i == 0 else self._dist_after_ahead(st)
                allowed = dist
                if grammar is not None:
                    masked = grammar.mask(dist.detach().float().cpu().numpy())
                    allowed = torch.from_numpy(masked).to(dist.device, dist.dtype)
                tok = self._pick(st, allowed, sampling)
                top = top_of(dist, sampling.top_logprobs) if sampling.top_logprobs else None
                book.push(tok, float(dist[tok]), dist, top)  # raw: as the others score it
            if grammar is not None and not grammar.take(book.ahead[i]):
                break  # the grammar allows nothing more (or look-ahead it refuses)
            out.append(book.ahead[i])
            lps.append(book.ahead_lp[i])
            if out[-1] in stop_ids:
                stopped_on = out[-1]
                break
            if should_stop(out):
                break
        reused = min(reused, len(out))  # a replayed token the grammar refused is not out
        tops = book.tops(len(out)) if sampling.top_logprobs else ()
        return Generation(tuple(out), tuple(lps), stopped_on, reused, tops)

    def _refeed_last(self, st: TransformersState) -> torch.Tensor:
        """The row after the context when it was not kept and there is no look-ahead: the
        last context token fed once more."""
        st.book.unfeed_last()
        self._feed_pending(st)
        row = st.book.ctx_row
        assert row is not None
        return row

    @staticmethod
    def _pick(st: TransformersState, dist: torch.Tensor, sampling: Sampling) -> int:
        """The next token from ``dist``, the tail's log-probs: the request's penalties,
        bias and cuts first (``sampler``), then greedy, or temperature, top_p and a draw
        from the state's generator."""
        if sampling.shapes_logits or truncates(sampling):
            shift = shift_of(dist)
            if shift is None:  # a grammar's masked copy of the tail: its logits are the tail's
                shift = shift_of(st.book.tail)
            row = dist.detach().float().cpu().numpy()
            shaped = shaped_logits(row, sampling, st.book, st.history, shift)
            assert shaped is not None
            dist = torch.from_numpy(shaped)
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

    def _dist_after_ahead(self, st: TransformersState) -> torch.Tensor:
        """The row after the whole look-ahead: feeds what of it is not in the cache."""
        book = st.book
        st.cache.truncate(st.in_cache)
        dists = self._forward(st, [(book.unfed, st.in_cache)], last_only=True)
        row = _row(dists, -1)
        book.fed_ahead(row)
        return row

    # -- score --------------------------------------------------------------------------
    def _score(
        self, st: TransformersState, candidates: list[tuple[int, ...]], top: int = 0
    ) -> tuple[list[list[float]], list[list[TopLogprobs]]]:
        """Every candidate's log-probs (and with ``top``, the most likely tokens at each
        of its positions)."""
        self._drop_blocks(st)
        book = st.book
        if book.pending:
            self._feed_pending(st)
        done = book.done
        # The unfed look-ahead rides along in the same forward (nearly free when batched):
        # if this model's own candidate wins, its next generation needs no forward.
        extra = book.unfed
        blocks: list[tuple[Sequence[int], int]] = []
        if extra:
            blocks.append((extra, st.in_cache))
        # the row after the context not kept (part of the look-ahead was committed): the
        # last context token once more, seeing the context before it, gives it in the
        # same forward
        derive = book.ctx_row is None
        if derive:
            blocks.append(([book.ids[-1]], done - 1))
        blocks += [(c, done) for c in candidates]
        skip = len(extra) + derive
        start = st.cache.length + skip
        dists = self._forward(st, blocks, last_only=False)
        if extra:
            book.fed_ahead(_row(dists, len(extra) - 1))
        if derive:
            book.keep_ctx_row(_row(dists, skip - 1))
        ctx_row = book.ctx_row
        assert ctx_row is not None
        results: list[list[float]] = []
        tops: list[list[TopLogprobs]] = []
        offset = skip
        for cand in candidates:
            n = len(cand)
            lps = [float(ctx_row[cand[0]])]
            lps += [float(dists[offset + j - 1][cand[j]]) for j in range(1, n)]
            results.append(lps)
            rows = [ctx_row, *(dists[offset + j - 1] for j in range(1, n))] if top else []
            tops.append([top_of(row, top) for row in rows])
            after = _row(dists, offset + n - 1)
            book.add_branch(Branch(book.context_len, cand, start + offset - skip, (after,)))
            offset += n
        return results, tops

    # -- commit -------------------------------------------------------------------------
    def _commit(self, st: TransformersState, ids: tuple[int, ...]) -> None:
        st.apply(st.book.commit(ids))
