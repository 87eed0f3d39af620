"""Grammars on vLLM: the request argument our logits processor reads, and the start-up
check that a member's vLLM has that processor.

A vLLM engine that constrains (``constrains = True``) sends, with every request that
generates tokens for a state under a grammar (generation, and the look-ahead scoring
and continuation requests generate: the next ``generate`` replays it),
``SamplingParams.extra_args[GRAMMAR_ARG]``: the grammar's compiled text, the end ids its
vocabulary was built with, and ``before``, the answer's tokens in the request's prompt
(after the user's prompt: the committed answer, then the look-ahead or candidate the
request carries). The processor (``vllm_grammar_processor.py``, inside vLLM) starts its
matcher there and masks every token the request samples. Requests without the argument
cost the processor nothing.

This module imports neither vLLM nor llguidance at import time: the processor and both
engines share it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fusion.engine import TokenConstraint

log = logging.getLogger(__name__)

GRAMMAR_ARG = "fusion_grammar"
PROCESSOR = "fusion.engines.vllm_grammar_processor:GrammarLogitsProcessor"
# the probe forces a text no model writes unconstrained after PROBE_PROMPT
PROBE_PROMPT = "The capital of France is"
PROBE_TEXT = "~#~#"


@dataclass(frozen=True)
class GrammarArgs:
    """One request's grammar, as the processor receives it."""

    grammar: str  # llguidance's compiled grammar (``GrammarSpec.compiled``)
    eos: tuple[int, ...]  # the end ids the member's vocabulary was built with
    before: tuple[int, ...]  # the answer's tokens in the request's prompt


def grammar_fields(grammar: str, eos: Sequence[int], before: Sequence[int]) -> dict[str, Any]:
    """The ``SamplingParams`` field that puts a request's generated tokens under ``grammar``."""
    arg = {"grammar": grammar, "eos": [int(t) for t in eos], "before": [int(t) for t in before]}
    return {"extra_args": {GRAMMAR_ARG: arg}}


def constraint_fields(constraint: TokenConstraint | None, before: Sequence[int]) -> dict[str, Any]:
    """``grammar_fields`` of a member's grammar (a ``MemberGrammar``); none for no grammar
    or a constraint the processor cannot rebuild (the engine's ``take`` still stops where
    it refuses)."""
    grammar = getattr(constraint, "grammar", None)
    eos = getattr(constraint, "eos_ids", None)
    if not isinstance(grammar, str) or eos is None:
        return {}
    return grammar_fields(grammar, eos, before)


def request_grammar(extra_args: Mapping[str, Any] | None) -> GrammarArgs | None:
    """The grammar a request asks for (None: none); ValueError when malformed."""
    arg = (extra_args or {}).get(GRAMMAR_ARG)
    if arg is None:
        return None
    if not isinstance(arg, Mapping) or not isinstance(arg.get("grammar"), str):
        raise ValueError(f"extra_args.{GRAMMAR_ARG} must be an object with a grammar string")
    return GrammarArgs(arg["grammar"], _token_ids(arg, "eos"), _token_ids(arg, "before"))


def _token_ids(arg: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = arg.get(key)
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise ValueError(f"extra_args.{GRAMMAR_ARG}.{key} must be a list of token ids")
    return tuple(value)


def probe_fields(eos: Sequence[int]) -> dict[str, Any]:
    """A greedy request that the processor forces to write ``PROBE_TEXT`` then an end."""
    from fusion.grammar import GrammarSpec

    grammar = GrammarSpec("regex", re.escape(PROBE_TEXT)).compiled
    return {
        "max_tokens": len(PROBE_TEXT.encode()) + 1,
        "temperature": 0.0,
        "detokenize": False,
        **grammar_fields(grammar, eos, ()),
    }


async def processor_answers(
    generate: Callable[[list[int], dict[str, Any]], Awaitable[list[int]]],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    eos: Sequence[int],
) -> bool:
    """Whether the grammar processor constrains a vLLM: one probe request (``generate``:
    prompt and fields to the generated ids) must write exactly ``PROBE_TEXT``. With the
    member's end ids, the probe also builds the processor's vocabulary before the first
    real request needs it (seconds for a large one)."""
    ids = await generate(encode(PROBE_PROMPT), probe_fields(eos))
    text = decode([t for t in ids if t not in eos])
    if text != PROBE_TEXT:
        log.debug("grammar probe wrote %r, not %r", text, PROBE_TEXT)
    return text == PROBE_TEXT
