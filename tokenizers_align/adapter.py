"""One source model's tokenizer, seen as text <-> token ids plus word boundaries.

Wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust one: no torch, no transformers).
The word boundaries follow Cool-Fusion §2.1/§2.2:

- tokenizers with a splitting pre-tokenizer (byte-level BPE: Llama-3, Qwen, SmolLM2) give
  words directly: a word is the set of tokens sharing a ``word_id``;
- tokenizers without one (SentencePiece-style BPE with ``▁``: Llama-2, Gemma) encode the
  whole text as one "word", so a word boundary is a token boundary at the edge of a run
  of whitespace, or next to a newline (how SentencePiece splits words).

The last word of a text is never complete (more characters may extend it), so its end
is never a boundary. Trailing U+FFFD from a token that ends mid-character is cut off
before any analysis (``complete_text``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


def complete_text(text: str) -> str:
    """``text`` without a trailing incomplete UTF-8 character (decoded as U+FFFD)."""
    return text.rstrip(REPLACEMENT)


def folder_settings(folder: Path) -> tuple[dict[str, object], dict[str, object]]:
    """(tokenizer_config.json, generation_config.json) of a model folder; {} when absent."""

    def read(name: str) -> dict[str, object]:
        path = folder / name
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    return read("tokenizer_config.json"), read("generation_config.json")


def _pretokenizer_splits(tokenizer: Tokenizer) -> bool:
    """Whether the pre-tokenizer splits text into several words (so word_ids mean words)."""
    # Probed through a full encode: a pre-tokenizer may run after a normalizer that removes
    # what it splits on (Gemma replaces spaces with "▁", then splits on spaces).
    word_ids = tokenizer.encode("ab cd ef gh ij", add_special_tokens=False).word_ids
    return len(set(word_ids)) > 2


@dataclass
class TokenizerAdapter:
    """Text/ids conversion and word boundaries for one tokenizer."""

    name: str
    tokenizer: Tokenizer = field(repr=False)
    bos_id: int | None = None
    add_bos: bool = False
    eos_ids: tuple[int, ...] = ()
    special_ids: frozenset[int] = field(default_factory=frozenset)
    splits_words: bool = field(init=False)

    def __post_init__(self) -> None:
        self.splits_words = _pretokenizer_splits(self.tokenizer)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | Path, name: str | None = None) -> TokenizerAdapter:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``) from a model folder.

        Folders without ``tokenizer.json`` (a SentencePiece or tiktoken vocabulary, remote
        code) load through transformers, outside this package: ``fusion.tokenizer_loading``.
        """
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json (fusion.tokenizer_loading.load_tokenizer "
                "reads tokenizer.model, *.tiktoken and remote-code tokenizers)"
            )
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config, gen = folder_settings(folder)
        return cls.from_tokenizer(tokenizer, name or folder.name, config, gen)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Tokenizer,
        name: str,
        config: dict[str, object] | None = None,
        generation: dict[str, object] | None = None,
    ) -> TokenizerAdapter:
        config = config or {}
        generation = generation or {}

        def token_id(value: object) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return tokenizer.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(config.get("bos_token"))
        eos: list[int] = []
        gen_eos = generation.get("eos_token_id")
        if isinstance(gen_eos, int):
            eos.append(gen_eos)
        elif isinstance(gen_eos, list):
            eos.extend(int(e) for e in gen_eos)
        cfg_eos = token_id(config.get("eos_token"))
        if cfg_eos is not None and cfg_eos not in eos:
            eos.append(cfg_eos)
        specials = frozenset(
            tok.content and tokenizer.token_to_id(tok.content)
            for tok in tokenizer.get_added_tokens_decoder().values()
            if tok.special
        ) - {None}
        return cls(
            name=name,
            tokenizer=tokenizer,
            bos_id=bos,
            add_bos=bool(config.get("add_bos_token", False)) and bos is not None,
            eos_ids=tuple(eos),
            special_ids=frozenset(int(i) for i in specials if i is not None),
        )

    # -- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens (no BOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt that starts a sequence: BOS first where the model wants it."""
        ids = self.encode(text)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def token_boundaries(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, offsets) of ``text``; offsets are character spans in ``text``."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    # -- words ----------------------------------------------------------------------------
    def word_ends(self, text: str) -> list[int]:
        """Character offsets in ``text`` where a complete word ends, ascending.

        The end of the text is never included: the last word may still grow.
        """
        text = complete_text(text)
        if not text:
            return []
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        offsets = enc.offsets
        if not offsets:
            return []
        if self.splits_words:
            return self._ends_from_word_ids(enc.word_ids, offsets, len(text))
        return self._ends_from_whitespace(text, offsets)

    @staticmethod
    def _ends_from_word_ids(
        word_ids: list[int | None], offsets: list[tuple[int, int]], length: int
    ) -> list[int]:
        ends: list[int] = []
        for k in range(1, len(offsets)):
            if word_ids[k] != word_ids[k - 1]:
                start = offsets[k][0]
                # a token boundary inside a character is not a word boundary
                if offsets[k - 1][1] == start and 0 < start < length:
                    ends.append(start)
        return ends

    @staticmethod
    def _ends_from_whitespace(text: str, offsets: list[tuple[int, int]]) -> list[int]:
        ends: list[int] = []
        for k in range(1, len(offsets)):
            p = offsets[k][0]
            if offsets[k - 1][1] != p or not 0 < p < len(text) or (ends and ends[-1] == p):
                continue
            before, after = text[p - 1], text[p]
            if before.isspace() != after.isspace() or before == "\n" or after == "\n":
                ends.append(p)
        return ends

    def is_stable_split(self, text: str, p: int) -> bool:
        """Whether encoding ``text[:p]`` gives exactly the tokens that ``text`` starts with.

        This is what lets a segment that ends at ``p`` be committed to the model and the
        next segment be encoded on its own: the concatenation equals the full encoding.
        """
        ids, offsets = self.token_boundaries(text)
        k = next((i for i, (s, _) in enumerate(offsets) if s >= p), len(ids))
        if k < len(offsets) and k > 0 and offsets[k - 1][1] != p:
            return False
        return self.encode(text[:p]) == ids[:k]
