"""``fusion-server serve`` models and flags, generated from the typed config.

Every flag is a config field (server/config.py), spelled as vLLM spells it where vLLM has
the same setting (``--served-model-name``, ``--api-key``, ``--max-model-len``, ...), and
otherwise as the field with dashes. Its help is the field's description. Positional
arguments are source models, ``[NAME=]SOURCE``. Flags override the config file (if any),
which overrides nothing else: without ``--config`` and with models on the command line,
everything else is the defaults (the paper's Cool-Fusion).
"""

from __future__ import annotations

import argparse
import copy
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fusion import hub
from server.config import (
    AutoOptions,
    ConfigError,
    FusionConfig,
    SelectionConfig,
    ServerConfig,
    _ModelBase,
)

# config section -> (model, fields left to the file: maps and lists of names)
_SECTIONS: dict[str, tuple[type[BaseModel], set[str]]] = {
    "server": (ServerConfig, set()),
    "fusion": (FusionConfig, {"models", "selection", "variants"}),
    "selection": (SelectionConfig, {"weights", "calibration"}),
    "model": (_ModelBase, {"name", "source"}),
}
# the engine options a flag may set on every source model: those ``auto`` may pick from
# (vllm-remote's are per model: its url)
_OPTION_MODELS: dict[str, type[BaseModel]] = {
    name: f.annotation for name, f in AutoOptions.model_fields.items() if name != "threads"
}
# vLLM's spelling where it has the same setting
_FLAG_NAMES = {
    ("server", "api_keys"): "api-key",
    ("server", "cors_origins"): "allowed-origins",
    ("fusion", "name"): "served-model-name",
}
_ENGINES = ("auto", *_OPTION_MODELS)
_TITLES = {
    "server": "HTTP server",
    "fusion": "the fused model",
    "selection": "selection (docs/SELECTION.md)",
    "model": "every source model",
    "options": "every source model's engine (each flag applies to the engines that have it)",
}


def _plain(annotation: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _nullable(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _add(group: Any, dest: str, flag: str, info: FieldInfo) -> None:
    kind = _plain(info.annotation)
    default = info.get_default(call_default_factory=True)
    help_text = (info.description or "").replace("%", "%%")
    if default not in (None, [], {}):
        help_text += f" (default: {default})"
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    if kind is bool:
        group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, **kw)
        return
    if typing.get_origin(kind) is list:  # one value per flag, as vLLM's --api-key: a
        kw["action"] = "append"  # list flag must not swallow the models after it
        kw["metavar"] = flag.upper().replace("-", "_")
        kw["help"] = help_text + " (repeat the flag for several)"
    elif typing.get_origin(kind) is Literal:
        kw["choices"] = typing.get_args(kind)
    elif kind in (int, float):
        kw["type"] = kind
        kw["metavar"] = "N" if kind is int else "X"
    else:
        kw["metavar"] = flag.upper().replace("-", "_")
    if _nullable(info.annotation) and kind in (int, float):
        kw["type"] = lambda v, k=kind: None if v.lower() in ("none", "null") else k(v)
    group.add_argument(f"--{flag}", **kw)


def _option_fields() -> dict[str, FieldInfo]:
    fields: dict[str, FieldInfo] = {}
    for options in _OPTION_MODELS.values():
        for name, info in options.model_fields.items():
            fields.setdefault(name, info)
    return fields


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Positional source models and one flag per config field (with ``--config``)."""
    parser.add_argument(
        "sources",
        nargs="*",
        metavar="[NAME=]SOURCE",
        help="source models to fuse, replacing the config's: a Hugging Face id ORG/NAME "
        "(or hf:ORG/NAME; @REVISION after it picks a branch, tag or commit), a GGUF repo "
        "with its quantisation ORG/NAME-GGUF:Q4_K_M (as llama.cpp's -hf), a .gguf file, a "
        "model folder, or pip:<name> (the packaged models). NAME= names it in requests "
        "(default: the repo id, or the file or folder name).",
    )
    parser.add_argument(
        "-m",
        "--model",
        "-hf",
        "--hf-repo",
        dest="more_sources",
        action="append",
        metavar="SOURCE",
        default=[],
        help="one more source model, as vLLM's --model and llama.cpp's -hf ORG/NAME:QUANT "
        "spell it (repeat for several)",
    )
    parser.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="logging level (default: INFO)"
    )
    parser.add_argument(
        "--config",
        help="YAML config file to start from (config.yaml when no models are given); "
        "flags override it, as do FUSION_* environment variables (docs: config.yaml)",
    )
    for section, (model, skip) in _SECTIONS.items():
        group = parser.add_argument_group(_TITLES[section])
        if section == "model":
            group.add_argument(
                "--engine",
                dest="model:engine",
                choices=_ENGINES,
                default=argparse.SUPPRESS,
                help="engine of every source model (default: auto: vLLM on a GPU, else "
                "llama.cpp for GGUF, else transformers; the log says why)",
            )
        for name, info in model.model_fields.items():
            if name in skip:
                continue
            flag = _FLAG_NAMES.get((section, name), name.replace("_", "-"))
            _add(group, f"{section}:{name}", flag, info)
    group = parser.add_argument_group(_TITLES["options"])
    for name, info in _option_fields().items():
        _add(group, f"options:{name}", name.replace("_", "-"), info)


def _given(args: argparse.Namespace, section: str) -> dict[str, Any]:
    prefix = f"{section}:"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


def _positional(spec: str) -> dict[str, str]:
    m = re.match(r"^([\w.-]+)=(.+)$", spec)
    name, source = (m[1], m[2]) if m else (None, spec)
    return {"name": name or hub.default_name(source), "source": source}


def _with_flags(
    model: dict[str, Any], top: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """One source model's config with the model and engine-option flags applied."""
    model = copy.deepcopy(model)
    was = model.get("engine", "auto")
    model |= top
    engine = model.get("engine", "auto")
    opts = model.setdefault("options", {})
    if was == "auto" and engine != "auto":  # --engine X: auto's block for X is X's options
        threads = opts.get("threads")
        opts = model["options"] = dict(opts.get(engine, {}))
        if threads is not None and "threads" in _OPTION_MODELS.get(engine, BaseModel).model_fields:
            opts.setdefault("threads", threads)
    for field, value in options.items():
        if engine == "auto":
            if field == "threads":
                opts["threads"] = value
                continue
            for block, kind in _OPTION_MODELS.items():
                if field in kind.model_fields:
                    opts.setdefault(block, {})[field] = value
        elif engine in _OPTION_MODELS and field in _OPTION_MODELS[engine].model_fields:
            opts[field] = value
        else:
            flag = field.replace("_", "-")
            raise ConfigError(
                f"--{flag} does not apply to model {model.get('name')!r} (engine {engine})"
            )
    return model


def _file_models(path: str | None) -> list[dict[str, Any]]:
    if path is None or not Path(path).is_file():
        return []
    data = yaml.safe_load(Path(path).read_text()) or {}
    return list(data.get("models") or [])


def sources(args: argparse.Namespace) -> list[str]:
    """The source models on the command line: positional, then each -m / -hf."""
    return [*args.sources, *args.more_sources]


def config_file(args: argparse.Namespace) -> str | None:
    """The config file to load: --config, else config.yaml unless models were given."""
    if args.config:
        return str(args.config)
    return None if sources(args) else "config.yaml"


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What the command line sets, as nested config sections for ``load_config``."""
    out: dict[str, Any] = {}
    server = _given(args, "server")
    if server:
        out["server"] = server
    fusion = _given(args, "fusion")
    selection = _given(args, "selection")
    if selection:
        fusion["selection"] = selection
    if fusion:
        out["fusion"] = fusion
    top, options = _given(args, "model"), _given(args, "options")
    given = sources(args)
    models = [_positional(s) for s in given] or (
        _file_models(config_file(args)) if top or options else []
    )
    names = [m["name"] for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if given and twice:
        raise ConfigError(
            f"two source models are named {', '.join(twice)}: name them, e.g. a={given[0]} b=..."
        )
    if models:
        out["models"] = [_with_flags(m, top, options) for m in models]
    return out
