"""One request's working state (``Run``) and the small pure helpers every phase uses:
candidates grouped by text, token counts, per-model sampling and cache room."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from fusion.clock import StepClock
from fusion.engine import Sampling, StateHandle
from fusion.grammar import AnswerGrammar, MemberGrammar
from fusion.models import SourceModel
from fusion.proposals import Proposal
from fusion.types import (
    FusionOutcome,
    FusionParams,
    Prompt,
    Rule,
    ScoredCandidate,
    StepKind,
    StepTimings,
)
from tokenizers_align import IncrementalCodec

WRITTEN_KEPT = 64  # characters of the committed answer kept for turn markers spanning it


class FusionError(RuntimeError):
    """No source model is left to continue the request."""


@dataclass
class Run:
    """Per-request working state of every model still taking part."""

    params: FusionParams
    prompt: Prompt
    models: list[SourceModel]
    states: dict[str, StateHandle] = field(default_factory=dict)
    codecs: dict[str, IncrementalCodec] = field(default_factory=dict)
    outcome: FusionOutcome = field(default_factory=FusionOutcome)
    # per scoring model: log-probs of every committed winner, for Cool+R
    fused_logprobs: dict[str, list[float]] = field(default_factory=dict)
    # this step's candidate encodings per (model, text): scoring and committing share them
    encoded: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    clock: StepClock = field(default_factory=StepClock)  # the current step's timings
    context_tokens: int = 0  # the first model's prompt + committed answer tokens
    releases: list[asyncio.Future[None]] = field(default_factory=list)  # of dropped models
    ended: bool = False  # the last chosen candidate ended the answer (Cool+R's fused text)
    prompt_weights: dict[str, float] | None = None  # PackLLM's, once per request
    written: str = ""  # the end of the committed answer, where a turn marker may start
    # structured output: the answer's grammar over bytes, and each constraining member's
    answer_grammar: AnswerGrammar | None = None
    cut_to_nothing: list[str] = field(default_factory=list)  # this step's, for the trace
    member_grammars: dict[str, MemberGrammar] = field(default_factory=dict)

    def wrote(self, text: str) -> None:
        self.written = (self.written + text)[-WRITTEN_KEPT:]

    def close_step(self) -> StepTimings:
        timings = self.clock.timings()
        self.outcome.add_timings(timings)
        return timings

    def encode(self, model: str, text: str) -> list[int]:
        key = (model, text)
        if key not in self.encoded:
            started = time.perf_counter()
            self.encoded[key] = self.codecs[model].encode_next(text)
            self.clock.add_align(time.perf_counter() - started)
        return self.encoded[key]


@dataclass(frozen=True)
class Candidate:
    """One distinct candidate text of a step, with the models that proposed it."""

    text: str
    ended: bool
    proposals: tuple[Proposal, ...]


@dataclass(frozen=True)
class Step:
    """One Cool step's outcome: the winner and how every candidate was judged."""

    win: Candidate
    scored: tuple[ScoredCandidate, ...]
    kind: StepKind
    rule: Rule


def group(proposals: Iterable[Proposal]) -> list[Candidate]:
    """Distinct (text, ended) candidates, in model order, each with its proposers."""
    groups: dict[tuple[str, bool], list[Proposal]] = {}
    for p in proposals:
        if not p.text and not p.ended:
            continue
        groups.setdefault((p.text, p.ended), []).append(p)
    return [Candidate(t, e, tuple(ps)) for (t, e), ps in groups.items()]


def own_logprobs(c: Candidate, model: str) -> tuple[float, ...] | None:
    """The log-probs ``model`` gave ``c`` when it generated it, if it proposed it."""
    for p in c.proposals:
        if p.model == model and p.own_logprobs is not None:
            return p.own_logprobs
    return None


def content_tokens(run: Run, p: Proposal) -> int:
    """Tokens of a proposal's text in its proposer's tokenization: not its end token, nor
    look-ahead it generated past the text (counted once the text is committed)."""
    if p.own_ids is not None:
        return len(p.own_ids) - (1 if p.ended else 0)
    return len(run.encode(p.model, p.text)) if p.text else 0


def model_sampling(run: Run, m: SourceModel) -> Sampling:
    """The request's sampling for one model: a seed of its own, so models differ, its
    grammar in its own tokens where its engine constrains, and how many most likely
    tokens to report (a source model alone)."""
    sampling = run.params.sampling
    if run.params.logprobs:  # the most likely tokens at each position, reported
        sampling = dataclasses.replace(sampling, top_logprobs=run.params.logprobs)
    grammar = run.member_grammars.get(m.name)
    constrains = getattr(m.engine, "constrains", False)
    if grammar is not None and not grammar.lost and constrains:
        sampling = dataclasses.replace(sampling, constraint=grammar)
    if sampling.greedy or sampling.seed is None:
        return sampling
    offset = list(run.outcome.usage).index(m.name)
    return dataclasses.replace(sampling, seed=sampling.seed + offset)


def room(run: Run, whole: bool = False) -> int:
    """The most tokens a request may hold in one engine beyond its prompt: its answer,
    plus a candidate per model to score (a segment each, or a whole answer each when
    ``whole``: Rerank, and Cool+R's final rerank), plus look-ahead of a segment. Counted
    in the request's tokens, not each engine's: an estimate, which the llama.cpp runtime
    backs by retrying a decode that finds no room once the others have gone."""
    params, n = run.params, len(run.models)
    if whole:
        return (n + 1) * params.max_tokens
    return params.max_tokens + (n + 1) * params.max_segment_tokens


def prompt_ids(prompt: Prompt, m: SourceModel) -> list[int]:
    if prompt.messages is not None:
        return m.chat_prompt_ids(prompt.messages, prompt.tools)
    return m.completion_prompt_ids(prompt.text or "")
