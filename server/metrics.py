"""Prometheus metrics of one app instance (its own registry: no module-level state),
and the per-source-model statistics the playground shows (``/v1/fusion/stats``)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fusion.health import FaultEvent
from fusion.types import FusionOutcome, Segment

MEMBER_STATES = ("up", "ejected", "loading")


@dataclass
class SourceStats:
    """One source model's record over the fused segments (two or more models taking part)."""

    steps: int = 0  # fused steps it took part in
    won: int = 0
    proposed: int = 0  # candidates it proposed that had a finite perplexity
    perplexity_sum: float = 0.0  # of those candidates, averaged over the scoring models
    log_perplexity_sum: float = 0.0  # for the geometric mean, which one outlier cannot rule
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))  # for the median
    busy_seconds: float = 0.0  # its own generate + score + commit time in those steps

    def add_perplexity(self, ppl: float) -> None:
        self.proposed += 1
        self.perplexity_sum += ppl
        self.log_perplexity_sum += math.log(ppl)
        self.recent.append(ppl)

    def as_dict(self, fused_segments: int) -> dict[str, Any]:
        n = self.proposed
        return {
            "steps": self.steps,
            "segments_won": self.won,
            "share_won": self.won / fused_segments if fused_segments else 0.0,
            "mean_perplexity": self.perplexity_sum / n if n else None,
            "geomean_perplexity": math.exp(self.log_perplexity_sum / n) if n else None,
            "median_perplexity": statistics.median(self.recent) if self.recent else None,
            "mean_step_ms": 1000 * self.busy_seconds / self.steps if self.steps else None,
        }


RECENT = 2048  # candidate perplexities per source kept for the median


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fusion_requests", "HTTP requests", ["endpoint", "model", "status"], registry=r
        )
        self.latency = Histogram(
            "fusion_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        # "model" is always the requested model (the fused one or a source by name), "method"
        # the fusion method, "source" one source model
        self.tokens = Counter(
            "fusion_tokens",
            "Completion tokens of answers, by requested model and method",
            ["model", "method"],
            registry=r,
        )
        self.source_tokens = Counter(
            "fusion_source_tokens",
            "Tokens each source model handled, by kind (prompt, generated, scored)",
            ["source", "kind"],
            registry=r,
        )
        self.segments = Counter(
            "fusion_segments", "Selected segments", ["model", "method"], registry=r
        )
        self.wins = Counter(
            "fusion_segment_wins", "Segments won per source model", ["source"], registry=r
        )
        self.step = Histogram(
            "fusion_step_seconds",
            "Time per fusion step",
            registry=r,
            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
        self.in_flight = Gauge("fusion_requests_in_flight", "Requests generating", registry=r)
        self.queued = Gauge("fusion_requests_queued", "Requests waiting", registry=r)
        self.engine_up = Gauge(
            "fusion_engine_up", "1 if a source engine is healthy", ["source"], registry=r
        )
        self.model_available = Gauge(
            "fusion_model_available",
            "1 if a served model name can answer (a fused one: one of its engines is up)",
            ["model"],
            registry=r,
        )
        self.open_states = Gauge(
            "fusion_engine_open_states",
            "Request states open in a source engine",
            ["source"],
            registry=r,
        )
        self.free_sequences = Gauge(
            "fusion_engine_free_sequences",
            "Sequences a new request can take in a source engine (llama.cpp)",
            ["source"],
            registry=r,
        )
        self.dropped = Counter(
            "fusion_model_dropped",
            "Source models dropped mid-request: a call that failed, or was late",
            ["source", "reason"],
            registry=r,
        )
        self.ejections = Counter(
            "fusion_model_ejections",
            "Times a source model was ejected (left out of new requests until its probe passes)",
            ["source"],
            registry=r,
        )
        self.returns = Counter(
            "fusion_model_returns",
            "Times an ejected source model came back",
            ["source"],
            registry=r,
        )
        self.member_state = Gauge(
            "fusion_model_state",
            "1 for each source model's current state (up, ejected or loading)",
            ["source", "state"],
            registry=r,
        )
        self.win_share = Gauge(
            "fusion_source_win_share",
            "Share of fused segments (two or more models) won by each source model",
            ["source"],
            registry=r,
        )
        self.candidate_ppl = Histogram(
            "fusion_source_candidate_perplexity",
            "Perplexity of each source's candidates in fused steps, averaged over the models "
            "(the selection criterion; _sum/_count is the mean)",
            ["source"],
            registry=r,
            buckets=(1.1, 1.25, 1.5, 2, 3, 5, 10, 30, 100, 1000),
        )
        self.source_step = Histogram(
            "fusion_source_step_seconds",
            "Each source model's own busy time per fused step (generate + score + commit)",
            ["source"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.policy_steps = Counter(
            "fusion_policy_steps",
            "Cool steps per selection policy: gated (the leader alone), fused (scored) or "
            "filtered (the filters left one candidate that could win: not scored)",
            ["policy", "step"],
            registry=r,
        )
        self.sources: dict[str, SourceStats] = {}
        self.fused_segments = 0
        self.policies: dict[str, dict[str, int]] = {}  # policy -> {step kind: n}

    def segment(self, model: str, method: str, seg: Segment, policy: str | None = None) -> None:
        self.segments.labels(model, method).inc()
        self.wins.labels(seg.winner).inc()
        self.step.observe(seg.step_seconds)
        # scored by several models (a lone model's steps are "fused" with one)
        fused = seg.step == "fused" and bool(seg.candidates)
        fused = fused and len(seg.candidates[0].perplexities) > 1
        if seg.step != "fused" or fused:  # a lone model's steps are none of them
            name = policy or seg.rule
            counts = self.policies.setdefault(name, {"gated": 0, "fused": 0, "filtered": 0})
            counts[seg.step] += 1
            self.policy_steps.labels(name, seg.step).inc()
        if fused:
            self._fused_segment(seg)

    def _fused_segment(self, seg: Segment) -> None:
        self.fused_segments += 1
        busy = dict(seg.timings.per_model)
        for name, _ in seg.candidates[0].perplexities:
            stats = self.sources.setdefault(name, SourceStats())
            stats.steps += 1
            stats.won += name == seg.winner
            if name in busy:
                stats.busy_seconds += busy[name]
                self.source_step.labels(name).observe(busy[name])
        for c in seg.candidates:
            if not math.isfinite(c.mean_perplexity):
                continue
            for name in c.proposers:
                if name in self.sources:
                    self.sources[name].add_perplexity(c.mean_perplexity)
                    self.candidate_ppl.labels(name).observe(c.mean_perplexity)
        for name, stats in self.sources.items():
            self.win_share.labels(name).set(stats.won / self.fused_segments)

    def source_stats(self) -> dict[str, Any]:
        return {
            "fused_segments": self.fused_segments,
            "sources": {n: s.as_dict(self.fused_segments) for n, s in self.sources.items()},
            "policies": {n: dict(c) for n, c in self.policies.items()},
        }

    def outcome(self, model: str, method: str, outcome: FusionOutcome) -> None:
        self.tokens.labels(model, method).inc(outcome.completion_tokens)
        for name, usage in outcome.usage.items():
            self.source_tokens.labels(name, "prompt").inc(usage.prompt_tokens)
            self.source_tokens.labels(name, "generated").inc(usage.generated_tokens)
            self.source_tokens.labels(name, "scored").inc(usage.scored_tokens)

    def fault(self, event: FaultEvent, source: str) -> None:
        """A source model dropped from a request, ejected, or back (``fusion.health``)."""
        if event == "ejected":
            self.ejections.labels(source).inc()
        elif event == "returned":
            self.returns.labels(source).inc()
        else:
            self.dropped.labels(source, event.removeprefix("dropped_")).inc()

    def member_states(self, states: Mapping[str, str]) -> None:
        for source, now in states.items():
            for state in MEMBER_STATES:
                self.member_state.labels(source, state).set(state == now)

    def availability(self, engines: Mapping[str, bool], models: Mapping[str, bool]) -> None:
        """What the last health check found: each engine up or not, each served model
        name able to answer or not."""
        for name, up in engines.items():
            self.engine_up.labels(name).set(up)
        for name, ok in models.items():
            self.model_available.labels(name).set(ok)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
