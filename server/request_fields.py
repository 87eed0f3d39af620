"""Request fields the server knows and does not honour: each is refused with a 400 that
names it, unless its value asks for nothing (``store: false``, ``tools: []``).

The request models allow unknown fields (as vLLM's do), so without this list a client's
``tools`` or ``reasoning_effort`` would be dropped without a word. Fields harmless to
ignore (``user``, ``metadata``, cache and billing hints) are not listed: they pass.
docs/API.md's field table says the same for every field of OpenAI's API, and
tests/server/test_api_fields.py checks that table against the SDK's types and this app.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel

from server.errors import BadRequest


@dataclass(frozen=True)
class Unhonoured:
    """Why a field is refused, and the values that ask for nothing (accepted, as null is)."""

    why: str
    inert: tuple[object, ...] = ()


# OpenAI's fields, and vLLM's extensions that change the answer (STYLE 17: its users
# send them), on both endpoints
COMMON: Mapping[str, Unhonoured] = {
    "best_of": Unhonoured("best_of is not supported; ask for n choices", inert=(1,)),
    "use_beam_search": Unhonoured("beam search is not supported", inert=(False,)),
    "length_penalty": Unhonoured("beam search is not supported", inert=(1, 1.0)),
    "min_tokens": Unhonoured("min_tokens is not supported", inert=(0,)),
    "ignore_eos": Unhonoured("ignore_eos is not supported", inert=(False,)),
    "stop_token_ids": Unhonoured(
        "stop_token_ids name one vocabulary's tokens; use stop strings", inert=([],)
    ),
    "bad_words": Unhonoured("bad_words is not supported", inert=([],)),
    "allowed_token_ids": Unhonoured("allowed_token_ids is not supported"),
    "prompt_logprobs": Unhonoured("prompt_logprobs is not supported"),
    "include_stop_str_in_output": Unhonoured(
        "stop strings are never part of the answer", inert=(False,)
    ),
    "truncate_prompt_tokens": Unhonoured("truncate_prompt_tokens is not supported"),
}

CHAT: Mapping[str, Unhonoured] = {
    **COMMON,
    # the deprecated spelling of tools / tool_choice (OpenAI's functions API)
    "functions": Unhonoured("functions is deprecated: use tools", inert=([],)),
    "function_call": Unhonoured("function_call is deprecated: use tool_choice", inert=("none",)),
    "audio": Unhonoured("audio output is not supported: the answer is text"),
    "modalities": Unhonoured("the answer is text only", inert=(["text"],)),
    "web_search_options": Unhonoured("web search is not supported"),
    "reasoning_effort": Unhonoured("the source models have no reasoning setting"),
    "verbosity": Unhonoured("verbosity is not supported"),
    "moderation": Unhonoured("moderation is not supported"),
    "store": Unhonoured(
        "this server keeps no state, so it cannot store completions", inert=(False,)
    ),
    "echo": Unhonoured("echo is not supported on chat", inert=(False,)),
    "chat_template": Unhonoured("each source model renders its own chat template"),
    "chat_template_kwargs": Unhonoured("each source model renders its own chat template"),
    "add_generation_prompt": Unhonoured(
        "the answer always starts a new assistant turn", inert=(True,)
    ),
    "continue_final_message": Unhonoured(
        "continuing the last message is not supported", inert=(False,)
    ),
}

COMPLETIONS: Mapping[str, Unhonoured] = COMMON


def refuse_unhonoured(req: BaseModel, fields: Mapping[str, Unhonoured]) -> None:
    """A 400 naming the first field of ``fields`` the request sets to something."""
    for name, spec in fields.items():
        value = getattr(req, name, None)
        if value is None or any(_same(value, v) for v in spec.inert):
            continue
        raise BadRequest(f"{name} is not supported: {spec.why}", param=name)


def _same(value: object, inert: object) -> bool:
    """Equal, numbers as numbers (1 and 1.0), but never a boolean for a number."""
    return value == inert and isinstance(value, bool) == isinstance(inert, bool)
