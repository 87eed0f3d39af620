"""The request's logit processors for the engines that pick their own tokens (llama.cpp,
transformers), written once: OpenAI's ``logit_bias``, ``presence_penalty`` and
``frequency_penalty``, vLLM's ``repetition_penalty``, ``top_k`` and ``min_p``.

Order and meaning are vLLM's (``vllm/v1/sample/sampler.py``): the bias is added, then
the penalties move the logits (repetition, frequency, presence), and a greedy pick takes
the argmax of that; a sampled pick then cuts by ``min_p`` (relative to the top token's
probability after temperature) and ``top_k``, and the engine applies temperature and
``top_p`` and draws as it always did. With none of them set nothing here runs, and
every pick is the one it was before they existed.

What the penalties count, in the model's own tokens, from the state's ``Ledger``:

- presence and frequency: the answer so far, that is the committed answer
  ``ids[prompt_len:]`` and the look-ahead ``ahead`` before the picked position (this
  call's tokens and those it replays): what vLLM counts as the output tokens of a
  request that wrote the whole answer;
- repetition: every token seen, prompt and answer.

``History`` keeps those counts per state. A pick follows the previous one's push, so it
usually adds one token; only when the ledger moved otherwise (a commit, a look-ahead
dropped) does it count the answer again, in one vectorised pass: at most once per call,
never per token.

``repetition_penalty`` is defined on raw logits (HF, vLLM and llama.cpp divide positive
ones and multiply negative ones, so their sign matters), while the engines keep log-prob
rows, the logits minus their log-normaliser. ``with_shift`` makes a row remember that
normaliser, so the logits are ``row + shift`` again; the other processors do not depend
on it (adding a constant to every logit changes none of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from fusion.engine import Sampling, TopLogprobs
from fusion.engines.ledger import Ledger

T = TypeVar("T")


class LogProbs(np.ndarray):
    """A numpy log-prob row that remembers its log-normaliser (``with_shift``)."""

    shift: float


def with_shift(row: T, shift: float) -> T:
    """``row`` (a numpy or torch log-prob row) remembering that its logits are
    ``row + shift``. A numpy row becomes a view of the same data; a torch row keeps its
    identity (tensors take attributes). Rows derived from it afterwards do not inherit it."""
    if isinstance(row, np.ndarray):
        out: Any = row.view(LogProbs)
    else:
        out = row
    out.shift = float(shift)
    return out  # type: ignore[no-any-return]


def shift_of(row: object) -> float | None:
    """The log-normaliser ``with_shift`` gave ``row`` (None: none given)."""
    shift = getattr(row, "shift", None)
    return None if shift is None else float(shift)


@dataclass
class History:
    """Per state: how often each token occurs in the answer so far (``counts``), and
    which tokens the prompt has (``in_prompt``), both indexed by token id. Allocated at
    the first pick that needs them; ``sync`` brings them up to the ledger's tokens."""

    counts: np.ndarray | None = None
    in_prompt: np.ndarray | None = None
    n_ids: int = -1  # len(book.ids) when last synced (-1: never)
    n_ahead: int = 0  # len(book.ahead) when last synced
    last: int = -1  # book.ahead[-1] when last synced (-1: no look-ahead)

    def sync(self, book: Ledger[Any, Any], vocab: int) -> np.ndarray:
        """The counts of ``ids[prompt_len:] + ahead``. The ledger only grows ``ahead`` in
        place by one ``push`` at a time; any other change (a commit, a dropped look-ahead)
        changes ``len(ids)`` or empties ``ahead``, and is counted again from scratch."""
        ids, ahead = book.ids, book.ahead
        n = self.n_ahead
        kept = len(ids) == self.n_ids and len(ahead) >= n and (not n or ahead[n - 1] == self.last)
        if self.counts is None or len(self.counts) != vocab or not kept or len(ahead) > n + 1:
            self._recount(book, vocab)
        elif len(ahead) == n + 1 and 0 <= ahead[-1] < vocab:
            self.counts[ahead[-1]] += 1
        self.n_ids, self.n_ahead = len(ids), len(ahead)
        self.last = ahead[-1] if ahead else -1
        assert self.counts is not None
        return self.counts

    def _recount(self, book: Ledger[Any, Any], vocab: int) -> None:
        answer = np.asarray(book.ids[book.prompt_len :] + book.ahead, dtype=np.int64)
        self.counts = _bins(answer, vocab)
        if self.in_prompt is None or len(self.in_prompt) != vocab:
            prompt = np.asarray(book.ids[: book.prompt_len], dtype=np.int64)
            self.in_prompt = _bins(prompt, vocab) > 0


def _bins(tokens: np.ndarray, vocab: int) -> np.ndarray:
    tokens = tokens[(tokens >= 0) & (tokens < vocab)]
    return np.bincount(tokens, minlength=vocab).astype(np.int64)


def top_of(row: Any, n: int) -> TopLogprobs:
    """The ``n`` most likely tokens of a log-prob row (numpy, or torch: ``topk``), most
    likely first: what OpenAI's ``top_logprobs`` reports. Never picked from, and only
    computed for requests that ask (a partial sort of the row)."""
    n = min(n, len(row))
    if n <= 0:
        return ()
    if hasattr(row, "topk"):
        values, ids = row.topk(n)
        pairs = zip(ids.tolist(), values.tolist())
        return tuple(sorted(pairs, key=lambda p: (-p[1], p[0])))  # ties: the argmax first
    ids = np.argpartition(-row, n - 1)[:n]
    ids = ids[np.lexsort((ids, -row[ids]))]  # ties: the lower id first, as the argmax
    return tuple((int(i), float(row[i])) for i in ids)


def truncates(sampling: Sampling) -> bool:
    """Whether ``top_k`` or ``min_p`` cut this request's draws (never a greedy pick's)."""
    return not sampling.greedy and (sampling.top_k > 0 or sampling.min_p > 0.0)


def shaped_logits(
    row: Any, sampling: Sampling, book: Ledger[Any, Any], history: History, shift: float | None
) -> np.ndarray | None:
    """The logits to pick from (float64, -inf where cut) when the request's processors
    change ``row`` (a numpy log-prob row, possibly masked by a grammar), else None: the
    engine picks from ``row`` itself. ``shift``: the row's log-normaliser (``with_shift``),
    needed by ``repetition_penalty`` only."""
    if not (sampling.shapes_logits or truncates(sampling)):
        return None
    x = np.array(row, dtype=np.float64)  # a plain copy
    if sampling.repetition_penalty != 1.0:
        if shift is None:
            raise ValueError("repetition_penalty needs the row's logits (a row without shift)")
        x += shift
    if sampling.logit_bias:
        ids = np.array([t for t, _ in sampling.logit_bias], dtype=np.int64)
        bias = np.array([b for _, b in sampling.logit_bias], dtype=np.float64)
        inside = (ids >= 0) & (ids < len(x))
        np.add.at(x, ids[inside], bias[inside])
    if sampling.presence_penalty or sampling.frequency_penalty or sampling.repetition_penalty != 1:
        _penalise(x, sampling, history.sync(book, len(x)), history.in_prompt)
    if not sampling.greedy:
        _truncate(x, sampling)
    return x


def _penalise(
    x: np.ndarray, sampling: Sampling, counts: np.ndarray, in_prompt: np.ndarray | None
) -> None:
    """vLLM's ``apply_penalties``: repetition over prompt and answer, then frequency and
    presence over the answer (OpenAI's definition), in place."""
    if sampling.repetition_penalty != 1.0:
        seen = counts > 0 if in_prompt is None else (counts > 0) | in_prompt
        at = np.flatnonzero(seen)
        p = sampling.repetition_penalty
        v = x[at]
        x[at] = np.where(v > 0, v / p, v * p)
    if sampling.presence_penalty or sampling.frequency_penalty:
        at = np.flatnonzero(counts)
        x[at] -= sampling.frequency_penalty * counts[at] + sampling.presence_penalty


def _truncate(x: np.ndarray, sampling: Sampling) -> None:
    """``min_p`` then ``top_k``, in place (-inf: cut). ``min_p`` keeps the tokens whose
    probability after temperature is at least ``min_p`` times the top one's, that is
    logits at least ``max + temperature * ln(min_p)``; ``top_k`` keeps the tokens at or
    above the k-th largest logit (ties kept, as vLLM)."""
    if sampling.min_p > 0.0:
        floor = x.max() + sampling.temperature * math.log(sampling.min_p)
        x[x < floor] = -np.inf
    k = sampling.top_k
    if 0 < k < len(x):
        kth = np.partition(x, len(x) - k)[len(x) - k]
        x[x < kth] = -np.inf
