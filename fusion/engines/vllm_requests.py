"""What the two vLLM engines ask vLLM for: the ``SamplingParams`` fields of each request.

The in-process engine builds ``SamplingParams(**fields)``; the remote engine sends the
same fields as JSON. Keeping them here means the two cannot drift.

A fusion step of a greedy request costs one round trip per model (``lookahead`` > 0):

- ``score`` sends one request per candidate, all at once, on ``context + candidate``
  with ``prompt_logprobs`` (the candidate's scores) and ``max_tokens = lookahead``: the
  greedy tokens after that candidate, which ``LookAhead.commit`` keeps when it wins;
- beside them, ``continuation``: the model's own look-ahead (its candidate and the tokens
  past it) extended to ``lookahead`` tokens past what its ``generate`` returned, kept
  when its own candidate wins;
- the next ``generate`` replays the winner's tokens (``Taker``) and asks vLLM only for
  what is still missing.

A scoring request generates the single token vLLM requires, and no continuation is sent
(the request pattern from before this look-ahead), whenever the tokens would not be
used: ``lookahead`` 0; a sampling request (its tokens are drawn by ``generate`` with its
seed offsets, so seeded answers stay as they were) or a greedy one with penalties or a
bias (its picks are not the model's plain argmax); and after a ``generate`` that ended
on a stop id or its token cap, or before any (the answer is over, or this is a scratch
state: Rerank's last scoring, PackLLM's prompt scoring).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fusion.engine import EngineError, Sampling, wrap_seed
from fusion.engines.vllm_logprobs import TOP_LOGPROBS, LookAhead, Taker, Top

log = logging.getLogger(__name__)

# Tokens generated after each scored candidate. A segment ends at the first word
# boundary every tokenizer shares, about 1.2 tokens on the default trio, and ``generate``
# needs one token more to see the boundary; every look-ahead token is one more decode
# pass before the scores come back, so a few tokens, not ``max_segment_tokens``.
LOOKAHEAD_TOKENS = 4


def generate_fields(taker: Taker, sampling: Sampling, context_len: int) -> dict[str, Any]:
    """A generation request for what ``taker`` still needs after the look-ahead."""
    fields: dict[str, Any] = {
        "max_tokens": taker.left,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "logprobs": TOP_LOGPROBS,
        "stop_token_ids": sorted(taker.stop_ids),
        "detokenize": False,
    }
    if sampling.seed is not None:
        fields["seed"] = wrap_seed(sampling.seed + context_len)
    fields.update(processor_fields(sampling))
    return fields


def processor_fields(sampling: Sampling) -> dict[str, Any]:
    """The request's logit processors as vLLM's ``SamplingParams`` fields (those set only).
    vLLM counts presence and frequency over the tokens the request generates: the whole
    answer for a model alone, one call's tokens in a fused answer (the committed answer
    is part of the prompt it resends); repetition covers prompt and output either way."""
    fields: dict[str, Any] = {}
    if sampling.presence_penalty:
        fields["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        fields["frequency_penalty"] = sampling.frequency_penalty
    if sampling.repetition_penalty != 1.0:
        fields["repetition_penalty"] = sampling.repetition_penalty
    if sampling.top_k > 0:
        fields["top_k"] = sampling.top_k
    if sampling.min_p:
        fields["min_p"] = sampling.min_p
    if sampling.logit_bias:
        fields["logit_bias"] = dict(sampling.logit_bias)
    return fields


def score_tokens(look: LookAhead, lookahead: int) -> int:
    """Tokens a scoring request generates after its candidate (vLLM needs at least 1)."""
    return lookahead if lookahead > 0 and look.goes_on else 1


def score_fields(look: LookAhead, lookahead: int, use_cache: bool) -> dict[str, Any]:
    """A scoring request: ``prompt_logprobs`` of ``context + candidate`` and the greedy
    tokens after it; ``use_cache`` False recomputes the whole prompt."""
    fields: dict[str, Any] = {
        "max_tokens": score_tokens(look, lookahead),
        "temperature": 0.0,
        "prompt_logprobs": 0,
        "logprobs": TOP_LOGPROBS,
        "detokenize": False,
        "skip_reading_prefix_cache": not use_cache,
    }
    if lookahead > 0 and look.goes_on:
        fields["stop_token_ids"] = sorted(look.stop_ids)
    return fields


def score_top_fields(n: int) -> dict[str, Any]:
    """A request for the prompt's log-probs with the ``n`` most likely tokens at each
    position, recomputed whole: vLLM leaves the entries of positions it read from its
    prefix cache unset, and nothing the state knows holds their alternatives."""
    return {
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": n,
        "detokenize": False,
        "skip_reading_prefix_cache": True,
    }


def continuation(
    look: LookAhead, context: list[int], lookahead: int
) -> tuple[list[int], dict[str, Any]] | None:
    """The request that extends this state's own look-ahead to ``lookahead`` tokens past
    what ``generate`` returned this step (prompt and fields), or None when none is needed
    (nothing generated since the last commit: this model has no candidate of its own)."""
    tail = len(look.ids) - look.taken
    if lookahead <= 0 or not look.goes_on or not look.taken or tail >= lookahead:
        return None
    if look.stop_ids.intersection(look.ids):  # the answer ends inside it
        return None
    fields = {
        "max_tokens": lookahead - tail,
        "temperature": 0.0,
        "logprobs": TOP_LOGPROBS,
        "stop_token_ids": sorted(look.stop_ids),
        "detokenize": False,
    }
    return context + look.ids, fields


async def score_and_extend(
    name: str,
    look: LookAhead,
    context: list[int],
    lookahead: int,
    scoring: Awaitable[list[list[float]]],
    fetch: Callable[[list[int], dict[str, Any]], Awaitable[tuple[list[int], list[Top]]]],
) -> list[list[float]]:
    """A step's scores (``scoring``: every candidate's request) and, beside them, the
    ``continuation`` request sent through ``fetch``, whose tokens extend ``look``. A failed
    continuation only costs its tokens: the next ``generate`` asks for them again."""

    async def extend() -> tuple[list[int], list[Top]] | None:
        asked = continuation(look, context, lookahead)
        if asked is None:
            return None
        try:
            return await fetch(*asked)
        except EngineError as exc:
            log.info("engine %s: look-ahead request failed: %s", name, exc)
            return None

    scores, more = await asyncio.gather(scoring, extend())
    if more is not None:
        look.extend(*more)
    return scores
