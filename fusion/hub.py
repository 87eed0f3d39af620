"""Models on the Hugging Face Hub as sources: ``hf:ORG/NAME[@REV][:QUANT]`` or bare ``ORG/NAME``.

A Hub source is turned into a local one (``materialize``) before anything else sees it: a
repo of weights becomes ``hf:<snapshot folder>``, a GGUF repo ``gguf:<file in the
snapshot>``. Everything downloads with ``huggingface_hub`` into its standard cache, so
``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what they mean to
vLLM and transformers, and a model already fetched by either is not fetched again.

GGUF repos work as llama.cpp's ``-hf ORG/NAME:Q4_K_M``: the tag picks the file by its
quantisation (case-insensitive, split files included); without a tag, Q4_K_M if the repo
has it, else the repo's only GGUF. A local path always wins over a Hub id of the same
spelling, as in vLLM.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.sources import SourceError
from fusion.tokenizer_loading import TOKENIZER_FILES, has_tokenizer_files

log = logging.getLogger(__name__)

# ORG/NAME, then @revision, then :QUANT (llama.cpp's tag)
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?::(?P<quant>[\w.-]+))?$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's default tag for -hf
# what a model needs besides its weights: configs, tokenizers (fast, sentencepiece,
# tiktoken), remote code, chat templates
_TOKENIZER_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]


@dataclass(frozen=True)
class HubRef:
    """One model on the Hub: the repo, a revision (branch, tag or commit) and a GGUF tag."""

    repo: str
    revision: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.repo}{rev}{f':{self.quant}' if self.quant else ''}"


def parse(source: str) -> HubRef | None:
    """The Hub model ``source`` names, or None for a local or ``pip:`` source.

    ``hf:X`` and a bare ``X`` are local when X exists on disk (a folder or a file)."""
    explicit = source.startswith("hf:")
    rest = source[3:] if explicit else source
    if not rest or rest.startswith((".", "/", "~")) or Path(rest).expanduser().exists():
        return None
    if not explicit and re.match(r"^[a-z][\w+.-]*:", rest) and "/" not in rest.split(":")[0]:
        return None  # pip:, gguf: and any other scheme
    m = _HUB_ID.match(rest)
    if m is None:
        return None
    return HubRef(m["repo"], m["rev"], m["quant"])


def default_name(source: str) -> str:
    """The model name a source gets when none is given: vLLM's (the repo id) for the Hub,
    the file stem or folder name for a path, the name for ``pip:``."""
    ref = parse(source)
    if ref is not None:
        return ref.repo
    kind, _, rest = source.partition(":")
    if kind in ("pip", "gguf", "hf") and rest:
        source = rest
    path = Path(source).expanduser()
    return path.stem if path.suffix == ".gguf" else (path.name or source)


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise SourceError("Hub models need huggingface_hub (pip install huggingface_hub)") from exc
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _explain(ref: HubRef, exc: Exception) -> SourceError:
    """A SourceError naming the repo and saying what is wrong and what to do."""
    errors = _hub().errors
    if isinstance(exc, errors.GatedRepoError):
        why = (
            "is gated: accept its licence on https://huggingface.co/" + ref.repo + " and set "
            "HF_TOKEN to a token of that account"
        )
    elif isinstance(exc, errors.RevisionNotFoundError):
        why = f"has no revision {ref.revision!r}"
    elif isinstance(exc, errors.RepositoryNotFoundError):
        why = "was not found on the Hub (a private repo needs HF_TOKEN)"
    elif isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        where = _hub().constants.HF_HUB_CACHE
        why = (
            f"is not in the local Hub cache ({where}) and the Hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if _offline() else "")
            + f": fetch it once online, e.g. `hf download {ref.repo}`"
        )
    elif isinstance(exc, errors.HfHubHTTPError) and getattr(exc, "response", None) is not None:
        status = exc.response.status_code
        hint = ": check HF_TOKEN" if status in (401, 403) else ""
        why = f"could not be fetched (HTTP {status}){hint}"
    else:
        why = f"could not be fetched ({type(exc).__name__}: {exc})"
    return SourceError(f"model {ref}: {ref.repo} {why}")


@functools.lru_cache(maxsize=64)
def _files(ref: HubRef) -> tuple[str, ...]:
    """The repo's file names at the revision: from the Hub, or, offline, from the cached
    snapshot (the files that were fetched)."""
    hub = _hub()
    try:
        if _offline():
            folder = Path(
                hub.snapshot_download(ref.repo, revision=ref.revision, local_files_only=True)
            )
            return tuple(
                sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            )
        return tuple(sorted(hub.HfApi().list_repo_files(ref.repo, revision=ref.revision)))
    except Exception as exc:
        raise _explain(ref, exc) from exc


def _ggufs(files: tuple[str, ...]) -> list[str]:
    """The repo's GGUF model files (not the vision projectors some repos carry)."""
    return [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]


def _quant_of(filename: str) -> str:
    """The quantisation tag in a GGUF file name: 'model-Q4_K_M.gguf' -> 'Q4_K_M'."""
    stem = _SPLIT.sub(".gguf", Path(filename).name)[: -len(".gguf")]
    return re.split(r"[-.]", stem)[-1]


def pick_gguf(ref: HubRef, files: tuple[str, ...]) -> list[str]:
    """The GGUF file(s) of the wanted quantisation (all parts of a split file, first part
    first), as llama.cpp's ``-hf`` picks them."""
    ggufs = _ggufs(files)
    if not ggufs:
        raise SourceError(f"model {ref}: {ref.repo} has no GGUF file")
    tags = sorted({_quant_of(f) for f in ggufs}, key=str.upper)
    want = ref.quant or (DEFAULT_QUANT if DEFAULT_QUANT in map(str.upper, tags) else None)
    if want is None:
        if len(tags) > 1:
            raise SourceError(
                f"model {ref}: {ref.repo} has several GGUF quantisations ({', '.join(tags)}) "
                f"and no {DEFAULT_QUANT}; name one, e.g. {ref.repo}:{tags[0]}"
            )
        want = tags[0]
    chosen = sorted(f for f in ggufs if _quant_of(f).upper() == want.upper())
    if not chosen:
        raise SourceError(
            f"model {ref}: {ref.repo} has no GGUF of quantisation {want} "
            f"(it has: {', '.join(tags)})"
        )
    firsts = [f for f in chosen if not _SPLIT.search(f) or _SPLIT.search(f)[1] == "00001"]  # type: ignore[index]
    if len(firsts) > 1:
        raise SourceError(
            f"model {ref}: {ref.repo} has several {want} GGUF files ({', '.join(firsts)})"
        )
    return chosen


def is_gguf(ref: HubRef) -> bool:
    """Whether the repo is used as GGUF: a tag was given, or it has GGUF files but no
    Transformers weights."""
    if ref.quant:
        return True
    files = _files(ref)
    weights = any(f.endswith((".safetensors", ".bin")) for f in files)
    return not weights and bool(_ggufs(files))


def check(source: str) -> None:
    """Fail fast (SourceError) when a Hub source cannot be had: the repo is missing, gated,
    not cached while offline, or lacks the GGUF asked for. Downloads nothing."""
    ref = parse(source)
    if ref is not None and is_gguf(ref):
        pick_gguf(ref, _files(ref))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")) or any(
        folder.glob("*.tiktoken")
    )


def materialize(source: str, weights: bool = True) -> str:
    """``source`` with a Hub model replaced by its local copy (fetched when missing):
    ``gguf:<file>`` for a GGUF repo, else ``hf:<snapshot folder>``; other sources as given.
    ``weights=False`` fetches a model repo's tokenizer and configs only (for an engine
    whose weights live on another server)."""
    ref = parse(source)
    if ref is None:
        return source
    hub = _hub()
    try:
        if is_gguf(ref):
            parts = pick_gguf(ref, _files(ref))
            paths = [hub.hf_hub_download(ref.repo, part, revision=ref.revision) for part in parts]
            log.info("model %s: %s", ref, paths[0])
            return f"gguf:{paths[0]}"
        files = _files(ref)
        patterns = list(_TOKENIZER_FILES)
        if weights:
            safetensors = any(f.endswith(".safetensors") for f in files)
            patterns.append("*.safetensors" if safetensors else "*.bin")
        folder = Path(
            hub.snapshot_download(
                ref.repo,
                revision=ref.revision,
                allow_patterns=patterns,
                ignore_patterns=["original/*", "*/original/*"],
                local_files_only=_offline(),
            )
        )
    except SourceError:
        raise
    except Exception as exc:
        raise _explain(ref, exc) from exc
    log.info("model %s: %s", ref, folder)
    if not has_tokenizer_files(folder):
        raise SourceError(f"model {ref}: {ref.repo} has no tokenizer ({TOKENIZER_FILES})")
    if weights and not (folder / "config.json").is_file():
        raise SourceError(f"model {ref}: {ref.repo} has no config.json (not a Transformers model)")
    if weights and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        where = "in the local Hub cache (HF_HUB_OFFLINE is set)" if _offline() else "in the repo"
        raise SourceError(
            f"model {ref}: {ref.repo} has no weights (*.safetensors or *.bin) {where}; a GGUF "
            "repo needs its quantisation, e.g. ORG/NAME:Q4_K_M"
        )
    return f"hf:{folder}"
