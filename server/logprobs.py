"""OpenAI's ``logprobs`` objects from the fusion loop's ``TokenLogprob``s (a source model
served alone): chat's ``content`` entries and completions' four lists, as vLLM writes
them (``vllm/entrypoints/openai/*/serving.py``, vLLM 0.32):

- a token's text is the token decoded alone, special tokens included, with the leading
  spaces a SentencePiece decoder drops put back; a text that ends inside a UTF-8
  character (U+FFFD) is decoded again after up to 4 tokens before it in the same run
  (prompt or answer): the text it completes, or "" while the character is incomplete
  (``vllm/v1/engine/logprobs.py``, ``_correct_decoded_token``). The prompt's first
  token, which has no log-prob, is decoded alone as it is;
- log-probs below -9999 (and -inf) are sent as -9999.0;
- chat: ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`` per token,
  the ``top_logprobs`` most likely tokens first;
- completions: ``tokens``, ``token_logprobs``, ``top_logprobs`` (per token a dict of
  the token and the ``logprobs`` most likely, keyed by text; null for the prompt's first
  token) and ``text_offset`` (the texts' lengths summed from 0, the prompt's with echo).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fusion.engine import TopLogprobs
from fusion.types import TokenLogprob
from tokenizers_align import TokenizerAdapter

REPLACEMENT = "\ufffd"
FLOOR = -9999.0  # OpenAI's stand-in for -inf
CONTEXT = 4  # tokens before one that ends mid-character, as vLLM looks back


def _floor(lp: float) -> float:
    return max(lp, FLOOR)


def _space_marker(adapter: TokenizerAdapter) -> str | None:
    """The Metaspace replacement character, whose leading copies a SentencePiece
    decoder may strip from a token decoded alone (vLLM's ``get_leading_space_marker``)."""
    pre = json.loads(adapter.tokenizer.to_str()).get("pre_tokenizer") or {}
    subs = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    meta = next((p for p in subs if p.get("type") == "Metaspace"), None)
    return None if meta is None else str(meta.get("replacement", "\u2581"))


class TokenTexts:
    """One model's token texts, as vLLM writes them into logprobs (module docstring)."""

    def __init__(self, adapter: TokenizerAdapter) -> None:
        self.adapter = adapter
        self.marker = _space_marker(adapter)
        self._alone: dict[int, str] = {}

    def alone(self, tok: int) -> str:
        """The token decoded by itself, its leading spaces kept."""
        text = self._alone.get(tok)
        if text is None:
            text = self.adapter.decode([tok])
            raw = self.adapter.tokenizer.id_to_token(tok) or ""
            if self.marker:
                marks = len(raw) - len(raw.lstrip(self.marker))
                missing = marks - (len(text) - len(text.lstrip(" ")))
                text = " " * max(missing, 0) + text
            self._alone[tok] = text
        return text

    def text(self, tok: int, before: Sequence[int]) -> str:
        """The token's text after ``before`` (the tokens before it in its run)."""
        text = self.alone(tok)
        return self._completed(tok, before) if text.endswith(REPLACEMENT) else text

    def _completed(self, tok: int, before: Sequence[int]) -> str:
        """The text ``tok`` completes after up to ``CONTEXT`` tokens before it, or ""."""
        decode = self.adapter.decode
        for k in range(1, min(len(before), CONTEXT) + 1):
            context = list(before[-k:])
            full = decode([*context, tok])
            if full.endswith(REPLACEMENT):
                continue
            clean = len(context)  # the context tokens before the incomplete ones
            while clean > 0 and decode([context[clean - 1]]).endswith(REPLACEMENT):
                clean -= 1
            prefix = decode(context[:clean]) if clean else ""
            if full.startswith(prefix):
                return full[len(prefix) :]
            same = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), len(prefix))
            return full[same:]
        return ""


@dataclass(frozen=True)
class LogprobsAsk:
    """A request's logprobs: how many most likely tokens per position, in chat's shape
    or completions', with the answering model's token texts."""

    texts: TokenTexts
    top: int
    chat: bool

    def writer(self) -> LogprobsWriter:
        return LogprobsWriter(self)


@dataclass
class LogprobsWriter:
    """One choice's logprobs, one piece at a time (a stream chunk, or the whole answer):
    it keeps the tokens the next texts may complete and the completions' text offset."""

    ask: LogprobsAsk
    before: list[int | None] = field(default_factory=list)  # the run so far (None: no lp)
    offset: int = 0

    def body(
        self, tokens: Sequence[TokenLogprob], prompt: Sequence[TokenLogprob] = ()
    ) -> dict[str, Any]:
        """The logprobs object of the answer's ``tokens``, after the prompt's (echo)."""
        entries: list[tuple[str, TokenLogprob, list[tuple[str, float]]]] = []
        if prompt:
            self.before = []
            entries += [self._entry(t) for t in prompt]
            self.before = []  # the answer's texts look back over the answer only
        entries += [self._entry(t) for t in tokens]
        return self._chat(entries) if self.ask.chat else self._completion(entries)

    def _entry(self, t: TokenLogprob) -> tuple[str, TokenLogprob, list[tuple[str, float]]]:
        texts = self.ask.texts
        if t.logprob is None:  # the prompt's first token: no position before it
            self.before.append(None)
            return texts.alone(t.id), t, []
        context = [b for b in self.before[-CONTEXT:] if b is not None]
        self.before.append(t.id)
        top: TopLogprobs = t.top[: self.ask.top]
        return texts.text(t.id, context), t, [(texts.text(i, context), lp) for i, lp in top]

    @staticmethod
    def _chat(entries: list[tuple[str, TokenLogprob, list[tuple[str, float]]]]) -> dict[str, Any]:
        def one(text: str, lp: float) -> dict[str, Any]:
            return {"token": text, "logprob": _floor(lp), "bytes": list(text.encode())}

        content = [
            {**one(text, t.logprob or 0.0), "top_logprobs": [one(s, lp) for s, lp in top]}
            for text, t, top in entries
        ]
        return {"content": content}

    def _completion(
        self, entries: list[tuple[str, TokenLogprob, list[tuple[str, float]]]]
    ) -> dict[str, Any]:
        offsets, tops = [], []
        for text, t, top in entries:
            offsets.append(self.offset)
            self.offset += len(text)
            if t.logprob is None:
                tops.append(None)
            else:  # the token first, then the most likely (as vLLM's dict)
                tops.append({text: _floor(t.logprob), **{s: _floor(lp) for s, lp in top}})
        return {
            "text_offset": offsets,
            "token_logprobs": [
                None if t.logprob is None else _floor(t.logprob) for _, t, _ in entries
            ],
            "tokens": [text for text, _, _ in entries],
            "top_logprobs": tops,
        }
