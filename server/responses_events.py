"""The Responses API's event stream (``stream: true`` on ``POST /v1/responses``), made from
a chat job's stream chunks: see ``Events``."""

from __future__ import annotations

import json
from typing import Any

from server.errors import APIError
from server.jobs import Job
from server.responses import Turn, responses_usage, status_of


class Events:
    """The Responses event stream of one turn, made from its chat job's chunks: the
    message item opens with the first text, each chat delta (one per fused segment) is
    one ``response.output_text.delta``; each tool call (chat sends one chunk per call,
    once complete) is a ``function_call`` item with its arguments in one delta; the end
    closes what is open and the response. Every event carries its ``sequence_number``
    and goes out as an SSE event named by its type. As in vLLM the last event is
    ``response.completed``, its response's status ``incomplete`` when the answer was cut
    by ``max_output_tokens`` (the SDK's stream helper waits for ``response.completed``)."""

    def __init__(self, turn: Turn, job: Job) -> None:
        self.turn, self.job = turn, job
        self.sequence = 0
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.opened = False  # the message item
        self.items: list[dict[str, Any]] = []  # finished output items, in order
        self.where = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> dict[str, str]:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return {"event": kind, "data": json.dumps(body, ensure_ascii=False)}

    def start(self) -> list[dict[str, str]]:
        resource = self.turn.resource(self.job, "in_progress", [])
        return [
            self._event("response.created", response=resource),
            self._event("response.in_progress", response=resource),
        ]

    def _open(self) -> list[dict[str, str]]:
        self.opened = True
        self.where["output_index"] = len(self.items)
        item = {**self.turn.message("", "in_progress"), "content": []}
        part = self.turn.message("", "in_progress")["content"][0]
        return [
            self._event("response.output_item.added", output_index=len(self.items), item=item),
            self._event("response.content_part.added", **self.where, part=part),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, str]]:
        """The events for one chat chunk (none for the role chunk)."""
        out = []
        for choice in chunk.get("choices", []):
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            for call in choice.get("delta", {}).get("tool_calls") or []:
                out += self._call(call)
            delta = choice.get("delta", {}).get("content") or ""
            extra = {"fusion": choice["fusion"]} if "fusion" in choice else {}
            if delta or extra:
                if not self.opened:
                    out += self._open()
                self.text.append(delta)
                out.append(
                    self._event(
                        "response.output_text.delta",
                        **self.where,
                        delta=delta,
                        logprobs=[],
                        **extra,
                    )
                )
        return out

    def _call(self, call: dict[str, Any]) -> list[dict[str, str]]:
        item = self.turn.function_call(call)
        index = len(self.items) + (1 if self.opened else 0)
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return [
            self._event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            ),
            self._event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
            self._event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def end(self) -> list[dict[str, str]]:
        status = status_of(self.finish_reason)
        out = []
        if not self.opened and not self.items:
            out += self._open()  # an empty answer is still one (empty) message
        output = list(self.items)
        if self.opened:
            text = "".join(self.text)
            item = self.turn.message(text, status)
            output.insert(self.where["output_index"], item)
            out += [
                self._event("response.output_text.done", **self.where, text=text, logprobs=[]),
                self._event("response.content_part.done", **self.where, part=item["content"][0]),
                self._event(
                    "response.output_item.done", output_index=self.where["output_index"], item=item
                ),
            ]
        usage_ = responses_usage(self.job)
        resource = self.turn.resource(self.job, status, output, usage_)
        return [*out, self._event("response.completed", response=resource)]

    def error(self, err: APIError) -> dict[str, str]:
        """OpenAI's ``error`` event; the stream ends after it."""
        return self._event("error", code=err.code or err.type, message=err.message, param=err.param)
