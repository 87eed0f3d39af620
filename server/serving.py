"""From OpenAI requests to fusion runs, and from fusion segments to OpenAI objects.

Only this layer knows both sides: the fusion loop yields ``Segment``s with provenance;
here they become ``chat.completion`` / ``text_completion`` objects and stream chunks
(one chunk per selected segment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from fusion.engine import Sampling
from fusion.loop import Fuser
from fusion.models import SourceModel
from fusion.types import FusionOutcome, FusionParams, Prompt, Segment, SelectionPolicy
from server.config import AppConfig, SelectionConfig
from server.errors import BadRequest, ContextLengthExceeded, ModelNotFound
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FusionOptions,
    SelectionOptions,
)

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """One choice to generate, and what came of it."""

    index: int
    prompt: Prompt
    params: FusionParams
    echo: str = ""
    outcome: FusionOutcome = field(default_factory=FusionOutcome)
    segments: list[Segment] = field(default_factory=list)


@dataclass
class Job:
    """A validated request: its choices plus how to answer."""

    kind: str  # "chat" | "text"
    model: str
    choices: list[Choice]
    stream: bool
    include_usage: bool
    trace: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def trace_of(seg: Segment) -> dict[str, Any]:
    return {
        "index": seg.index,
        "text": seg.text,
        "winner": seg.winner,
        "step": seg.step,
        "rule": seg.rule,
        "step_ms": round(seg.step_seconds * 1000, 1),
        "timings_ms": {
            phase: round(getattr(seg.timings, phase) * 1000, 1)
            for phase in ("generate", "score", "align", "commit", "other")
        },
        "model_ms": {name: round(s * 1000, 1) for name, s in seg.timings.per_model},
        "context_tokens": seg.context_tokens,
        "candidates": [
            {
                "text": c.text,
                "proposers": list(c.proposers),
                "ended": c.ended,
                "mean_perplexity": _finite(c.mean_perplexity),
                "score": None if c.score is None else _finite(c.score),
                "excluded": c.excluded,
                "perplexities": {name: _finite(p) for name, p in c.perplexities},
            }
            for c in seg.candidates
        ],
    }


class FusionService:
    """Validates requests against the loaded models and runs them through the fuser."""

    def __init__(self, config: AppConfig, models: list[SourceModel], metrics: Metrics) -> None:
        self.config = config
        self.models = {m.name: m for m in models}
        self.fuser = Fuser(models, window_pieces=config.fusion.window_pieces)
        self.metrics = metrics

    # -- catalogue ------------------------------------------------------------------------
    def model_cards(self) -> list[dict[str, Any]]:
        created = int(time.time())
        fused = self.config.fusion.name
        cards = [
            {
                "id": fused,
                "object": "model",
                "created": created,
                "owned_by": "fusion-server",
                "fusion": {
                    "sources": list(self.models),
                    "method": self.config.fusion.method,
                    "selection": self.config.fusion.selection.rule,
                },
            }
        ]
        for name, m in self.models.items():
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "fusion-server",
                    "parent": fused,
                    "max_model_len": m.max_model_len or None,
                }
            )
        return cards

    def model_card(self, model_id: str) -> dict[str, Any]:
        for card in self.model_cards():
            if card["id"] == model_id:
                return card
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")

    # -- request -> job -------------------------------------------------------------------
    def _params(
        self,
        model: str,
        opts: FusionOptions | None,
        max_tokens: int | None,
        stop: tuple[str, ...],
        sampling: Sampling,
    ) -> FusionParams:
        opts = opts or FusionOptions()
        cfg = self.config.fusion
        if model == cfg.name:
            subset = tuple(opts.models or cfg.models or ()) or None
            unknown = [n for n in subset or () if n not in self.models]
            if unknown:
                raise BadRequest(
                    f"unknown source models: {', '.join(unknown)}", param="fusion.models"
                )
            method = opts.method or cfg.method
        elif model in self.models:
            if opts.models and opts.models != [model]:
                raise BadRequest(
                    "fusion.models only applies to the fused model", param="fusion.models"
                )
            subset, method = (model,), "cool"
        else:
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        wanted = max_tokens or cfg.default_max_tokens
        if wanted > self.config.server.max_tokens_cap:
            raise BadRequest(
                f"max_tokens is {wanted}; this server allows at most "
                f"{self.config.server.max_tokens_cap}",
                param="max_tokens",
            )
        return FusionParams(
            method=method,
            max_tokens=wanted,
            stop=stop,
            max_segment_tokens=opts.max_segment_tokens or cfg.max_segment_tokens,
            ppl_mode=opts.ppl_mode or cfg.ppl_mode,
            models=subset,
            sampling=sampling,
            selection=self._selection(opts.selection),
        )

    def _selection(self, asked: SelectionOptions | None) -> SelectionPolicy:
        """The server's selection settings with the request's on top, checked."""
        base = self.config.fusion.selection
        if asked is None:
            return base.policy()
        merged = base.model_dump() | asked.model_dump(exclude_none=True)
        try:
            chosen = SelectionConfig.model_validate(merged)
        except ValidationError as exc:
            raise BadRequest(_first_error(exc), param="fusion.selection") from None
        for problem in chosen.problems(list(self.models)):
            field_name = problem.split(":", 1)[0]
            raise BadRequest(problem, param=f"fusion.{field_name}")
        return chosen.policy()

    @staticmethod
    def _sampling(temperature: float | None, top_p: float | None, seed: int | None) -> Sampling:
        return Sampling(temperature=temperature or 0.0, top_p=top_p or 1.0, seed=seed)

    def _check_context(self, prompt: Prompt, params: FusionParams) -> None:
        for m in self.fuser.select(params.models):
            limit = m.max_model_len
            if not limit:
                continue
            ids = (
                m.chat_prompt_ids(prompt.messages)
                if prompt.messages is not None
                else m.completion_prompt_ids(prompt.text or "")
            )
            if len(ids) + params.max_tokens > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens (source model "
                    f"{m.name}). However, you requested {len(ids) + params.max_tokens} tokens "
                    f"({len(ids)} in the prompt, {params.max_tokens} for the completion). "
                    "Please reduce the length of the prompt or of max_tokens.",
                    param="messages" if prompt.is_chat else "prompt",
                )

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        if req.logprobs or req.top_logprobs:
            raise BadRequest(
                "logprobs are not supported: a fused answer's tokens come from several "
                "tokenizers, so there is no single token distribution to report",
                param="logprobs",
            )
        try:
            messages = tuple({"role": m.role, "content": m.text()} for m in req.messages)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        params = self._params(
            req.model,
            req.fusion,
            req.max_new(),
            req.stop_list(),
            self._sampling(req.temperature, req.top_p, req.seed),
        )
        prompt = Prompt(messages=messages)
        self._check_context(prompt, params)
        choices = [Choice(i, prompt, params) for i in range(req.n or 1)]
        return self._job("chat", req, choices)

    def completion_job(self, req: CompletionRequest) -> Job:
        if req.logprobs is not None:
            raise BadRequest(
                "logprobs are not supported (see the chat endpoint's reason)", param="logprobs"
            )
        if req.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        try:
            prompts = req.prompts()
        except ValueError as exc:
            raise BadRequest(str(exc), param="prompt") from None
        params = self._params(
            req.model,
            req.fusion,
            req.max_tokens,
            req.stop_list(),
            self._sampling(req.temperature, req.top_p, req.seed),
        )
        choices = []
        for text in prompts:
            prompt = Prompt(text=text)
            self._check_context(prompt, params)
            for _ in range(req.n or 1):
                choices.append(Choice(len(choices), prompt, params, text if req.echo else ""))
        return self._job("text", req, choices)

    def _job(
        self, kind: str, req: ChatCompletionRequest | CompletionRequest, choices: list[Choice]
    ) -> Job:
        opts = req.stream_options
        return Job(
            kind,
            req.model,
            choices,
            bool(req.stream),
            bool(opts and opts.include_usage),
            bool(req.fusion and req.fusion.trace),
        )

    # -- running --------------------------------------------------------------------------
    async def segments(self, choice: Choice) -> AsyncIterator[Segment]:
        run = self.fuser.run(choice.prompt, choice.params, choice.outcome)
        async with contextlib.aclosing(run) as segments:
            async for seg in segments:
                choice.segments.append(seg)
                self.metrics.segment(choice.params.method, seg, choice.params.selection.rule)
                yield seg
        self.metrics.outcome(choice.params.method, choice.outcome)

    def log_done(self, job: Job, seconds: float, status: str) -> None:
        """One line per request; prompt and completion text only when ``log_text`` is on."""
        tokens = sum(c.outcome.completion_tokens for c in job.choices)
        log.info(
            "%s model=%s choices=%d tokens=%d status=%s %.2fs",
            self._id(job),
            job.model,
            len(job.choices),
            tokens,
            status,
            seconds,
        )
        if self.config.server.log_text:
            for c in job.choices:
                log.info(
                    "%s prompt=%r completion=%r",
                    self._id(job),
                    c.prompt.messages or c.prompt.text,
                    c.outcome.text,
                )

    async def run_all(self, job: Job) -> None:
        async def one(choice: Choice) -> None:
            async with contextlib.aclosing(self.segments(choice)) as segments:
                async for _ in segments:
                    pass

        await asyncio.gather(*(one(c) for c in job.choices))

    # -- job -> OpenAI objects ------------------------------------------------------------
    def usage(self, job: Job) -> dict[str, Any]:
        per_model: dict[str, dict[str, Any]] = {}
        for choice in job.choices:
            for name, u in choice.outcome.usage.items():
                agg = per_model.setdefault(
                    name,
                    {
                        "prompt_tokens": 0,
                        "generated_tokens": 0,
                        "scored_tokens": 0,
                        "segments_won": 0,
                    },
                )
                agg["prompt_tokens"] += u.prompt_tokens
                agg["generated_tokens"] += u.generated_tokens
                agg["scored_tokens"] += u.scored_tokens
                agg["segments_won"] += u.segments_won
                if u.dropped:
                    agg["dropped"] = u.dropped
        first = next(iter(job.choices[0].outcome.usage.values()), None)
        prompt = (first.prompt_tokens if first else 0) * len(job.choices)
        completion = sum(c.outcome.completion_tokens for c in job.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "models": per_model,
        }

    def response(self, job: Job) -> dict[str, Any]:
        choices = []
        for c in job.choices:
            body: dict[str, Any] = {
                "index": c.index,
                "finish_reason": c.outcome.finish_reason,
                "logprobs": None,
            }
            if job.kind == "chat":
                body["message"] = {"role": "assistant", "content": c.outcome.text}
            else:
                body["text"] = c.echo + c.outcome.text
            if job.trace:
                body["fusion"] = {"segments": [trace_of(s) for s in c.segments]}
            choices.append(body)
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return self._envelope(job, obj, choices, usage=self.usage(job))

    def _id(self, job: Job) -> str:
        return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id

    def _envelope(
        self, job: Job, obj: str, choices: list[dict[str, Any]], **extra: Any
    ) -> dict[str, Any]:
        return {
            "id": self._id(job),
            "object": obj,
            "created": job.created,
            "model": job.model,
            "choices": choices,
            **extra,
        }

    def _chunk_object(self, job: Job) -> str:
        return "chat.completion.chunk" if job.kind == "chat" else "text_completion"

    def chunk(
        self,
        job: Job,
        choice: int,
        delta: str | None = None,
        *,
        role: bool = False,
        finish: str | None = None,
        seg: Segment | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"index": choice, "finish_reason": finish, "logprobs": None}
        if job.kind == "chat":
            d: dict[str, Any] = {"role": "assistant"} if role else {}
            if delta is not None:
                d["content"] = delta
            body["delta"] = d
        else:
            body["text"] = delta or ""
        if seg is not None and job.trace:
            body["fusion"] = {"segments": [trace_of(seg)]}
        return self._envelope(job, self._chunk_object(job), [body])

    def usage_chunk(self, job: Job) -> dict[str, Any]:
        return self._envelope(job, self._chunk_object(job), [], usage=self.usage(job))
