"""Tool calls, fused: how each member sees the tools, the grammar calls are written under,
and reading the calls back out of the fused text.

Every member writes a call in one common format, the one Qwen's and Hermes' templates
teach: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. A member whose
chat template takes ``tools`` gets them there (and the history's calls and results in the
template's own way); the others get the tools and the format as a system block, and the
history's calls and results as text in that format. ``required`` and a named function are
written under the JSON schema of the call (every answer parses, as in vLLM); ``auto``
lets the answer be text or calls, and an answer that starts with ``<`` must be calls.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fusion.grammar import GrammarSpec, closed_schema

ToolMode = Literal["auto", "required", "none"]
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return dict(tool.get("function") or {})


def system_block(tools: Sequence[dict[str, Any]]) -> str:
    """The tools and the call format, for a member whose template does not take tools."""
    listed = "\n".join(json.dumps(_function(t), ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query. The functions "
        f"are:\n<tools>\n{listed}\n</tools>\n\nFor each function call, return a JSON object "
        "with the function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def _as_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    body = json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def for_template(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
    template_takes_tools: bool,
) -> list[dict[str, Any]]:
    """The conversation as one member's template should see it: calls in the history with
    their arguments as objects (templates that take tools write them as JSON), or, for a
    template that does not, calls and results as text and the tools in a system block."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if template_takes_tools:
            if m.get("tool_calls"):
                m["tool_calls"] = [_with_object_arguments(c) for c in m["tool_calls"]]
        elif m.get("tool_calls"):
            calls = "\n".join(_as_text(c) for c in m.pop("tool_calls"))
            m["content"] = "\n".join(p for p in (m.get("content") or "", calls) if p)
        elif m.get("role") == "tool":
            result = m.get("content") or ""
            m = {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"}
        out.append(m)
    if tools and not template_takes_tools:
        block = system_block(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{block}".strip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        with contextlib.suppress(ValueError):
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


def _arguments(function: dict[str, Any]) -> Any:
    parameters = function.get("parameters") or {"type": "object"}
    return closed_schema(parameters) if function.get("strict") else parameters


def _call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    choices = [
        {
            "type": "object",
            "properties": {
                "name": {"const": _function(t).get("name")},
                # strict: the declared parameters and no others (OpenAI's strict mode)
                "arguments": _arguments(_function(t)),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    # compact JSON, as json_schema answers are (fusion/grammar.py): no free whitespace
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def call_grammar(
    tools: Sequence[dict[str, Any]], mode: ToolMode, parallel: bool = True
) -> GrammarSpec | None:
    """The grammar of an answer: calls only (``required``, or ``tools`` holding the one
    named function), or text or calls (``auto``); None for ``none``."""
    if mode == "none" or not tools:
        return None
    schema = json.dumps(_call_schema(tools))
    more = ' ("\\n" call)*' if parallel else ""
    rules = [
        f'calls: call{more} "\\n"?',  # a last newline ends the calls too
        f'call: "{OPEN}\\n" %json {schema} "\\n{CLOSE}"',
    ]
    if mode == "auto":
        rules.insert(0, "start: calls | TEXT")
        # text starts with neither "<" nor whitespace: an answer that opens with a tag is
        # calls under the schema, so every call returned was written under it
        rules.append(r"TEXT: /[^<\s][\s\S]*/")
    else:
        rules.insert(0, "start: calls")
    return GrammarSpec("grammar", "\n".join(rules))


def parse_calls(text: str, names: Sequence[str] | None = None) -> list[ToolCall] | None:
    """The calls an answer is made of (None: it is text, or calls that do not parse, or
    name a function not in ``names``)."""
    if not text.startswith(OPEN):
        return None
    stripped = text.strip()
    calls = []
    for body in _CALL.findall(stripped):
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        if names is not None and call["name"] not in names:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append(
            ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}",
                name=call["name"],
                arguments=json.dumps(arguments, ensure_ascii=False),
            )
        )
    if not calls or _CALL.sub("", stripped).strip():
        return None
    return calls
