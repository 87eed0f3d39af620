"""A validated request (``Job``, its ``Choice``s) and how it reads as OpenAI objects:
``chat.completion`` / ``text_completion`` responses, stream chunks and usage."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fusion.tools import ToolCall, ToolMode, parse_calls
from fusion.types import FusionOutcome, FusionParams, Prompt, Segment
from server.logprobs import LogprobsAsk


@dataclass
class Choice:
    """One choice to generate, and what came of it."""

    index: int
    prompt: Prompt
    params: FusionParams
    prompt_index: int = 0  # which of the request's prompts (usage counts each once)
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
    single: bool = False  # runs one source model (its own admission lane)
    tool_mode: ToolMode = "none"  # else a chat answer that is calls is returned as calls
    tool_names: tuple[str, ...] = ()  # the functions a returned call may name
    logprobs: LogprobsAsk | None = None  # a source model alone: its tokens' log-probs
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def trace_of(seg: Segment) -> dict[str, Any]:
    out = _step_trace(seg)
    if seg.vote is not None:  # method vote: every sample, its key and model, the vote
        v = seg.vote
        out["vote"] = {
            "key": v.key,
            "stopped": v.stopped,
            "tie_break": v.tie_break,
            "tally": dict(v.tally),
            "samples": [
                {
                    "model": s.model,
                    "key": s.key,
                    "text": s.text,
                    "ended": s.ended,
                    "tokens": s.tokens,
                }
                for s in v.samples
            ],
        }
    return out


def _step_trace(seg: Segment) -> dict[str, Any]:
    return {
        "index": seg.index,
        "text": seg.text,
        "winner": seg.winner,
        "step": seg.step,  # "gated" (the leader alone), "fused" (scored) or "filtered"
        "rule": seg.rule,
        "cut_to_nothing": list(seg.cut_to_nothing),  # by the grammar: dropped
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
                "score": None if c.score is None else _finite(c.score),  # the rule's; lowest won
                "excluded": c.excluded,  # by the repetition guard
                "cut": c.cut,  # to the grammar's longest valid prefix
                "perplexities": {name: _finite(p) for name, p in c.perplexities},
            }
            for c in seg.candidates
        ],
    }


def usage(job: Job) -> dict[str, Any]:
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
    # as OpenAI and vLLM count: each prompt once (not once per choice of n), in the
    # first source model's tokens; usage.models counts what each engine processed
    prompt = 0
    for p_index in sorted({c.prompt_index for c in job.choices}):
        first_choice = next(c for c in job.choices if c.prompt_index == p_index)
        # (the first that took part: an ejected one counted none)
        took_part = (u for u in first_choice.outcome.usage.values() if u.prompt_tokens)
        first = next(took_part, None)
        prompt += first.prompt_tokens if first else 0
    completion = sum(c.outcome.completion_tokens for c in job.choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "models": per_model,
    }


def response(job: Job) -> dict[str, Any]:
    choices = []
    for c in job.choices:
        body: dict[str, Any] = {
            "index": c.index,
            "finish_reason": c.outcome.finish_reason,
            "logprobs": None,
        }
        if job.logprobs is not None:
            tokens = [t for s in c.segments for t in s.logprobs or ()]
            prompt = (c.outcome.prompt_logprobs or ()) if c.echo else ()
            body["logprobs"] = job.logprobs.writer().body(tokens, prompt)
        calls = tool_calls(job, c.outcome.text)
        if calls:
            body["message"] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [call.openai() for call in calls],
            }
            body["finish_reason"] = "tool_calls"
        elif job.kind == "chat":
            body["message"] = {"role": "assistant", "content": c.outcome.text}
        else:
            body["text"] = c.echo + c.outcome.text
        if job.trace:
            body["fusion"] = {"segments": [trace_of(s) for s in c.segments]}
        choices.append(body)
    obj = "chat.completion" if job.kind == "chat" else "text_completion"
    return _envelope(job, obj, choices, usage=usage(job))


def _envelope(job: Job, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": job.response_id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": choices,
        **extra,
    }


def _chunk_object(job: Job) -> str:
    return "chat.completion.chunk" if job.kind == "chat" else "text_completion"


def chunk(
    job: Job,
    choice: int,
    delta: str | None = None,
    *,
    role: bool = False,
    finish: str | None = None,
    seg: Segment | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"index": choice, "finish_reason": finish, "logprobs": logprobs}
    if job.kind == "chat":
        d: dict[str, Any] = {"role": "assistant"} if role else {}
        if delta is not None:
            d["content"] = delta
        body["delta"] = d
    else:
        body["text"] = delta or ""
    if seg is not None and job.trace:
        body["fusion"] = {"segments": [trace_of(seg)]}
    return _envelope(job, _chunk_object(job), [body])


def tool_calls(job: Job, text: str) -> list[ToolCall] | None:
    """The calls a chat answer is made of, where the request gave tools (None: text)."""
    if job.kind != "chat" or job.tool_mode == "none":
        return None
    return parse_calls(text, job.tool_names)


def tool_call_chunk(job: Job, choice: int, index: int, call: ToolCall) -> dict[str, Any]:
    """One call as a stream delta (OpenAI's: index, id, type, name and the arguments)."""
    body = {"index": choice, "finish_reason": None, "logprobs": None}
    body["delta"] = {"tool_calls": [call.openai(index)]}
    return _envelope(job, _chunk_object(job), [body])


def usage_chunk(job: Job) -> dict[str, Any]:
    return _envelope(job, _chunk_object(job), [], usage=usage(job))
