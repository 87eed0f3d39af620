"""The OpenAI Responses API's request (``POST /v1/responses``), pydantic v2, unknown fields
allowed as on the other endpoints.

Only the request's shape is checked here. What each field means, and which ones are
refused, is ``server/responses.py``'s: a Responses request is answered as a chat request,
so sampling ranges, the model's name and the structured-output schema are checked once,
by the chat request model and the service, and their errors are renamed to this API's
fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol import FusionOptions, OpenAIModel


class InputPart(OpenAIModel):
    """A content part of an input message: ``input_text`` or ``output_text`` are taken;
    other kinds (images, files, audio, refusals) are refused by name."""

    type: str
    text: str | None = None


class InputMessage(OpenAIModel):
    """A message item of ``input`` (OpenAI's ``EasyInputMessage``, ``Message`` and, for an
    earlier answer sent back, ``ResponseOutputMessage``; their ``id`` and ``status`` pass)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]


class TextFormat(BaseModel):
    """``text.format``: free text, any JSON object, or JSON under a schema (the fields of
    chat's ``response_format.json_schema``, one level up, as the Responses API spells it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(OpenAIModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(OpenAIModel):
    """The fields of OpenAI's ``ResponseCreateParams`` this server reads. The others either
    pass unread (harmless ones: cache and billing hints) or are refused by
    ``server/responses.py`` with a 400 that names them."""

    model: str = Field(..., min_length=1)
    input: str | list[dict[str, Any]] = Field(
        ..., description="A user message, or message items (read by server/responses.py)."
    )
    instructions: str | None = Field(None, description="A system message put first.")
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    metadata: dict[str, str] | None = Field(None, description="Echoed, otherwise unread.")
    user: str | None = None
    service_tier: str | None = Field(None, description="Echoed, otherwise unread.")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(
        None, ge=1, description="Caps built-in tool calls; this server runs none."
    )
    # stateful, or not served: refused unless the value asks for nothing
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    background_options: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None
    include: list[str] | None = None
    prompt: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    top_logprobs: int | None = None
    truncation: str | None = None
    fusion: FusionOptions | None = None
