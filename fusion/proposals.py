"""One model's candidate for a fusion step (Cool-Fusion §2.2, the TextGen component).

The model generates greedily until its decoded text holds a prefix that ends at a common
word boundary (or its own, for ``cool_shortest``); that prefix is its candidate. Tokens
generated past the boundary stay in the engine as look-ahead. With ``until_boundary``
off it writes a whole continuation (Rerank).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fusion.engine import GREEDY, Sampling, StateHandle
from fusion.models import SourceModel
from tokenizers_align import (
    IncrementalCodec,
    TokenizerAdapter,
    complete_text,
    first_common_boundary,
    stable_cut,
)


@dataclass(frozen=True)
class Proposal:
    model: str
    text: str
    ended: bool  # the model ended its answer here (end token or one of its stop strings)
    own_ids: tuple[int, ...] | None  # its tokens for exactly ``text`` (+ end token), if any
    own_logprobs: tuple[float, ...] | None
    generated: int
    hit_cap: bool  # generation stopped at the token cap
    align_seconds: float = 0.0  # decoding and word-boundary checks while generating


async def propose(
    model: SourceModel,
    state: StateHandle,
    codec: IncrementalCodec,
    boundary_adapters: Sequence[TokenizerAdapter],
    *,
    cap: int,
    stop_strings: Sequence[str],
    until_boundary: bool,
    sampling: Sampling = GREEDY,
) -> Proposal:
    """Generate ``model``'s candidate after the shared text."""
    clock = 0.0  # seconds in decoding and boundary checks (the step's "align" time)
    tail = codec.tail_text
    texts: list[str] = []  # decoded text after each generated token
    found: dict[str, int] = {}

    def should_stop(ids: Sequence[int]) -> bool:
        nonlocal clock
        started = time.perf_counter()
        try:
            return check(ids)
        finally:
            clock += time.perf_counter() - started

    def check(ids: Sequence[int]) -> bool:
        text = complete_text(codec.decode_next(list(ids)))
        texts.append(text)
        for stop in stop_strings:
            at = text.find(stop)
            if at >= 0:
                found["stop"] = at if "stop" not in found else min(at, found["stop"])
        if "stop" in found:
            return True
        if until_boundary:
            p = first_common_boundary(tail + text, len(tail), boundary_adapters)
            if p is not None:
                found["cut"] = p - len(tail)
                return True
        return False

    gen = await model.engine.generate(state, cap, model.stop_ids, should_stop, sampling)
    ids, lps, n = gen.ids, gen.logprobs, len(gen.ids)

    def made(text: str, ended: bool, own: int | None, hit_cap: bool) -> Proposal:
        own_ids, own_lps = (ids[:own], lps[:own]) if own is not None else (None, None)
        return Proposal(model.name, text, ended, own_ids, own_lps, n, hit_cap, clock)

    if gen.stopped_on is not None:
        return made(texts[-1] if texts else "", True, n, False)
    if "stop" in found:
        # ended by a turn marker it wrote as text: scored with each model's end token,
        # its own included, since it never generated one
        return made(texts[-1][: found["stop"]], True, None, False)
    last = texts[-1] if texts else ""
    if "cut" in found:
        text = last[: found["cut"]]
    elif until_boundary and n >= cap:
        text = last[: stable_cut(tail + last, len(tail), boundary_adapters) - len(tail)]
    else:
        text = last
    own = next((k + 1 for k, t in enumerate(texts) if t == text), None)
    if own is None:
        return made(text, False, None, n >= cap)
    return made(text, False, own, "cut" not in found)
