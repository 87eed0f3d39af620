"""One model's candidate for a fusion step (Cool-Fusion §2.2, the TextGen component).

The model generates greedily until its decoded text holds a prefix that ends at a common
word boundary (or its own, for ``cool_shortest``); that prefix is its candidate. Tokens
generated past the boundary stay in the engine as look-ahead. With ``until_boundary``
off it writes a whole continuation (Rerank).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fusion.engine import GREEDY, Generation, Sampling, StateHandle, TopLogprobs
from fusion.grammar import AnswerGrammar, MemberGrammar
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
    ended: bool  # the model ended its answer here (end token or one of its turn markers)
    own_ids: tuple[int, ...] | None  # its tokens for exactly ``text`` (+ end token), if any
    own_logprobs: tuple[float, ...] | None
    generated: int  # tokens the generation returned (look-ahead past ``text`` included)
    hit_cap: bool  # generation stopped at the token cap
    align_seconds: float = 0.0  # decoding and word-boundary checks while generating
    reused: int = 0  # of ``generated``, look-ahead the engine kept from an earlier step
    cut: bool = False  # cut to the grammar's longest valid prefix (its engine could not
    # constrain it, or it ended where the grammar does not)
    own_top: tuple[TopLogprobs, ...] | None = None  # with ``own_ids``, when the sampling
    # asked for the most likely tokens at each position
    # stopped before its segment ended: it could no longer win nor help another win
    # (``selection.Hopeless``); no candidate (empty text, not ended)
    abandoned: bool = False


@dataclass(frozen=True)
class StopFound:
    """What the stop check found in the text generated so far (offsets into that text)."""

    stop_at: int | None = None  # where a stop string starts (< 0: in the committed answer)
    ends_answer: bool = False  # that stop is a turn marker of the model, not a user stop
    cut_at: int | None = None  # the first word boundary every adapter shares


class _StopCheck:
    """The ``should_stop`` callback of one generation: decodes each step, records the
    decoded texts and what ended the generation, and times that work."""

    def __init__(
        self,
        codec: IncrementalCodec,
        adapters: Sequence[TokenizerAdapter],
        turn_markers: Sequence[str],
        user_stops: Sequence[str],
        until_boundary: bool,
        written: str = "",
        abandon: Callable[[str], bool] | None = None,
    ) -> None:
        self.codec = codec
        self.abandon = abandon  # told the text so far: True stops it without a candidate
        self.abandoned = False
        self.tail = codec.tail_text
        self.adapters = adapters
        self.stops = [(s, True) for s in turn_markers if s] + [(s, False) for s in user_stops if s]
        # the end of the answer committed so far: a turn marker may start there (a segment
        # cut right after "\n", then "User:"); user stops are the fused tracker's concern
        self.written = written
        self.until_boundary = until_boundary
        self.texts: list[str] = []  # decoded text after each generated token
        self.found = StopFound()
        self.seconds = 0.0

    def __call__(self, ids: Sequence[int]) -> bool:
        started = time.perf_counter()
        try:
            return self._check(ids)
        finally:
            self.seconds += time.perf_counter() - started

    def _check(self, ids: Sequence[int]) -> bool:
        text = complete_text(self.codec.decode_next(list(ids)))
        self.texts.append(text)
        found = ((self._find(text, stop, ends), ends) for stop, ends in self.stops)
        hits = [(at, ends) for at, ends in found if at is not None]
        if hits:
            at, ends = min(hits, key=lambda h: (h[0], not h[1]))
            self.found = StopFound(stop_at=at, ends_answer=ends)
            return True
        if self.until_boundary:
            p = first_common_boundary(self.tail + text, len(self.tail), self.adapters)
            if p is not None:
                self.found = StopFound(cut_at=p - len(self.tail))
                return True
        if self.abandon is not None:
            previous = self.texts[-2] if len(self.texts) > 1 else ""
            if not text.startswith(previous[:-1]):
                self.abandon = None  # a decode that rewrote its text: no stop is safe
            elif self.abandon(text):
                self.abandoned = True
                return True
        return False

    def _find(self, text: str, stop: str, turn_marker: bool) -> int | None:
        """Where ``stop`` starts in ``text`` (negative: in the committed answer before it)."""
        if not turn_marker:
            at = text.find(stop)
            return at if at >= 0 else None
        before = self.written[max(0, len(self.written) - len(stop) + 1) :]
        at = (before + text).find(stop)
        return at - len(before) if at >= 0 else None


async def propose(
    model: SourceModel,
    state: StateHandle,
    codec: IncrementalCodec,
    boundary_adapters: Sequence[TokenizerAdapter],
    *,
    cap: int,
    until_boundary: bool,
    user_stops: Sequence[str] = (),
    sampling: Sampling = GREEDY,
    written: str = "",
    grammar: AnswerGrammar | None = None,
    alone: bool = False,
    abandon: Callable[[str], bool] | None = None,
) -> Proposal:
    """Generate ``model``'s candidate after the shared text.

    The model's own turn markers end its answer, also one that starts at the end of
    ``written`` (the answer committed so far); ``user_stops`` (Rerank's request stop
    strings) cut it: the text before one is the candidate, an answer that did not end.
    A model writing ``alone`` (a source model by name) ends its candidate where one of
    its tokens ends, so that its answer is the tokens it wrote, as it would be alone."""
    check = _StopCheck(
        codec, boundary_adapters, model.stop_strings, user_stops, until_boundary, written, abandon
    )
    try:
        gen = await model.engine.generate(state, cap, model.stop_ids, check, sampling)
    finally:
        if isinstance(sampling.constraint, MemberGrammar):
            sampling.constraint.rewind()
    if check.abandoned:  # its tokens stay in the engine as look-ahead, as ever
        return Proposal(
            model.name,
            "",
            False,
            None,
            None,
            len(gen.ids),
            False,
            check.seconds,
            min(gen.reused, len(gen.ids)),
            abandoned=True,
        )
    text, ended, own, hit_cap = _candidate(gen, check, cap)
    if alone and own is None and not ended:
        text, own = _own_tokens(check.texts, text)
    cut = False
    if grammar is not None:
        valid, complete = grammar.valid_prefix(text)
        cut = valid != text or (ended and not complete)
        if cut:  # scored as text: no end token, and not the tokens it generated
            text, ended, own = valid, False, None
    own_ids, own_lps = (gen.ids[:own], gen.logprobs[:own]) if own is not None else (None, None)
    own_top = gen.top[:own] if own is not None and gen.top else None
    return Proposal(
        model=model.name,
        text=text,
        ended=ended,
        own_ids=own_ids,
        own_logprobs=own_lps,
        generated=len(gen.ids),
        hit_cap=hit_cap,
        align_seconds=check.seconds,
        reused=min(gen.reused, len(gen.ids)),
        cut=cut,
        own_top=own_top,
    )


def _candidate(gen: Generation, check: _StopCheck, cap: int) -> tuple[str, bool, int | None, bool]:
    """(text, ended, how many own tokens make exactly that text or None, hit the cap)."""
    n, texts, found = len(gen.ids), check.texts, check.found
    last = texts[-1] if texts else ""
    if gen.stopped_on is not None:
        return last, True, n, False
    if found.stop_at is not None:
        text = last[: max(found.stop_at, 0)]
        if found.ends_answer:
            # ended by a turn marker it wrote as text: scored with each model's end token,
            # its own included, since it never generated one
            return text, True, None, False
        # cut at a user stop string: the text before it, scored as text (no end token),
        # just as the fused text is when Cool stops there
        return text, False, _own_prefix(texts, text), False
    if found.cut_at is not None:
        text = last[: found.cut_at]
    elif check.until_boundary and n >= cap:
        tail = check.tail
        text = last[: stable_cut(tail + last, len(tail), check.adapters) - len(tail)]
    else:
        text = last
    own = _own_prefix(texts, text)
    if own is None:
        return text, False, None, n >= cap
    return text, False, own, found.cut_at is None


def _own_tokens(texts: Sequence[str], text: str) -> tuple[str, int | None]:
    """``text`` (a cut inside a token) as whole generated tokens: back to the last token
    that ends inside it, or, when the first token already runs past it, that token."""
    inside = [t for t in texts if t and text.startswith(t)]
    past = [t for t in texts if t.startswith(text) and len(t) > len(text)]
    whole = max(inside, key=len) if inside else past[0] if past else None
    return (text, None) if whole is None else (whole, _own_prefix(texts, whole))


def _own_prefix(texts: Sequence[str], text: str) -> int | None:
    """The number of generated tokens whose decoded text is exactly ``text``, if any."""
    return next((k + 1 for k, t in enumerate(texts) if t == text), None)
