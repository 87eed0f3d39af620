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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.sources import SourceError, weight_files
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
        return f"{self.label}{f':{self.quant}' if self.quant else ''}"

    @property
    def label(self) -> str:
        """How errors name it: the repo, and the revision when one was asked for."""
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


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
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise SourceError("Hub models need huggingface_hub (pip install huggingface_hub)") from exc
    return huggingface_hub


def _offline() -> bool:
    """huggingface_hub's own reading (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE)."""
    return bool(_hub().constants.HF_HUB_OFFLINE)


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
    elif isinstance(exc, errors.HfHubHTTPError) or not _offline():
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:
            hint = ": check HF_TOKEN" if status in (401, 403) else ""
            why = f"could not be fetched (HTTP {status}){hint}"
        else:
            why = (
                f"is not in the local Hub cache ({_hub().constants.HF_HUB_CACHE}) and the Hub "
                f"cannot be reached ({type(exc).__name__}: {exc})"
            )
    else:
        why = (
            f"is not in the local Hub cache ({_hub().constants.HF_HUB_CACHE}) and the Hub "
            f"cannot be reached (HF_HUB_OFFLINE is set): fetch it once online, e.g. "
            f"`hf download {ref.repo}`"
        )
    return SourceError(f"{ref.label} {why}")


@functools.lru_cache(maxsize=64)
def _files(ref: HubRef) -> tuple[str, ...]:
    """The repo's file names at the revision: from the Hub, or, offline or when the Hub
    cannot be reached, from the cached snapshot (the files that were fetched), as
    huggingface_hub itself falls back."""
    hub = _hub()
    if not _offline():
        try:
            return tuple(sorted(hub.HfApi().list_repo_files(ref.repo, revision=ref.revision)))
        except hub.errors.HfHubHTTPError as exc:  # the Hub answered: missing, gated, ...
            raise _explain(ref, exc) from exc
        except Exception as exc:  # no connection: what the cache holds
            log.warning("model %s: the Hub cannot be reached (%s); using the cache", ref, exc)
            unreachable: Exception | None = exc
    else:
        unreachable = None
    try:
        folder = Path(hub.snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
    except Exception as exc:
        raise _explain(ref, unreachable or exc) from exc
    return tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))


def _ggufs(files: tuple[str, ...]) -> list[str]:
    """The repo's GGUF model files (not the vision projectors some repos carry)."""
    return [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]


def _stem(filename: str) -> str:
    """A GGUF file's name without the split-part suffix and the extension."""
    return _SPLIT.sub(".gguf", Path(filename).name)[: -len(".gguf")]


def _quant_of(filename: str) -> str:
    """The quantisation tag in a GGUF file name: 'model-Q4_K_M.gguf' -> 'Q4_K_M'."""
    return re.split(r"[-.]", _stem(filename))[-1]


def _tagged(filename: str, tag: str) -> bool:
    """Whether the file is of quantisation ``tag``: the name ends with it after a '-' or
    '.' (so unsloth's 'UD-Q4_K_XL' matches 'model-UD-Q4_K_XL.gguf'), any case."""
    stem, tag = _stem(filename).upper(), tag.upper()
    return stem == tag or (stem.endswith(tag) and stem[-len(tag) - 1] in "-.")


def pick_gguf(ref: HubRef, files: tuple[str, ...]) -> list[str]:
    """The GGUF file(s) of the wanted quantisation (all parts of a split file, first part
    first), as llama.cpp's ``-hf`` picks them."""
    ggufs = _ggufs(files)
    if not ggufs:
        raise SourceError(f"{ref.label} has no GGUF file")
    tags = sorted({_quant_of(f) for f in ggufs}, key=str.upper)
    want = ref.quant or (DEFAULT_QUANT if DEFAULT_QUANT in map(str.upper, tags) else None)
    if want is None:
        if len(tags) > 1:  # llama.cpp would take its first; we say which there are
            raise SourceError(
                f"{ref.label} has several GGUF quantisations ({', '.join(tags)}) and no "
                f"{DEFAULT_QUANT}; name one, e.g. {ref.repo}:{tags[0]}"
            )
        want = tags[0]
    chosen = sorted(f for f in ggufs if _tagged(f, want))
    if not chosen:
        raise SourceError(
            f"{ref.label} has no GGUF of quantisation {want} (it has: {', '.join(tags)})"
        )
    firsts = [f for f in chosen if not _SPLIT.search(f) or _SPLIT.search(f)[1] == "00001"]  # type: ignore[index]
    if len(firsts) > 1:
        raise SourceError(f"{ref.label} has several {want} GGUF files ({', '.join(firsts)})")
    return chosen


def is_gguf(ref: HubRef) -> bool:
    """Whether the repo is used as GGUF: a tag was given, or it has GGUF files but no
    Transformers weights."""
    if ref.quant:
        return True
    files = _files(ref)
    return not weight_files(files) and bool(_ggufs(files))


def check(source: str) -> None:
    """Fail fast (SourceError) when a Hub source cannot be had: the repo is missing, not
    cached while offline, gated for this token (the Hub lists a gated repo's files to
    anyone; only its downloads need access), or lacks the GGUF asked for. Downloads
    nothing."""
    ref = parse(source)
    if ref is None:
        return
    if is_gguf(ref):
        pick_gguf(ref, _files(ref))
    if not _offline():
        hub = _hub()
        try:
            hub.HfApi().auth_check(ref.repo)
        except hub.errors.HfHubHTTPError as exc:
            raise _explain(ref, exc) from exc
        except Exception as exc:  # the Hub cannot be reached: the cache decides later
            log.warning("model %s: could not check access (%s)", ref, exc)


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
        patterns = list(_TOKENIZER_FILES) + (weight_files(files) if weights else [])
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
        raise SourceError(f"{ref.label} has no tokenizer ({TOKENIZER_FILES})")
    if weights and not (folder / "config.json").is_file():
        raise SourceError(f"{ref.label} has no config.json (not a Transformers model)")
    if weights and not weight_files(p.name for p in folder.iterdir()):
        where = "in the local Hub cache (HF_HUB_OFFLINE is set)" if _offline() else "in the repo"
        raise SourceError(
            f"{ref.label} has no weights (*.safetensors or pytorch_model*.bin) {where}; a GGUF "
            "repo needs its quantisation, e.g. ORG/NAME:Q4_K_M"
        )
    return f"hf:{folder}"
