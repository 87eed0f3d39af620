"""Engine kinds: name -> typed options (server/config.py) + a factory, and ``auto``.

Adding a backend is one module in ``fusion/engines/`` and one entry in ``ENGINES`` (plus
its options model and config class in server/config.py). Factories resolve the model's
source into the form their engine reads (an HF folder with weights, or a GGUF file with a
tokenizer-only folder) and import their heavy backend only when called.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.engine import Engine
from fusion.sources import SourceError, resolve_gguf, resolve_source
from server.config import (
    AutoModel,
    LlamaCppModel,
    LlamaCppOptions,
    ModelConfig,
    TransformersModel,
    TransformersOptions,
    VllmModel,
    VllmOptions,
    VllmRemoteModel,
    VllmRemoteOptions,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Built:
    """An engine (not started) and the folder holding its tokenizer and chat template."""

    engine: Engine
    tokenizer_dir: Path


def _transformers(name: str, source: str, opts: Any) -> Built:
    from fusion.engines.transformers_engine import TransformersEngine

    folder = resolve_source(source)
    o: TransformersOptions = opts
    engine = TransformersEngine(name, folder, threads=o.threads, device=o.device, dtype=o.dtype)
    return Built(engine, folder)


def _vllm(name: str, source: str, opts: Any) -> Built:
    from fusion.engines.vllm_engine import VllmEngine

    folder = resolve_source(source)
    o: VllmOptions = opts
    return Built(VllmEngine(name, str(folder), o.model_dump()), folder)


def _llamacpp(name: str, source: str, opts: Any) -> Built:
    from fusion.engines.llamacpp_engine import LlamaCppEngine

    found = resolve_gguf(source)
    o: LlamaCppOptions = opts
    engine = LlamaCppEngine(name, found.gguf, found.tokenizer_dir, **o.model_dump())
    return Built(engine, found.tokenizer_dir)


def tokenizer_source(source: str) -> Path:
    """A folder with the tokenizer and chat template of ``source``, without its weights:
    the tokenizer-only folder of a GGUF (``pip:``, ``gguf:``), else the HF folder itself
    (``tokenizer.json`` is enough; no ``config.json`` or weights needed)."""
    if _has_gguf(source):
        return resolve_gguf(source).tokenizer_dir
    kind, _, rest = source.partition(":")
    path = Path(rest if kind == "hf" else source).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise SourceError(
            f"model source {source!r}: {path} has no tokenizer.json (an engine on a remote "
            "server still needs the model's tokenizer here); use pip:<name>, gguf:<file>, "
            "or a folder with the model's tokenizer files"
        )
    return path


def _vllm_remote(name: str, source: str, opts: Any) -> Built:
    from fusion.engines.vllm_remote_engine import VllmRemoteEngine

    folder = tokenizer_source(source)
    o: VllmRemoteOptions = opts
    settings = o.model_dump(exclude={"api_key", "api_key_env"})
    api_key = o.api_key or (os.environ.get(o.api_key_env) if o.api_key_env else None)
    return Built(VllmRemoteEngine(name, folder, api_key=api_key, **settings), folder)


ENGINES: dict[str, Callable[[str, str, Any], Built]] = {
    "transformers": _transformers,
    "vllm": _vllm,
    "llamacpp": _llamacpp,
    "vllm-remote": _vllm_remote,
}


@dataclass(frozen=True)
class Choice:
    kind: str
    options: Any
    reason: str


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gpu_present() -> bool:
    """An NVIDIA GPU is visible (checked without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _has_gguf(source: str) -> bool:
    kind, _, rest = source.partition(":")
    return kind in ("pip", "gguf") or (kind != "hf" and rest == "" and source.endswith(".gguf"))


def choose(mc: ModelConfig) -> Choice:
    """The engine kind a model gets, with its options and the reason (``auto`` resolved)."""
    if isinstance(mc, TransformersModel | VllmModel | LlamaCppModel | VllmRemoteModel):
        return Choice(mc.engine, mc.options, "set in config")
    assert isinstance(mc, AutoModel)
    opts = mc.options
    if opts.threads is not None:
        opts = opts.model_copy(
            update={
                "llamacpp": opts.llamacpp.model_copy(update={"threads": opts.threads}),
                "transformers": opts.transformers.model_copy(update={"threads": opts.threads}),
            }
        )
    if gpu_present() and _has_module("vllm"):
        return Choice("vllm", opts.vllm, "auto: a GPU is present and vLLM is installed")
    if _has_gguf(mc.source) and _has_module("llama_cpp"):
        return Choice(
            "llamacpp",
            opts.llamacpp,
            "auto: no GPU; the source is a GGUF and llama.cpp is the fastest CPU engine "
            "measured (docs/BENCHMARKS.md)",
        )
    why = "no GGUF file in the source" if not _has_gguf(mc.source) else "llama_cpp not installed"
    return Choice("transformers", opts.transformers, f"auto: no GPU; {why}")


def build(mc: ModelConfig) -> tuple[Built, Choice]:
    """Resolve ``mc``'s source and make its engine (blocking: run it in a thread)."""
    choice = choose(mc)
    log.info("model %s: engine %s (%s)", mc.name, choice.kind, choice.reason)
    return ENGINES[choice.kind](mc.name, mc.source, choice.options), choice


def prepare(mc: ModelConfig) -> Path:
    """Resolve (convert and cache) ``mc``'s source in the form its engine reads."""
    choice = choose(mc)
    if choice.kind == "llamacpp":
        return resolve_gguf(mc.source).gguf
    if choice.kind == "vllm-remote":  # the weights live with the remote server
        return tokenizer_source(mc.source)
    return resolve_source(mc.source)
