"""Prometheus metrics of one app instance (its own registry: no module-level state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fusion.types import FusionOutcome, Segment


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
        self.tokens = Counter("fusion_tokens", "Tokens by kind", ["model", "kind"], registry=r)
        self.segments = Counter("fusion_segments", "Selected segments", ["model"], registry=r)
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
        self.open_states = Gauge(
            "fusion_engine_open_states",
            "Request states open in a source engine",
            ["source"],
            registry=r,
        )
        self.dropped = Counter(
            "fusion_model_dropped", "Source models dropped mid-request", ["source"], registry=r
        )

    def segment(self, model: str, seg: Segment) -> None:
        self.segments.labels(model).inc()
        self.wins.labels(seg.winner).inc()
        self.step.observe(seg.step_seconds)

    def outcome(self, model: str, outcome: FusionOutcome) -> None:
        self.tokens.labels(model, "completion").inc(outcome.completion_tokens)
        for name, usage in outcome.usage.items():
            self.tokens.labels(name, "prompt").inc(usage.prompt_tokens)
            self.tokens.labels(name, "generated").inc(usage.generated_tokens)
            self.tokens.labels(name, "scored").inc(usage.scored_tokens)
            if usage.dropped:
                self.dropped.labels(name).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
