"""Incremental encode/decode for one model: constant cost per segment.

The shared text grows by one segment per fusion step. Re-tokenising it whole every step
would cost O(context) per step, so each model keeps only a window of the last few
committed pieces (the paper prepends the last k=4 words). Every piece starts at a common
word boundary, which splits the text stably for this tokenizer, so

    encode(tail + segment) == encode(tail) + ids(segment)

and the segment's ids are the tokens the tokenizer would produce for the whole text.
"""

from __future__ import annotations

from collections import deque

from tokenizers_align.adapter import TokenizerAdapter


class IncrementalCodec:
    """Encodes new segments and decodes generated ids relative to a short committed tail."""

    def __init__(self, adapter: TokenizerAdapter, tail: str = "", window_pieces: int = 4) -> None:
        self.adapter = adapter
        self.window_pieces = max(1, window_pieces)
        self._pieces: deque[str] = deque([tail] if tail else [])
        self._refresh()
        self.unstable_joins = 0

    @classmethod
    def after_prompt(
        cls, adapter: TokenizerAdapter, prompt: str, window_words: int = 4
    ) -> IncrementalCodec:
        """A codec whose tail is the last few words of a raw completion prompt."""
        ends = adapter.word_ends(prompt)
        start = ends[-window_words] if len(ends) >= window_words else 0
        return cls(adapter, prompt[start:])

    def _refresh(self) -> None:
        self.tail_text = "".join(self._pieces)
        self.tail_ids = self.adapter.encode(self.tail_text) if self.tail_text else []
        self._tail_decoded = self.adapter.decode(self.tail_ids) if self.tail_ids else ""

    def encode_next(self, text: str) -> list[int]:
        """Token ids of ``text`` appended after everything committed so far."""
        ids = self.adapter.encode(self.tail_text + text)
        n = len(self.tail_ids)
        if ids[:n] == self.tail_ids:
            return ids[n:]
        # The tail did not end at a stable boundary of this tokenizer (a segment cut at a
        # length cap, or a raw prompt that ends mid-word). Committed tokens are never
        # re-tokenised; the new text is encoded as a continuation on its own.
        self.unstable_joins += 1
        return self._encode_detached(text)

    def _encode_detached(self, text: str) -> list[int]:
        anchor = "\n"
        anchor_ids = self.adapter.encode(anchor)
        ids = self.adapter.encode(anchor + text)
        if ids[: len(anchor_ids)] == anchor_ids:
            return ids[len(anchor_ids) :]
        return self.adapter.encode(text)

    def decode_next(self, ids: list[int]) -> str:
        """Text of ``ids`` generated after the committed text (may end in U+FFFD)."""
        if not self.tail_ids:
            return self.adapter.decode(ids)
        full = self.adapter.decode(self.tail_ids + ids)
        if full.startswith(self._tail_decoded):
            return full[len(self._tail_decoded) :]
        return self.adapter.decode(ids)

    def commit(self, text: str) -> None:
        """Record that ``text`` was appended to the shared text."""
        if not text:
            return
        self._pieces.append(text)
        while len(self._pieces) > self.window_pieces:
            self._pieces.popleft()
        self._refresh()
