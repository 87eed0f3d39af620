"""llama.cpp underneath the llamacpp engine: one model, one context, one decode thread.

The context is made for many sequences at once (``n_seq_max``) with one unified KV buffer
(``kv_unified``), so copying a sequence's span into another sequence is a metadata change
(cells get one more sequence id), never a recompute. That is what lets a request branch
its context for every candidate it scores and keep the winning branch as its context.

All llama.cpp calls happen on the decode thread. Work arrives as *jobs*: generators that
run on that thread, yield the tokens they want decoded (``Feed``s) and receive the
log-prob rows they asked for. Each tick the thread packs the pending feeds of every
active job, from every request, into one ``llama_decode`` (continuous batching), then
resumes each job with its rows. A job may also touch sequences (copy, remove) between its
yields, since it runs on the thread that owns the context.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fusion.engines.llamacpp_prefix import PrefixCache
from fusion.engines.sampler import with_shift

log = logging.getLogger(__name__)

Want = Literal["none", "last", "all"]


@dataclass(frozen=True)
class Feed:
    """Tokens to decode on one sequence from position ``pos``; ``want`` says which rows of
    log-probs to return (none, after the last token, after every token)."""

    seq: int
    pos: int
    tokens: tuple[int, ...]
    want: Want = "last"


# A job yields a list of feeds (or an empty list to wait a tick; at most ``n_batch`` tokens
# in all) and is sent, per feed, the rows of logits it wanted ([rows, vocab] float32).
# The rows are views of llama.cpp's output buffer, valid until the job yields again: a job
# copies what it keeps (``log_softmax``). Its return value resolves its future.
Job = Generator[list[Feed], list[np.ndarray], Any]


class LlamaError(RuntimeError):
    """llama.cpp refused or failed."""


@dataclass
class _Task:
    job: Job
    done: Callable[[Any, BaseException | None], None]
    cancelled: Callable[[], bool]
    feeds: list[Feed] = field(default_factory=list)
    started: bool = False


def log_softmax(row: np.ndarray) -> np.ndarray:
    """Log-probabilities of one row of logits, as a new float32 array that remembers its
    log-normaliser (``sampler.with_shift``: repetition_penalty works on the logits)."""
    out = row.astype(np.float32, copy=True)
    top = out.max()
    out -= top
    norm = np.log(np.exp(out).sum())
    out -= norm
    return with_shift(out, float(top) + float(norm))


def logsumexp(rows: np.ndarray, block: int = 16) -> np.ndarray:
    """Row-wise log-sum-exp of logits, ``block`` rows at a time (bounded temporaries)."""
    out = np.empty(len(rows), dtype=np.float64)
    for i in range(0, len(rows), block):
        part = rows[i : i + block]
        top = part.max(axis=1, keepdims=True)
        out[i : i + block] = (top + np.log(np.exp(part - top).sum(axis=1, keepdims=True)))[:, 0]
    return out


def process_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (``docker --cpus``; rounded down: a wide decode's spinning barriers must not outrun
    the quota) when there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    return cpus


class CpuShare:
    """The CPUs of one process, shared at every decode by its llama.cpp runtimes.

    A runtime is *at work* from a job's submission to its end. A runtime with
    ``max_threads`` above its ``threads`` that is alone at work (the leader of a gated
    step, a single model's request) decodes with every CPU, up to its ``max_threads``: it
    borrows the idle models' cores. Runtimes at work side by side decode with their own
    ``threads`` each. Off by default (``max_threads`` = ``threads``): llama.cpp's numbers
    do not depend on the thread count while the model's KV cache (every request's cells
    and the kept prefix contexts together: one unified cache) uses under 256 cells, but
    past that its flash attention splits a one-token decode's keys among the threads, so
    the numbers (and a near-tie) then depend on how many models were at work at that
    moment (docs/BENCHMARKS.md). Turning flash attention off removes that, but makes a
    token's numbers depend far more on the batch it shares (concurrent requests stop
    answering as they do alone), so it stays on.

    A wide decode runs on the share's one *wide* thread, and only when no other decode is
    running (else it runs narrow, at ``threads``); a narrow decode that starts while the
    wide one runs waits for it to end (any model's: one borrowing model makes the others
    wait a decode now and then). llama.cpp's OpenMP build keeps a thread pool per calling
    thread, and libgomp cuts its barriers' spinning to almost nothing once its pools hold
    more threads than the process has CPUs: borrowing on every runtime's own thread made
    the leader's 2-thread decodes 12-30% slower once the weak members had borrowed too.
    One wide thread keeps the pools at ``cpus`` threads (with ``threads: 1``). With
    spinning barriers, a wide decode must not share the CPUs with another decode: a team
    member put off a core leaves the other spinning at each of the graph's barriers
    (seen: a 5 s stall of a first call).
    """

    NARROW_WAIT = 10.0

    def __init__(self, cpus: int) -> None:
        self.cpus = max(1, cpus)
        self._jobs: dict[int, int] = {}  # id(runtime) -> jobs submitted and not ended
        self._lock = threading.Lock()
        self._decodes = threading.Condition()  # guards the two below
        self._narrow = 0  # narrow decodes running
        self._wide_busy = False  # a decode runs on the wide thread
        self._wide: queue.SimpleQueue[Callable[[], None]] | None = None

    def begin(self, key: int) -> None:
        with self._lock:
            self._jobs[key] = self._jobs.get(key, 0) + 1

    def end(self, key: int) -> None:
        with self._lock:
            left = self._jobs.get(key, 0) - 1
            if left > 0:
                self._jobs[key] = left
            else:
                self._jobs.pop(key, None)

    def forget(self, key: int) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def at_work(self) -> int:
        with self._lock:
            return len(self._jobs)

    def alone(self, key: int) -> bool:
        """No runtime but ``key``'s is at work."""
        with self._lock:
            return self._jobs.keys() <= {key}

    def decode(self, key: int, own: int, most: int, fn: Callable[[int], Any]) -> Any:
        """Run ``fn(threads)``, a decode of runtime ``key`` whose own threads are ``own``:
        on the wide thread with every CPU (at most ``most``) when the runtime is alone at
        work and no other decode runs, else on the caller's thread with ``own`` threads,
        once no wide decode runs (waiting at most ``NARROW_WAIT`` seconds: a wide decode
        that never ends must not stop every model)."""
        wide = min(most, self.cpus)
        if wide > own and self.alone(key):
            with self._decodes:
                taken = not self._wide_busy and not self._narrow
                if taken:
                    self._wide_busy = True
            if taken:
                return self._run_wide(lambda: fn(wide))
        with self._decodes:
            deadline = time.monotonic() + self.NARROW_WAIT
            while self._wide_busy and (left := deadline - time.monotonic()) > 0:
                self._decodes.wait(left)
            if self._wide_busy:
                log.warning(
                    "a wide llama.cpp decode runs past %.0f s: decoding beside it",
                    self.NARROW_WAIT,
                )
            self._narrow += 1
        try:
            return fn(own)
        finally:
            with self._decodes:
                self._narrow -= 1

    def _run_wide(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the wide thread (taken by ``decode``), wait, then free it."""
        try:
            if self._wide is None:
                calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
                threading.Thread(
                    target=self._wide_loop, args=(calls,), name="llamacpp-wide", daemon=True
                ).start()
                self._wide = calls  # only once its thread runs
            done = threading.Event()
            out: list[Any] = []

            def call() -> None:
                try:
                    out.append((fn(), None))
                except BaseException as exc:  # raised again on the caller's thread
                    out.append((None, exc))
                finally:
                    done.set()

            self._wide.put(call)
            done.wait()
            value, exc = out[0]
            if exc is not None:
                raise exc
            return value
        finally:
            with self._decodes:
                self._wide_busy = False
                self._decodes.notify_all()

    @staticmethod
    def _wide_loop(calls: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            calls.get()()


# every runtime of this process shares these (tests may give a runtime its own)
CPUS = CpuShare(process_cpus())


class LlamaRuntime:
    """A loaded GGUF model with one multi-sequence context and its decode thread."""

    def __init__(
        self,
        gguf: Path,
        *,
        threads: int,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        name: str = "",
        prefix_entries: int = 0,
        split_below: int = 0,
        max_threads: int | None = None,
        cpus: CpuShare | None = None,
    ) -> None:
        import llama_cpp as lc

        self._lc = lc
        # llama.cpp's own log lines (per tensor, per context) only at our debug level
        quiet = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
        logging.getLogger("llama-cpp-python").setLevel(quiet)
        self.name = name or gguf.stem
        self.n_batch = n_batch
        # A tick of 2..split_below tokens is decoded one token per llama_decode: on CPUs
        # llama.cpp's batched matmul (llamafile sgemm) costs far more than that for a
        # handful of tokens (docs/BENCHMARKS.md); 0 or 1: never split.
        self.split_below = split_below
        # threads per decode: ``threads`` at least, more while other runtimes are idle
        self.threads = threads
        self.cpus = CPUS if cpus is None else cpus
        self.max_threads = max(threads, max_threads or threads)
        self._n_threads = threads  # the context's setting now
        self._dead = False  # the decode thread has ended
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = lc.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not model:
            raise LlamaError(f"llama.cpp could not load {gguf}")
        self._model = model
        self._vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(model))
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True  # branching a sequence is a metadata copy
        cparams.swa_full = True  # sliding-window layers keep every position: spans stay copyable
        cparams.no_perf = True
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lc.llama_model_free(model)
            raise LlamaError(f"llama.cpp could not create a context for {gguf}")
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self.n_seq_max = int(lc.llama_n_seq_max(ctx))
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._one = lc.llama_batch_init(1, 0, 1)  # a split tick's single token
        self._free_seqs = list(range(self.n_seq_max - 1, -1, -1))
        # finished contexts kept for prompts that start the same way (a quarter of the cells)
        self.prefix = PrefixCache(
            self.give_seq, max_entries=prefix_entries, max_tokens=self.n_ctx // 4
        )
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._tasks: list[_Task] = []
        self.decodes = 0  # llama_decode calls (tests, stats)
        self.decoded_tokens = 0
        self.max_batch_seqs = 0  # most distinct sequences seen in one decode
        # decode-thread time: in llama_decode (with any wait for another model's wide
        # decode to end, CpuShare.decode), and in jobs (log-probs, stop checks)
        self.seconds = {"decode": 0.0, "jobs": 0.0}
        self._thread = threading.Thread(
            target=self._loop, name=f"llamacpp-{self.name}", daemon=True
        )
        self._thread.start()

    # -- vocabulary -----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (no special tokens added or parsed)."""
        data = text.encode()
        size = len(data) + 8
        buf = (self._lc.llama_token * size)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, size, False, False)
        if n < 0:
            raise LlamaError(f"tokenize needed {-n} tokens")
        return list(buf[:n])

    # -- sequences (decode thread only) --------------------------------------------------
    def take_seq(self) -> int | None:
        """A free sequence, evicting a prefix-cache entry if need be; None if all are live."""
        if not self._free_seqs:
            self.prefix.evict()
        return self._free_seqs.pop() if self._free_seqs else None

    def give_seq(self, seq: int) -> None:
        self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free_seqs.append(seq)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def free_seqs(self) -> int:
        """Sequences a request can take now (free ones and prefix-cache entries)."""
        return len(self._free_seqs) + len(self.prefix)

    def copy_span(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._lc.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def drop_from(self, seq: int, pos: int) -> None:
        """Remove ``seq``'s cells at positions ``pos`` and after."""
        if not self._lc.llama_memory_seq_rm(self._mem, seq, pos, -1):
            raise LlamaError(f"could not cut sequence {seq} at {pos}")

    def seq_end(self, seq: int) -> int:
        """One past the last position ``seq`` holds (0 when empty)."""
        return int(self._lc.llama_memory_seq_pos_max(self._mem, seq)) + 1

    # -- jobs -----------------------------------------------------------------------------
    def submit(self, job: Job, cancelled: Callable[[], bool]) -> asyncio.Future[Any]:
        """Run ``job`` on the decode thread; the future resolves with its return value."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(value: Any, exc: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(value)

            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(settle)

        if not self._dead:  # a dead loop would never end the job
            self.cpus.begin(id(self))
        self._queue.put(_Task(job, done, cancelled))
        return future

    def run_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the decode thread at its next tick, without waiting for it."""

        def job() -> Job:
            fn()
            return None
            yield []  # pragma: no cover - makes this a generator

        if not self._dead:
            self.cpus.begin(id(self))
        self._queue.put(_Task(job(), lambda v, e: None, lambda: False))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.cpus.forget(id(self))
        lc = self._lc
        lc.llama_batch_free(self._batch)
        lc.llama_batch_free(self._one)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)

    # -- the decode thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # shut down or died: no longer at work either way
            self._dead = True
            self.cpus.forget(id(self))

    def _serve(self) -> None:
        while True:
            busy = any(t.feeds for t in self._tasks)
            try:
                # idle: sleep until work arrives; tasks waiting for a sequence: poll gently
                task = self._queue.get(block=not busy, timeout=None if not self._tasks else 0.005)
                while True:
                    if task is None:
                        self._fail_all(LlamaError(f"engine {self.name} shut down"))
                        return
                    self._tasks.append(task)
                    task = self._queue.get_nowait()
            except queue.Empty:
                pass
            self._advance_new()
            self._tick(self._tasks)

    def _advance_new(self) -> None:
        for task in list(self._tasks):
            if task.cancelled():
                self._finish(task, None, LlamaError("cancelled"))
            elif not task.started:
                task.started = True
                self._step(task, None)
            elif not task.feeds:
                self._step(task, [])  # it waited a tick (no free sequence): try again

    def _step(self, task: _Task, rows: list[np.ndarray] | None) -> None:
        try:
            feeds = task.job.send(rows)  # type: ignore[arg-type]
        except StopIteration as stop:
            self._finish(task, stop.value, None)
            return
        except Exception as exc:
            self._finish(task, None, exc)
            return
        size = sum(len(f.tokens) for f in feeds)
        if size > self.n_batch:  # it could never be scheduled
            self._finish(
                task,
                None,
                LlamaError(
                    f"a job asked for {size} tokens in one decode "
                    f"(at most n_batch = {self.n_batch})"
                ),
            )
            return
        task.feeds = list(feeds)

    def _finish(self, task: _Task, value: Any, exc: BaseException | None) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        self.cpus.end(id(self))
        if exc is not None:
            task.job.close()
        task.done(value, exc)

    def _fail_all(self, exc: BaseException) -> None:
        for task in list(self._tasks):
            self._finish(task, None, exc)

    def _tick(self, tasks: list[_Task]) -> None:
        """One llama_decode over the feeds of as many tasks as fit in a batch."""
        chosen: list[_Task] = []
        budget = self.n_batch
        for task in tasks:
            size = sum(len(f.tokens) for f in task.feeds)
            if not task.feeds or size > budget:
                continue
            chosen.append(task)
            budget -= size
        if not chosen:
            return
        # tasks left out this tick (no room in the batch) go first in the next one
        self._tasks = [t for t in self._tasks if t not in chosen] + [
            t for t in self._tasks if t in chosen
        ]
        outputs = self._fill(chosen)
        total = sum(n for per_task in outputs for n in per_task)
        started = time.perf_counter()
        n_tokens = self._batch.n_tokens
        rc, table = self.cpus.decode(
            id(self), self.threads, self.max_threads, lambda n: self._decode(total, n_tokens, n)
        )
        self.seconds["decode"] += time.perf_counter() - started
        if rc != 0:
            self._decode_failed(rc, chosen)
            return
        self.decoded_tokens += n_tokens
        self.max_batch_seqs = max(
            self.max_batch_seqs, len({f.seq for t in chosen for f in t.feeds})
        )
        row = 0
        for task, per_feed in zip(chosen, outputs):
            rows = []
            for n in per_feed:
                rows.append(table[row : row + n])
                row += n
            task.feeds = []
            started = time.perf_counter()
            self._step(task, rows)
            self.seconds["jobs"] += time.perf_counter() - started

    def _decode(self, total: int, n_tokens: int, threads: int) -> tuple[int, np.ndarray]:
        """The filled batch decoded with ``threads`` threads (on the calling thread): its
        return code and its ``total`` output rows."""
        if threads != self._n_threads:
            self._lc.llama_set_n_threads(self._ctx, threads, threads)
            self._n_threads = threads
        if 2 <= n_tokens <= self.split_below:
            return self._decode_split(total)
        rc = self._lc.llama_decode(self._ctx, self._batch)
        table = np.empty((0, self.n_vocab), dtype=np.float32)
        if rc == 0 and total:
            logits = self._lc.llama_get_logits(self._ctx)
            table = np.ctypeslib.as_array(logits, shape=(total, self.n_vocab))
        self.decodes += 1
        return rc, table

    def _fill(self, chosen: list[_Task]) -> list[list[int]]:
        i = 0
        outputs: list[list[int]] = []
        for task in chosen:
            per_feed = []
            for f in task.feeds:
                n = len(f.tokens)
                for k, tok in enumerate(f.tokens):
                    out = f.want == "all" or (f.want == "last" and k == n - 1)
                    self._put(i, tok, f.pos + k, f.seq, out)
                    i += 1
                per_feed.append(n if f.want == "all" else (1 if f.want == "last" else 0))
            outputs.append(per_feed)
        self._batch.n_tokens = i
        return outputs

    def _decode_split(self, total: int) -> tuple[int, np.ndarray]:
        """The filled batch decoded one token at a time, in order (a sequence's tokens
        stay in position order); the output rows as one decode would return them. On a
        failure the tokens already decoded are taken out of the cache again, so the tick
        can be retried whole."""
        batch, one, lc = self._batch, self._one, self._lc
        table = np.empty((total, self.n_vocab), dtype=np.float32)
        row = 0
        done: dict[int, int] = {}  # seq -> first position decoded in this tick
        for i in range(batch.n_tokens):
            seq, pos = batch.seq_id[i][0], batch.pos[i]
            one.n_tokens = 1
            one.token[0], one.pos[0] = batch.token[i], pos
            one.n_seq_id[0], one.seq_id[0][0] = 1, seq
            one.logits[0] = batch.logits[i]
            rc = lc.llama_decode(self._ctx, one)
            if rc != 0:
                for s, p in done.items():
                    with contextlib.suppress(LlamaError):
                        self.drop_from(s, p)
                return rc, table
            self.decodes += 1
            done.setdefault(seq, pos)
            if batch.logits[i]:
                logits = lc.llama_get_logits_ith(self._ctx, -1)
                table[row] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
                row += 1
        return 0, table

    def _put(self, i: int, token: int, pos: int, seq: int, output: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if output else 0

    def _decode_failed(self, rc: int, chosen: list[_Task]) -> None:
        if rc == 1 and len(self.prefix):
            self.prefix.clear()  # live requests before kept contexts
            self._tick(chosen)
            return
        if rc == 1 and len(chosen) > 1:
            # No KV room for all of them at once: the first goes alone now, the others
            # keep their feeds for a later tick (back-pressure, never a drop).
            self._tick(chosen[:1])
            return
        what = "no room in the KV cache" if rc == 1 else f"llama_decode returned {rc}"
        for task in chosen:
            self._finish(task, None, LlamaError(what))  # the engine names itself


def ctypes_ok() -> bool:
    """Whether llama-cpp-python's bindings import (the shared library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return bool(ctypes)
