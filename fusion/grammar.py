"""Structured outputs across tokenizers: one grammar, each member's tokens (llguidance).

A request's grammar (a JSON schema, a regex, a choice, a Lark or GBNF grammar) is compiled
once per member against that member's vocabulary. While a member generates, its engine
masks every next-token distribution with the member's ``MemberGrammar`` (so its candidate
is a valid continuation) and advances it over each token; the loop rewinds what a call
took and, when a segment is committed, advances every member's grammar over the winner
in that member's own tokens. llguidance matches bytes, so a member accepts the winner in
any tokenization, not only its canonical one (measured: bench/grammar_masks.py).

``AnswerGrammar`` holds the same grammar over bytes, for the committed answer: it checks
candidates whatever wrote them, and cuts those of a member whose engine cannot constrain
its sampling to their longest valid prefix. llguidance was chosen over xgrammar by
measurement (docs/BENCHMARKS.md): no torch import, grammars compile in under a
millisecond per member, and no special token slips into a JSON string.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

GrammarKind = Literal["json", "regex", "choice", "grammar"]
GrammarScores = Literal["raw", "renormalised"]
RENORMALISE_TOP = 20  # the allowed mass is estimated from this many most likely tokens


class GrammarError(ValueError):
    """The request's grammar or schema cannot be compiled; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What the answer must match: ``json`` (a JSON schema, as text), ``regex``, ``choice``
    (a JSON list of strings) or ``grammar`` (Lark, or GBNF when it uses ``::=``)."""

    kind: GrammarKind
    text: str

    @functools.cached_property
    def compiled(self) -> str:
        """llguidance's grammar text, checked (GrammarError when it does not compile)."""
        import llguidance as llg

        try:
            if self.kind == "json":
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    self.text, defaults={"whitespace_flexible": False}
                )
            elif self.kind == "choice":
                grammar = llg.grammar_from("choice", self.text)
            elif self.kind == "regex":
                grammar = llg.grammar_from("regex", self.text)
            else:
                grammar = llg.grammar_from("gbnf" if "::=" in self.text else "lark", self.text)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the {self.kind} grammar does not compile: {exc}") from None
        error = llg.LLMatcher.validate_grammar(grammar, _bytes_tokenizer())
        if error:
            raise GrammarError(f"the {self.kind} grammar does not compile: {error}")
        return str(grammar)


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "additionalItems", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def closed_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that declares
    its properties and does not say otherwise (what OpenAI's strict mode requires). Only
    schema keywords are walked: ``const``/``enum`` values and property names stay as they
    are, and an object without ``properties`` stays free-form."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(s) for name, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(s) for s in out[key]]
    if "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def json_schema(schema: dict[str, Any] | None) -> GrammarSpec:
    """A JSON answer under ``schema`` (None: any JSON object, OpenAI's json_object)."""
    return GrammarSpec("json", json.dumps(schema if schema is not None else {"type": "object"}))


@functools.cache
def _bytes_tokenizer() -> Any:
    import llguidance as llg

    return llg.LLTokenizer("byte")


class Vocabularies:
    """Each member's llguidance tokenizer, built once per process on first use (it reads
    the whole vocabulary: ~0.4 s for 49k tokens, ~3 s and ~380 MB for Gemma's 262k)."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str, tokenizer_json: Callable[[], str], eos_ids: frozenset[int]) -> Any:
        """The tokenizer of member ``name`` from its ``tokenizers`` JSON and its end ids
        (blocking on first use: call it in a thread)."""
        with self._lock:
            if name not in self._built:
                import llguidance as llg

                data = _without_specials(tokenizer_json(), eos_ids)
                self._built[name] = llg.LLTokenizer(data, eos_token=sorted(eos_ids))
            return self._built[name]


def _without_specials(tokenizer_json: str, keep: frozenset[int]) -> str:
    """The tokenizer without its non-special added tokens. llguidance takes every added
    token for a special one, matching no text; yet it forces text that spells a
    non-special one ("<tool_call>" in Qwen's vocabulary) as that token, so nothing would
    be allowed there. Without the entry, a token that is also in the vocabulary (Qwen's)
    is its text. Special tokens stay special: never allowed inside the answer's text."""
    data = json.loads(tokenizer_json)
    data["added_tokens"] = [
        t for t in data.get("added_tokens", []) if t.get("special") or t.get("id") in keep
    ]
    return json.dumps(data)


class MemberGrammar:
    """One member's grammar state in its own tokens, at the committed answer plus what the
    current call took (a ``TokenConstraint`` for its engine). vLLM's grammar processor
    holds one per request too (fusion/engines/vllm_grammar_processor.py)."""

    def __init__(self, tokenizer: Any, spec: GrammarSpec | str) -> None:
        """``spec``: the request's grammar, or its compiled text (``GrammarSpec.compiled``,
        as a vLLM processor receives it)."""
        import llguidance as llg
        from llguidance.numpy import allocate_token_bitmask

        self.grammar = spec if isinstance(spec, str) else spec.compiled
        self.eos_ids = tuple(int(t) for t in tokenizer.eos_tokens)  # its vocabulary's ends
        self.matcher = llg.LLMatcher(tokenizer, self.grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab = int(tokenizer.vocab_size)
        self.bitmask = allocate_token_bitmask(1, self.vocab)
        self.taken = 0  # tokens taken since the last commit
        self.lost = False  # the committed answer left the grammar: constrain no more

    def allowed(self, width: int) -> Any:
        """Which of the token ids ``[0, width)`` may come next (a bool array; ids past the
        vocabulary may not)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask)
        bits = np.unpackbits(self.bitmask.view(np.uint8), count=self.vocab, bitorder="little")
        out = np.zeros(width, dtype=bool)
        n = min(width, self.vocab)
        out[:n] = bits[:n]
        return out

    def mask(self, logprobs: Any) -> Any:
        keep = self.allowed(len(logprobs))
        out = np.full(len(logprobs), -np.inf, dtype=logprobs.dtype)
        out[keep] = logprobs[keep]
        return out

    def fork(self) -> MemberGrammar:
        """A copy in the same state with a matcher of its own (no compilation: cheap)."""
        other = copy.copy(self)
        other.matcher = self.matcher.deep_copy()
        other.bitmask = self.bitmask.copy()
        return other

    def take(self, token: int) -> bool:
        if self.matcher.is_stopped():  # complete: only an end token may follow (llguidance
            return token in self.eos_ids  # validates none then, though its mask allows it)
        if self.matcher.validate_tokens([token]) != 1:
            return False
        self.matcher.consume_token(token)
        self.taken += 1
        return True

    def rewind(self) -> None:
        """Back to the committed answer (what the last call took is undone)."""
        if self.taken:
            self.matcher.rollback(self.taken)
            self.taken = 0

    def commit(self, ids: list[int]) -> None:
        """Advance over the winner, in this member's tokens."""
        self.rewind()
        if self.lost:
            return
        if self.matcher.try_consume_tokens(ids) != len(ids) or self.matcher.is_error():
            self.lost = True  # its candidates are then cut by the answer's grammar


def renormalised(
    logprobs: list[float],
    tops: list[tuple[tuple[int, float], ...]],
    ids: list[int],
    grammar: MemberGrammar,
) -> list[float]:
    """``logprobs`` of ``ids`` (a candidate in one member's tokens, after the committed
    answer) renormalised over what ``grammar`` allows at each position: the log of the
    allowed mass is subtracted, estimated from that position's most likely tokens
    (``tops``) and the token itself, exact where the grammar allows no other (forced
    text scores 0). Positions after one the grammar refuses stay raw."""
    out = list(logprobs)
    try:
        for k, (lp, top, token) in enumerate(zip(logprobs, tops, ids)):
            seen = dict(top)
            seen[token] = lp
            allowed = grammar.allowed(max(seen) + 1)
            mass = [v for i, v in seen.items() if allowed[i]]
            if not allowed[token] or not mass:
                break
            peak = max(mass)
            out[k] = lp - (peak + math.log(sum(math.exp(v - peak) for v in mass)))
            if not grammar.take(token):
                break
    finally:
        grammar.rewind()
    return out


class AnswerGrammar:
    """The grammar over the bytes of the committed answer: which candidate texts keep the
    answer valid, and whether an answer may end after them."""

    def __init__(self, spec: GrammarSpec) -> None:
        import llguidance as llg

        self.spec = spec
        self.matcher = llg.LLMatcher(_bytes_tokenizer(), spec.compiled, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def valid_prefix(self, text: str) -> tuple[str, bool]:
        """The longest prefix of ``text`` that keeps the answer valid (whole characters),
        and whether the answer could end right after it."""
        data = text.encode()
        n = self.matcher.validate_tokens(list(data))
        while n > 0 and n < len(data) and (data[n] & 0xC0) == 0x80:
            n -= 1  # not inside a character
        prefix = data[:n].decode()
        taken = self.matcher.try_consume_tokens(list(data[:n]))
        complete = self.matcher.is_accepting()
        self.matcher.rollback(taken)
        return prefix, complete

    def commit(self, text: str) -> None:
        data = list(text.encode())
        if self.matcher.try_consume_tokens(data) != len(data):
            raise GrammarError("a committed segment left the grammar")  # cannot happen

    @property
    def done(self) -> bool:
        """Nothing more can be added: the answer is complete."""
        return bool(self.matcher.is_stopped())
