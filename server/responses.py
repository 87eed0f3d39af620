"""The Responses API (``POST /v1/responses``) answered through the chat path.

A ``ResponsesRequest`` becomes a ``ChatCompletionRequest``: ``instructions`` as a system
message first, then ``input`` (a string is one user message; message items keep their
role), ``max_output_tokens`` as ``max_completion_tokens``, ``text.format`` as
``response_format`` (so a JSON schema is one grammar for the fused answer, as on chat).
The chat job's answer becomes a ``response`` object (one ``message`` output item with one
``output_text`` part), and its chunk stream the Responses event stream
(``server/responses_events.py``).

The server is stateless: ``store``, ``previous_response_id``, ``conversation`` and
``background`` are refused unless they ask for nothing. OpenAI's ``store`` defaults to
true, but its SDK sends ``store`` only when set: an omitted ``store`` is taken as false,
an explicit ``true`` is a 400 (vLLM, without its store enabled, drops an explicit
``true`` silently; here a field is honoured or refused).

Errors raised by the chat path name chat's fields; ``renamed`` gives them this API's.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from server.errors import APIError, BadRequest
from server.jobs import Job, response, usage
from server.protocol import ChatCompletionRequest
from server.request_fields import Unhonoured, refuse_unhonoured
from server.responses_protocol import InputMessage, ResponsesRequest, TextConfig

NO_STATE = "this server keeps no state"
RESPONSES: Mapping[str, Unhonoured] = {
    "store": Unhonoured(
        f"{NO_STATE}, so it cannot store responses; omit store (false unless sent) or send false",
        inert=(False,),
    ),
    "previous_response_id": Unhonoured(
        f"{NO_STATE}, so there is no earlier response to continue; send the conversation "
        "as input items"
    ),
    "conversation": Unhonoured(
        f"{NO_STATE}, so it has no conversations; send the conversation as input items"
    ),
    "background": Unhonoured(
        f"a background response is stored to be fetched later, and {NO_STATE}",
        inert=(False,),
    ),
    "background_options": Unhonoured(f"background responses need state; {NO_STATE}"),
    "prompt": Unhonoured(f"stored prompt templates need state; {NO_STATE}"),
    "context_management": Unhonoured("server-side context compaction is not served", inert=([],)),
    "moderation": Unhonoured("moderation is not served"),
    "top_logprobs": Unhonoured("logprobs are not served on /v1/responses", inert=(0,)),
    "truncation": Unhonoured(
        '"auto" drops input to fit, which this server does not do; an input longer than a '
        'source model\'s context is a 400, as with "disabled"',
        inert=("disabled",),
    ),
}
# ``include`` values: what can be added to this server's answers. It writes no reasoning
# items, so there is nothing to encrypt (Codex sends this one with ``store: false``).
INCLUDE_INERT = ("reasoning.encrypted_content",)
# vLLM's extensions on its own ResponsesRequest, taken as chat takes them (or refused there)
PASSTHROUGH = (
    "seed",
    "stop",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "structured_outputs",
    "stop_token_ids",
    "ignore_eos",
    "include_stop_str_in_output",
    "chat_template_kwargs",
)
# chat's field -> this API's, for errors the chat path raises
RENAMED = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "messages": "input",
}


# -- request -> chat request ---------------------------------------------------------------
def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that answers ``req``; a 400 naming the field for anything refused."""
    refuse_unhonoured(req, RESPONSES)
    _refuse_include(req.include)
    _refuse_reasoning(req.reasoning)
    if req.text is not None and req.text.verbosity is not None:
        raise BadRequest("text.verbosity is not supported", param="text.verbosity")
    extra = req.model_extra or {}
    body: dict[str, Any] = {
        "model": req.model,
        "messages": _messages(req),
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": req.stream,
        "user": req.user,
        "response_format": _response_format(req.text),
        "fusion": req.fusion,
        **_tool_fields(req),
        **{name: extra[name] for name in PASSTHROUGH if name in extra},
    }
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = [str(p) for p in err["loc"] if p != "json_schema"] or [""]
        where[0] = RENAMED.get(where[0], where[0])
        path = ".".join(where)
        message = f"{path}: {err['msg']}" if path else str(err["msg"])
        raise BadRequest(message, param=where[0] or None) from None


def renamed(err: APIError) -> APIError:
    """``err`` naming this API's fields where it names chat's (``max_tokens`` is
    ``max_output_tokens`` here); other errors as they are."""
    if err.param not in RENAMED:
        return err
    message = err.message
    for chat, ours in RENAMED.items():
        message = re.sub(rf"\b{chat}\b", ours, message)
    out = type(err)(message, param=RENAMED[err.param], retry_after=err.retry_after)
    out.status = err.status
    return out


def _refuse_include(include: list[str] | None) -> None:
    for value in include or []:
        if value in INCLUDE_INERT:
            continue
        why = (
            "logprobs are not served on /v1/responses"
            if value == "message.output_text.logprobs"
            else "this server runs no built-in tools and takes no images"
        )
        raise BadRequest(f"include {value!r} is not supported: {why}", param="include")


def _refuse_reasoning(reasoning: dict[str, Any] | None) -> None:
    given = {k: v for k, v in (reasoning or {}).items() if v is not None}
    if given and given != {"effort": "none"}:
        raise BadRequest(
            "reasoning is not supported: the source models have no reasoning setting",
            param="reasoning",
        )


def _tool_fields(req: ResponsesRequest) -> dict[str, Any]:
    """The chat request's tool fields. A Responses function tool is chat's ``function``
    object one level up (type, name, description, parameters, strict), and a named
    ``tool_choice`` is ``{"type": "function", "name": ...}``; built-in tools are refused."""
    tools = req.tools or []
    kinds = sorted({str(t.get("type")) for t in tools} - {"function"})
    if kinds:
        raise BadRequest(
            f"tools is not supported: built-in tools ({', '.join(kinds)}) are not served: "
            "this server runs no tools; function tools are",
            param="tools",
        )
    out: dict[str, Any] = {}
    if tools:
        keys = ("name", "description", "parameters", "strict")
        out["tools"] = [
            {"type": "function", "function": {k: t[k] for k in keys if t.get(k) is not None}}
            for t in tools
        ]
    choice = req.tool_choice
    if not tools and choice in ("auto", "none"):
        choice = None  # the Responses API's default, with or without tools
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise BadRequest(
                f"tool_choice {json.dumps(choice)} is not supported (a function by name only)",
                param="tool_choice",
            )
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    if req.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = req.parallel_tool_calls
    return out


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    out = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return [*out, {"role": "user", "content": req.input}]
    if not req.input:
        raise BadRequest("input must not be an empty list", param="input")
    for i, item in enumerate(req.input):
        msg = _message(i, item)
        calls = msg.get("tool_calls")
        if calls and out and out[-1].get("role") == "assistant" and not out[-1].get("content"):
            out[-1].setdefault("tool_calls", []).extend(calls)  # consecutive calls: one turn
        else:
            out.append(msg)
    return out


def _message(i: int, item: dict[str, Any]) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind == "function_call":  # an earlier call, as chat's assistant tool call
        call = {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": item.get("call_id"), "type": "function", "function": call}],
        }
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": text}
    if kind != "message":
        raise BadRequest(
            f"input[{i}]: items of type {kind!r} are not supported (message, function_call "
            "and function_call_output items only)",
            param="input",
        )
    try:
        msg = InputMessage.model_validate(item)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        raise BadRequest(f"input[{i}]{where}: {err['msg']}", param="input") from None
    if isinstance(msg.content, str):
        return {"role": msg.role, "content": msg.content}
    texts = []
    for j, part in enumerate(msg.content):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise BadRequest(
                f"input[{i}].content[{j}]: content of type {part.type!r} is not supported "
                "(input_text and output_text only)",
                param="input",
            )
        texts.append(part.text)
    return {"role": msg.role, "content": "".join(texts)}


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise BadRequest("text.format of type json_schema needs a schema", param="text.format")
    schema = {"name": fmt.name, "description": fmt.description, "strict": fmt.strict}
    given = {k: v for k, v in schema.items() if v is not None}
    return {"type": "json_schema", "json_schema": {**given, "schema": fmt.schema_}}


# -- chat answer -> response -----------------------------------------------------------------
@dataclass
class Turn:
    """One Responses request being answered: what the response object echoes."""

    req: ResponsesRequest
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")

    def resource(
        self,
        job: Job,
        status: str,
        output: list[dict[str, Any]],
        usage_: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object (OpenAI's fields; vLLM's where they differ only in what
        a stateless server can say)."""
        req, params = self.req, job.choices[0].params
        fmt = req.text.format if req.text is not None else None
        return {
            "id": f"resp_{job.id}",
            "object": "response",
            "created_at": job.created,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "status": status,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "error": None,
            "model": job.model,
            "instructions": req.instructions,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "temperature": params.sampling.temperature,
            "top_p": params.sampling.top_p,
            "max_output_tokens": params.max_tokens,
            "max_tool_calls": req.max_tool_calls,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "text": {
                "format": fmt.model_dump(by_alias=True) if fmt else {"type": "text"},
                "verbosity": None,
            },
            "background": False,
            "service_tier": req.service_tier or "auto",
            "top_logprobs": 0,
            "truncation": "disabled",
            "metadata": req.metadata,
            "user": req.user,
            "usage": usage_,
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "phase": None,
            "content": [part],
        }

    @staticmethod
    def function_call(call: dict[str, Any]) -> dict[str, Any]:
        """A chat tool call as a Responses ``function_call`` output item."""
        return {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex}",
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"],
            "status": "completed",
        }

    def body(self, job: Job) -> dict[str, Any]:
        """The ``response`` object for a finished chat job."""
        choice = response(job)["choices"][0]
        status = status_of(choice["finish_reason"])
        calls = choice["message"].get("tool_calls") or []
        if calls:
            items = [self.function_call(c) for c in calls]
        else:
            items = [self.message(choice["message"]["content"] or "", status)]
        out = self.resource(job, status, items, responses_usage(job))
        if "fusion" in choice:
            out["fusion"] = choice["fusion"]
        return out


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def responses_usage(job: Job) -> dict[str, Any]:
    """Chat's usage in the Responses API's names (per-model counts kept under ``models``)."""
    chat = usage(job)
    return {
        "input_tokens": chat["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat["total_tokens"],
        "models": chat["models"],
    }
