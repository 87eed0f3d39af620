"""A model folder's tokenizer as a ``TokenizerAdapter``, whatever tokenizer files it ships.

``tokenizer.json`` loads straight into the Rust ``tokenizers.Tokenizer`` (no transformers,
no torch). A folder without it loads through transformers' ``AutoTokenizer``: a
SentencePiece ``tokenizer.model`` (Llama-2, Mistral), a tiktoken vocabulary
(``tokenizer.model`` in tiktoken format as Llama-3 ships it, ``*.tiktoken``), or a tokenizer
in remote code (``auto_map`` in tokenizer_config.json: GLM-4, Qwen-1; needs
``trust_remote_code``). The adapter always gets a Rust tokenizer, so word boundaries keep
one implementation:

- transformers v5 builds most tokenizers on a Rust backend (``backend_tokenizer``);
- a pure-Python tokenizer is converted: from its ``tiktoken.Encoding`` (ranks, split
  pattern, special tokens at their ids), else with ``convert_slow_tokenizer``;
- the result must encode the probe texts exactly as the tokenizer it came from (and a
  SentencePiece model as ``sentencepiece`` itself); otherwise loading fails, naming the
  folder and what is missing, rather than aligning on a tokenizer the model never saw.

transformers (and torch, which it imports) is imported here only for such folders, and
never in ``tokenizers_align``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, normalizers

from fusion.sources import SourceError
from tokenizers_align import TokenizerAdapter
from tokenizers_align.adapter import folder_settings

log = logging.getLogger(__name__)

TOKENIZER_FILES = "tokenizer.json, tokenizer.model, *.tiktoken, or remote code (auto_map)"
# Texts whose token ids the converted tokenizer must reproduce: words, runs of spaces,
# newlines, digits (tiktoken patterns group them differently), contractions, accents both
# composed and decomposed, CJK, emoji and a no-break space.
PROBES = (
    "Hello world",
    " Hello  world\n\n  x",
    "don't stop: x = 12345.\tok",
    "café naïve 你好 🙂 👍🏽",
    "e\u0301t\u00e9 \u00a0 — ok",
)
# SentencePiece splits a run of spaces into single "▁" pieces where the Hugging Face
# conversions (the Hub's tokenizer.json files included) merge "▁▁": texts without such
# runs are where the two must agree.
SPM_PROBES = ("Hello world", "Hello, world!\nNew line: x = 12345.", "café 你好 🙂", "don't\tstop")


class TokenizerLoadError(SourceError):
    """A model folder's tokenizer cannot be loaded exactly; the message says what is missing."""


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` ships a tokenizer that ``load_tokenizer`` can try to read."""
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tiktoken.model")):
        return True
    return any(folder.glob("*.tiktoken")) or "AutoTokenizer" in _auto_map(folder)


def _auto_map(folder: Path) -> dict[str, Any]:
    auto_map = folder_settings(folder)[0].get("auto_map") if folder.is_dir() else None
    return auto_map if isinstance(auto_map, dict) else {}


def load_tokenizer(folder: Path, name: str, *, trust_remote_code: bool = False) -> TokenizerAdapter:
    """The adapter for the tokenizer in ``folder`` (see the module docstring)."""
    if (folder / "tokenizer.json").is_file():
        return TokenizerAdapter.from_dir(folder, name=name)
    if not has_tokenizer_files(folder):
        raise TokenizerLoadError(f"model {name}: {folder} has no tokenizer ({TOKENIZER_FILES})")
    if not (folder / "tokenizer_config.json").is_file() and any(folder.glob("*.tiktoken")):
        # a tiktoken vocabulary holds ranks only: no split pattern, no special tokens
        raise TokenizerLoadError(
            f"model {name}: {folder} has a *.tiktoken vocabulary but no tokenizer_config.json "
            "(with its tokenizer_class, or auto_map and the tokenizer's .py) to say how to read it"
        )
    tok = _auto_tokenizer(folder, name, trust_remote_code)
    tokenizer = _rust_tokenizer(tok, folder, name)
    tokenizer = _sentencepiece_dummy_prefix(tokenizer)
    _check_sentencepiece(tokenizer, folder, name)
    config, generation = folder_settings(folder)
    bos_id = tok.bos_token_id
    config |= {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        # what transformers does, whether or not tokenizer_config.json says it
        "add_bos_token": bos_id is not None and tok.encode("a")[:1] == [bos_id],
    }
    log.info("model %s: tokenizer from %s via transformers (%s)", name, folder, type(tok).__name__)
    return TokenizerAdapter.from_tokenizer(tokenizer, name, config, generation)


def _auto_tokenizer(folder: Path, name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        # a bool, never None: None makes transformers ask on stdin before running remote code
        return AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=bool(trust_remote_code), local_files_only=True
        )
    except Exception as exc:
        if "AutoTokenizer" in _auto_map(folder) and not trust_remote_code:
            raise TokenizerLoadError(
                f"model {name}: the tokenizer in {folder} is remote code "
                f"({_auto_map(folder)['AutoTokenizer']}); set trust_remote_code: true for "
                "this model to run it"
            ) from exc
        raise TokenizerLoadError(
            f"model {name}: transformers cannot load the tokenizer in {folder} "
            f"({' '.join(str(exc).split())}); the "
            "folder needs tokenizer.json, or tokenizer.model / *.tiktoken with a "
            "tokenizer_config.json naming its tokenizer_class"
        ) from exc


def _rust_tokenizer(tok: Any, folder: Path, name: str) -> Tokenizer:
    """The Rust tokenizer behind ``tok`` (a copy), or one converted from it; checked."""
    backend = getattr(tok, "backend_tokenizer", None)
    why = ""
    if isinstance(backend, Tokenizer):
        candidates = [backend]
    else:
        try:
            candidates = _converted(tok)
        except ValueError as exc:
            candidates = []
            why = f"it has no Rust backend and {exc}"
        why = why or ("" if candidates else "it has no Rust backend and no converter for it")
    mismatches = []
    for candidate in candidates:
        copy = Tokenizer.from_str(candidate.to_str())
        problem = _differs(copy, tok)
        if problem is None:
            return copy
        mismatches.append(problem)
    detail = why or "its Rust form encodes " + "; ".join(mismatches)
    raise TokenizerLoadError(
        f"model {name}: the tokenizer in {folder} ({type(tok).__name__}) cannot be used for "
        f"alignment: {detail}; add a tokenizer.json (a fast tokenizer's save_pretrained)"
    )


def _converted(tok: Any) -> list[Tokenizer]:
    """Rust tokenizers that may be equivalent to the pure-Python ``tok``, best first."""
    found: list[Tokenizer] = []
    encoding = _tiktoken_encoding(tok)
    if encoding is not None:
        plain = _from_tiktoken(encoding, tok)
        nfc = Tokenizer.from_str(plain.to_str())
        nfc.normalizer = normalizers.NFC()  # Qwen-1 normalises to NFC before encoding
        found += [plain, nfc]
    else:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        try:
            found.append(convert_slow_tokenizer(tok))
        except Exception as exc:  # no converter for this class: reported by the caller
            log.debug("convert_slow_tokenizer(%s) failed: %s", type(tok).__name__, exc)
    return found


def _tiktoken_encoding(tok: Any) -> Any:
    try:
        import tiktoken
    except ImportError:
        return None
    return next((v for v in vars(tok).values() if isinstance(v, tiktoken.Encoding)), None)


def _from_tiktoken(encoding: Any, tok: Any) -> Tokenizer:
    """A Rust byte-level BPE with ``encoding``'s ranks and split pattern, and its special
    tokens (and those transformers adds for ``tok``) at their ids."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks: dict[bytes, int] = encoding._mergeable_ranks
    specials = {int(i): str(t) for i, t in tok.added_tokens_decoder.items()}
    specials |= {i: t for t, i in encoding._special_tokens.items()}
    base = len(ranks)
    if set(ranks.values()) != set(range(base)) or any(i < base for i in specials):
        raise ValueError(f"its tiktoken ranks are not 0..{base - 1} followed by the special tokens")
    top = max(specials, default=base - 1)
    extra = [specials.get(i, f"<|unused_{i}|>") for i in range(base, top + 1)]

    class FromRanks(TikTokenConverter):
        """Reads the ranks from the encoding in memory, not from a vocabulary file."""

        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:  # type: ignore[override]
            return ranks

    converter = FromRanks(pattern=encoding._pat_str, extra_special_tokens=extra)  # type: ignore[no-untyped-call]
    return converter.converted()


def _differs(tokenizer: Tokenizer, tok: Any) -> str | None:
    """Where ``tokenizer`` and transformers' ``tok`` encode a probe text differently."""
    probes = list(PROBES)
    if isinstance(tok.eos_token, str):
        probes.append(f"end{tok.eos_token}next")  # special tokens inside a text
    for text in probes:
        want = list(tok.encode(text, add_special_tokens=False))
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != want:
            return f"{text!r} as {got[:12]} instead of {want[:12]}"
    return None


def _sentencepiece_dummy_prefix(tokenizer: Tokenizer) -> Tokenizer:
    """SentencePiece's dummy prefix as a normaliser, as in the Hub's Llama-2 tokenizer.json.

    transformers v5 builds a legacy Llama/Mistral tokenizer from ``tokenizer.model`` with a
    ``Metaspace(prepend_scheme="always")`` pre-tokenizer, which skips the prefix when the
    text already starts with a space: " the" encodes as "▁the" and decodes to "the",
    where SentencePiece writes "▁▁the". Prepending in the normaliser keeps every text's
    round trip (``prepend_scheme="first"`` models have no such equivalent and stay as built).
    """
    pre = tokenizer.pre_tokenizer
    if tokenizer.normalizer is not None or type(pre).__name__ != "Metaspace":
        return tokenizer
    if pre.prepend_scheme != "always" or pre.split:
        return tokenizer
    mark = pre.replacement
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(mark), normalizers.Replace(" ", mark)]
    )
    tokenizer.pre_tokenizer = None
    return tokenizer


def _check_sentencepiece(tokenizer: Tokenizer, folder: Path, name: str) -> None:
    """A SentencePiece ``tokenizer.model`` and its Rust form agree on ``SPM_PROBES``."""
    path = folder / "tokenizer.model"
    try:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception:  # no such file, or a tiktoken vocabulary under that name
        return
    for text in SPM_PROBES:
        want = processor.encode(text)
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != want:
            raise TokenizerLoadError(
                f"model {name}: the tokenizer transformers builds from {path} encodes "
                f"{text!r} as {got[:12]}, SentencePiece as {want[:12]}; add a "
                "tokenizer_config.json naming its tokenizer_class (e.g. LlamaTokenizer) or "
                "a tokenizer.json"
            )
