"""A chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` as what the
fused run needs: the tools each member's prompt shows, whether the answer is read back
as calls, and the grammar calls are written under (fusion/tools.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion.grammar import GrammarSpec
from fusion.tools import ToolMode, call_grammar
from server.errors import BadRequest
from server.protocol import ChatCompletionRequest


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[dict[str, Any], ...] | None  # shown to every member
    mode: ToolMode  # "none": the answer is text; else read back as calls where it is
    grammar: GrammarSpec | None


def tool_plan(req: ChatCompletionRequest) -> ToolPlan:
    """What the request's tool fields ask for, checked as OpenAI checks them."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise BadRequest(
                "tool_choice is only allowed when tools are specified", param="tool_choice"
            )
        return ToolPlan(None, "none", None)
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise BadRequest("tools: each function name must be given once", param="tools")
    parallel = req.parallel_tool_calls is not False
    if choice is None or isinstance(choice, str):
        mode: ToolMode = choice or "auto"
        return ToolPlan(tuple(tools), mode, call_grammar(tools, mode, parallel))
    wanted = choice.function.name
    named = [t for t in tools if t["function"]["name"] == wanted]
    if not named:
        raise BadRequest(
            f"tool_choice names function {wanted!r}, which is not in tools", param="tool_choice"
        )
    return ToolPlan(tuple(tools), "required", call_grammar(named, "required", parallel))
