"""Small frozen value types that flow through the fusion loop (no I/O, no framework)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fusion.engine import GREEDY, Sampling, TopLogprobs
from fusion.grammar import GrammarScores, GrammarSpec

Method = Literal["cool", "cool_shortest", "rerank", "cool_rerank", "vote"]
METHODS: tuple[Method, ...] = ("cool", "cool_shortest", "rerank", "cool_rerank", "vote")
# the methods that rerank whole answers of two or more members (fusion/rerank.py)
RERANKING: tuple[Method, ...] = ("rerank", "cool_rerank")


def reranks_alone(method: str, members: Sequence[str]) -> bool:
    """Whether ``method`` would rerank the answers of fewer than two members (nothing to
    choose between: the requests and configs that ask it are refused)."""
    return method in RERANKING and len(members) < 2


PplMode = Literal["mean", "sum"]
FinishReason = Literal["stop", "length"]
# how a step chose its segment. "gated": the leader wrote alone (its gate); "fused":
# several proposed and were scored; "filtered": several proposed, and the filters left one
# that could win, taken without scoring
StepKind = Literal["fused", "gated", "filtered"]
Rule = Literal["mean_ppl", "weighted", "zscore", "packllm", "leader", "gate"]
RULES: tuple[Rule, ...] = ("mean_ppl", "weighted", "zscore", "packllm", "leader", "gate")
FallbackRule = Literal["mean_ppl", "weighted", "zscore", "packllm", "leader"]
Aggregate = Literal["ppl", "nll"]


def perplexity(logprobs: Sequence[float], mode: PplMode = "mean") -> float:
    """Perplexity of a token sequence from its log-probabilities.

    ``mean`` (default): exp of the mean token NLL, the usual definition, which does not
    favour short candidates. ``sum``: exp of the summed NLL, as the paper's Eq. 1-2 print.
    """
    if not logprobs:
        return math.inf
    nll = -sum(logprobs)
    if mode == "mean":
        nll /= len(logprobs)
    return math.exp(min(nll, 700.0))


@dataclass(frozen=True)
class NllStats:
    """One model's calibration: mean and spread of its per-token NLL of segments."""

    mean: float
    std: float


def repeated(names: Sequence[str]) -> list[str]:
    """Names that occur more than once (a model fused twice would hold two engine states
    under one name: one leaks, and every segment is committed twice to the other)."""
    return sorted({n for n in names if list(names).count(n) > 1})


def each_once(models: list[str] | None) -> list[str] | None:
    """``models`` if no source model is named twice (ValueError naming them otherwise)."""
    twice = repeated(models or [])
    if twice:
        raise ValueError(f"a source model can take part once; named twice: {', '.join(twice)}")
    return models


@dataclass(frozen=True)
class SelectionPolicy:
    """How a step chooses among its candidates (``fusion.selection``, docs/SELECTION.md)."""

    rule: Rule = "mean_ppl"
    aggregate: Aggregate = "nll"  # for ``weighted``: mean of NLLs (robust), or of perplexities
    weights: tuple[tuple[str, float], ...] = ()  # static; models not listed weigh 1
    leader: str | None = None
    calibration: tuple[tuple[str, NllStats], ...] = ()
    packllm_temperature: float = 1.0
    gate_threshold: float = 0.5
    gate_fallback: FallbackRule = "weighted"
    repetition_ngram: int = 4
    repetition_limit: int = 0  # 0: the repetition guard is off
    leader_margin: float | None = None  # nats/token; None: the leader's veto is off
    leader_excess: float | None = None  # nats in all beyond the leader's own rate; None: off
    min_support: int = 1  # models that must have proposed a candidate (the leader's: any)

    @property
    def step_rule(self) -> Rule:
        """The rule that chooses among several candidates (for ``gate``: its fallback)."""
        return self.gate_fallback if self.rule == "gate" else self.rule


DEFAULT_POLICY = SelectionPolicy()


@dataclass(frozen=True)
class VoteParams:
    """Method ``vote`` (fusion/vote.py): whole answers sampled, mapped to keys by an
    extractor, the weighted majority key wins (docs/SELECTION.md, "Voting")."""

    answer: str | None = None  # the extractor (fusion/answers.py); vote needs one
    k: int = 4  # samples a member draws at once
    threshold: float = 0.75  # a member whose samples agree this much ends the sampling
    budget: int = 8  # samples in all
    temperature: float = 0.7  # when the request's is 0 (greedy samples would not differ)
    seed: int | None = None  # the samples' when the request gives none (None: random)


DEFAULT_VOTE = VoteParams()


@dataclass(frozen=True)
class FusionParams:
    """What one fused generation should do."""

    method: Method = "cool"
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    max_segment_tokens: int = 16
    ppl_mode: PplMode = "mean"
    models: tuple[str, ...] | None = None  # a subset of the source models, by name
    sampling: Sampling = GREEDY  # each source model samples its own candidates this way
    selection: SelectionPolicy = DEFAULT_POLICY
    grammar: GrammarSpec | None = None  # structured output: every segment keeps it valid
    # under a grammar, score candidates with raw log-probs or renormalised over what the
    # grammar allows at each token (docs/BENCHMARKS.md, "Structured outputs")
    grammar_scores: GrammarScores = "raw"
    # a source model alone only (token ids are one vocabulary's): report each answer
    # token's log-prob with this many most likely tokens at its position (None: off), and
    # the prompt's (completions' echo) likewise
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    vote: VoteParams = DEFAULT_VOTE


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a source model's text, its log-prob there (None: the prompt's first
    token, which follows nothing) and the most likely tokens at its position."""

    id: int
    logprob: float | None
    top: TopLogprobs = ()


@dataclass(frozen=True)
class Prompt:
    """Either a chat conversation or a raw completion prompt."""

    messages: tuple[dict[str, Any], ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None  # OpenAI function tools, for chat
    text: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class ScoredCandidate:
    """One distinct candidate text and how every model judged it."""

    text: str
    proposers: tuple[str, ...]
    ended: bool  # the proposer ended its answer here (end-of-sequence or a model stop)
    perplexities: tuple[tuple[str, float], ...]  # (scoring model, perplexity)
    mean_perplexity: float
    score: float | None = None  # the selection rule's aggregate (lower wins), if it ran
    excluded: bool = False  # by the repetition guard
    cut: bool = False  # cut to the grammar's longest valid prefix (a member not constrained)


@dataclass(frozen=True)
class StepTimings:
    """Where one fusion step's wall time went (seconds).

    ``generate``, ``score`` and ``commit`` are the wall times of those phases, models
    running concurrently, less the tokenizer work inside them; ``align`` is that tokenizer
    work (decoding, word-boundary checks, encoding candidates) summed over the models;
    ``other`` is the rest (selection, stop strings, bookkeeping). ``per_model`` is each
    model's own busy time in the step, so the slowest one is the step's critical path.
    """

    generate: float = 0.0
    score: float = 0.0
    commit: float = 0.0
    align: float = 0.0
    other: float = 0.0
    per_model: tuple[tuple[str, float], ...] = ()

    @property
    def total(self) -> float:
        return self.generate + self.score + self.commit + self.align + self.other


@dataclass(frozen=True)
class VoteSample:
    """One whole answer a member sampled for ``vote``, and the key it was read as."""

    model: str
    text: str
    key: str | None  # None: the extractor found no answer in it (it does not vote)
    ended: bool
    tokens: int


@dataclass(frozen=True)
class VoteTally:
    """How ``vote`` chose: every sample, each key's weighted votes (most first), the
    winning key and why the sampling stopped."""

    samples: tuple[VoteSample, ...]
    tally: tuple[tuple[str, float], ...]
    key: str | None  # None: no sample had a key (the answer is the lowest-perplexity one)
    stopped: str  # "agreed: <model>" or "budget" (or "no member left")
    tie_break: str | None = None  # how a tie between keys was broken, if there was one


@dataclass(frozen=True)
class Segment:
    """One selected piece of the fused answer, with its provenance."""

    index: int
    text: str  # text to emit now (held-back stop-string prefixes are not included)
    winner: str
    candidates: tuple[ScoredCandidate, ...]
    tokens: int  # tokens of the winning candidate in its proposer's tokenization
    finish_reason: FinishReason | None = None
    timings: StepTimings = field(default_factory=StepTimings)
    context_tokens: int = 0  # prompt + answer tokens before this step (first model's tokens)
    step: StepKind = "fused"
    rule: Rule = "mean_ppl"  # the rule that chose (the gate's fallback on fused steps)
    # models whose candidate the grammar cut to nothing (their engines cannot constrain)
    cut_to_nothing: tuple[str, ...] = ()
    # with ``FusionParams.logprobs``: the winner's tokens (its end token included)
    logprobs: tuple[TokenLogprob, ...] | None = None
    vote: VoteTally | None = None  # method vote: the samples and the vote

    @property
    def step_seconds(self) -> float:
        return self.timings.total


@dataclass
class ModelUsage:
    """Tokens one source model handled for a request."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0
    segments_won: int = 0
    dropped: str | None = None  # why the model left the request, if it did


@dataclass
class FusionOutcome:
    """Filled in while the loop runs; complete once it has finished."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    usage: dict[str, ModelUsage] = field(default_factory=dict)
    segments: int = 0
    # summed over every step, Cool+R's unemitted ones included: phase -> seconds
    phase_seconds: dict[str, float] = field(default_factory=dict)
    model_seconds: dict[str, float] = field(default_factory=dict)
    # with ``FusionParams.prompt_logprobs``: the prompt's tokens, known before any segment
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    def add_timings(self, t: StepTimings) -> None:
        for phase in ("generate", "score", "commit", "align", "other"):
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + getattr(t, phase)
        for name, secs in t.per_model:
            self.model_seconds[name] = self.model_seconds.get(name, 0.0) + secs
