"""OpenAI request models for the endpoints we serve (pydantic v2, unknown fields allowed;
those known and not honoured are refused by ``server/request_fields.py``).

Standard fields follow the OpenAI API; ``null`` is accepted for every optional one. The
extension field ``fusion`` (``extra_body={"fusion": {...}}`` in the SDK) steers the fused
model: method, a subset of source models, segment cap, the selection policy, and whether
to return the trace.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from fusion.types import Method, PplMode
from server.config import SelectionConfig, SourceNames, VoteConfig


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


def _all_optional(model: type[BaseModel], name: str, doc: str) -> type[BaseModel]:
    """``model``'s fields, each optional with no default (what a request may override);
    the merged settings are validated as ``model``, so its checks apply."""
    fields: dict[str, Any] = {
        n: (f.annotation | None, Field(None, description=f.description))
        for n, f in model.model_fields.items()
    }
    return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **fields)


SelectionOptions = _all_optional(
    SelectionConfig,
    "SelectionOptions",
    "Per-request selection settings; each one given replaces the server's "
    "(``fusion.selection`` in config.yaml; docs/SELECTION.md).",
)


VoteOptions = _all_optional(
    VoteConfig,
    "VoteOptions",
    "Per-request vote settings; each one given replaces the model's (``fusion.vote``).",
)


class FusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method | None = Field(
        None, description="cool, cool_shortest, rerank, cool_rerank, vote"
    )
    answer: str | None = Field(
        None,
        description="Method vote: the answer extractor (last_number, boxed, choice, exact, "
        "regex:<pattern>, json:<field path>).",
    )
    vote: VoteOptions | None = Field(  # type: ignore[valid-type]
        None, description="Method vote: samples per draw, threshold, budget, temperature, seed."
    )
    models: SourceNames | None = Field(None, min_length=1, description="Source models to fuse.")
    max_segment_tokens: int | None = Field(None, ge=1, le=256)
    ppl_mode: PplMode | None = None
    trace: bool = Field(False, description="Return every segment's candidates and scores.")
    grammar_scores: Literal["raw", "renormalised"] | None = Field(
        None,
        description="Under a grammar (structured outputs, tool calls): score candidates "
        "with raw log-probs (default) or renormalised over what the grammar allows.",
    )
    selection: SelectionOptions | None = Field(
        None, description="How each step chooses its segment (overrides the server's)."
    )


class JsonSchema(BaseModel):
    """``response_format.json_schema`` (OpenAI's; the SDK's ``parse`` sends it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = Field(
        None, description="Accepted either way: the answer always follows the schema."
    )


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extension: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="Lark, or GBNF (rules written with ::=).")
    json_object: bool | None = None
    disable_any_whitespace: bool = Field(
        False, description="Accepted either way: JSON is always written without free whitespace."
    )
    disable_additional_properties: bool = Field(
        False, description="Objects of the schema that do not say get additionalProperties: false."
    )


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str = Field(..., description="The arguments as JSON text.")


class ToolCallIn(OpenAIModel):
    """A call in the history (an earlier assistant turn)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema object.")
    strict: bool | None = Field(None, description="Accepted either way: calls always follow it.")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def core(self) -> dict[str, Any]:
        """The message as the core renders it: role, text, and any calls or call id."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part type {part.type!r} is not supported (text only)")
            parts.append(part.text)
        return "".join(parts)


class _Sampling(OpenAIModel):
    model: str = Field(..., min_length=1)
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # as vLLM: a 64-bit integer
    # OpenAI's penalties and vLLM's extensions, with vLLM's ranges; each source model
    # applies them in its own tokens (docs/API.md, "Sampling")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: every token")
    min_p: float | None = Field(None, ge=0, le=1)
    logit_bias: dict[str, float] | None = Field(
        None, description="token id -> bias in [-100, 100]; only for a source model by name"
    )
    user: str | None = None
    fusion: FusionOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids; biases are clamped to [-100, 100], as vLLM does."""
        if v is None:
            return None
        for key, bias in v.items():
            if not key.strip().isdigit():
                raise ValueError(f"key {key!r} is not a token id")
            if not math.isfinite(bias):
                raise ValueError(f"bias of token {key} is not a finite number")
        return {k: min(100.0, max(-100.0, b)) for k, b in v.items()}

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), b) for k, b in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(False, description="Only for a source model by name.")
    top_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's max_logprobs
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, description="0: with echo, the prompt alone")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20, description="Only for a source model.")
    suffix: str | None = None

    def prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            texts = [self.prompt]
        elif not self.prompt:
            raise ValueError("prompt must not be an empty list")
        elif all(isinstance(p, str) for p in self.prompt):
            texts = [str(p) for p in self.prompt]
        else:
            raise ValueError(
                "token-id prompts are not supported: the fused models use different "
                "tokenizers; send text"
            )
        if not all(texts):  # as vLLM: there is nothing to continue
            raise ValueError("prompt must not be empty")
        return texts


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
