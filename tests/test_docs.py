"""The docs stay true to the code.

README.md and docs/*.md may name only repository files that exist and tests that are
defined, ``fusion-server`` flags its parser has, config fields the typed config has (and
YAML snippets it accepts), and metric names the server's registry renders. The README
stays short, and every result number in it (a percentage, a ratio, a p-value, an interval,
a measurement with its unit) appears identically in docs/, where its source is.

Each check is a function over the text, so a test can show it fails on a broken line.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

from server import protocol
from server.cli import _parser
from server.config import (
    AppConfig,
    AutoOptions,
    FusionConfig,
    LlamaCppOptions,
    ModelConfig,
    ServerConfig,
    TransformersOptions,
    VariantConfig,
    VllmOptions,
    VllmRemoteOptions,
    load_config,
)
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

# --- reading markdown ---------------------------------------------------------------------

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def fenced(text: str) -> list[tuple[str, str]]:
    """Each fenced block's language and body."""
    return [(m[1], m[2]) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    """Inline code spans outside fenced blocks (a span may wrap a line)."""
    return [" ".join(m[1].split()) for m in INLINE.finditer(prose(text))]


def docs() -> Iterator[tuple[Path, str]]:
    for path in DOC_FILES:
        yield path, path.read_text(encoding="utf-8")


def _read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def where(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- (a) files and tests named in the docs exist ------------------------------------------

TOP = "server|fusion|tokenizers_align|tests|bench|eval|deploy|docs"
REPO_PATH = re.compile(rf"(?<![\w./~-])((?:{TOP})/[\w./*-]*[\w*/])(::\w+)?")
TOP_FILE = re.compile(
    r"(?<![\w./~-])(config[\w.-]*\.yaml|Dockerfile(?:\.cpu)?|Makefile|LICENSE|pyproject\.toml"
    r"|requirements[\w.-]*\.txt)(?![\w/-])"
)
TEST_NAME = re.compile(r"^(?:::)?(test_\w+)$")
# written by the scripts and the eval data steps, not part of the repository
GENERATED = ("bench/results", "eval/results", "eval/data")  # outputs: not in a clone


def named_paths(text: str) -> set[str]:
    """Repository paths in inline code, in fenced blocks (commands) and as link targets
    (those relative to the document are resolved by the caller)."""
    found: set[str] = set()
    for chunk in [*inline_code(text), *(body for _, body in fenced(text))]:
        found |= {m[1] + (m[2] or "") for m in REPO_PATH.finditer(chunk)}
        found |= {m[1] for m in TOP_FILE.finditer(chunk)}
    return found


def missing_paths(text: str, base: Path) -> list[str]:
    """Named paths (and ``file.py::test`` functions) that do not exist; link targets
    are relative to ``base``, the document's folder."""
    problems = []
    for name in sorted(named_paths(text)):
        path, _, func = name.partition("::")
        if path.startswith(GENERATED):
            continue
        if "*" in path:
            if not list(ROOT.glob(path)):
                problems.append(name)
            continue
        exists = (ROOT / path).exists()
        defined = exists and (
            not func or re.search(rf"^\s*(async )?def {func}\(", _read(path), re.M)
        )
        if not defined:
            problems.append(name)
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z]+:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        linked = base / file if file else None
        if linked is not None and not linked.exists():
            problems.append(target)
            continue
        if anchor and anchor not in anchors(linked.read_text() if linked else text):
            problems.append(target)
    return problems


def anchors(markdown: str) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", prose(markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= set(re.findall(r"^\s*(?:async )?def (test_\w+)\(", path.read_text(), re.M))
    return names


def unknown_tests(text: str, tests: set[str]) -> list[str]:
    """Test functions named on their own in inline code that no test file defines."""
    spans = (TEST_NAME.match(s) for s in inline_code(text))
    return sorted({m[1] for m in spans if m and m[1] not in tests})


@pytest.mark.parametrize("path", DOC_FILES, ids=where)
def test_every_file_and_test_the_docs_name_exists(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert missing_paths(text, path.parent) == []
    assert unknown_tests(text, defined_tests()) == []


# --- (b) fusion-server commands use flags their parser has --------------------------------

COMMAND = re.compile(r"fusion-server\s+([\w-]+)(.*)", re.DOTALL)
# the command itself, not a path (~/.cache/fusion-server/...) or an image (fusion-server-cpu)
WORD = re.compile(r"(?<![\w/.~-])fusion-server(?![\w/-])")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:[ =]([^\s\]]+))?")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("fusion-server has no subcommands")


def commands(text: str) -> list[str]:
    """Every ``fusion-server ...`` command line: inline spans, and fenced lines with their
    continuations (a trailing backslash, or the indented lines of a synopsis)."""
    found = [s[m.start() :] for s in inline_code(text) if (m := WORD.search(s))]
    for lang, body in fenced(text):
        if lang in ("yaml", "json"):
            continue  # a container named fusion-server is no command
        lines = body.splitlines()
        for i, line in enumerate(lines):
            command = line.split(" #")[0]
            start = WORD.search(command)
            if start is None:
                continue
            j = i + 1
            while j < len(lines) and (
                command.rstrip().endswith("\\") or lines[j].startswith((" ", "\t"))
            ):
                command = command.rstrip().rstrip("\\") + " " + lines[j].split(" #")[0].strip()
                j += 1
            found.append(command[start.start() :])
    return found


def bad_flags(text: str, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Subcommands, flags and flag values (where the flag has choices) the parser lacks."""
    problems = []
    for command in commands(text):
        m = COMMAND.match(command)
        if m is None or m[1].startswith("-"):
            continue
        sub = parsers.get(m[1])
        if sub is None:
            problems.append(f"fusion-server {m[1]}: no such command")
            continue
        actions = {s: a for a in sub._actions for s in a.option_strings}
        for flag, value in FLAG.findall(m[2]):
            action = actions.get(flag)
            if action is None:
                problems.append(f"fusion-server {m[1]} {flag}")
            elif action.choices and value and not value.isupper() and "<" not in value:
                wrong = [v for v in value.split("|") if v not in action.choices]
                if wrong:
                    problems.append(f"fusion-server {m[1]} {flag} {value}")
    return problems


@pytest.mark.parametrize("path", DOC_FILES, ids=where)
def test_every_fusion_server_flag_in_the_docs_exists(path: Path) -> None:
    assert bad_flags(path.read_text(encoding="utf-8"), subparsers()) == []


# --- (c) config names and YAML snippets are the typed config's ----------------------------

OPTION_MODELS: list[type[BaseModel]] = [
    LlamaCppOptions,
    TransformersOptions,
    VllmOptions,
    VllmRemoteOptions,
    AutoOptions,
]
# a variant's selection is a dict of SelectionConfig's fields, merged at start
FIELD_TYPES: dict[tuple[type[BaseModel], str], Any] = {
    (VariantConfig, "selection"): FusionConfig.model_fields["selection"].annotation
}
# `fusion.X` is also the request's extension field and the response's trace and model card
RESPONSE_FIELDS = {"fusion.segments", "fusion.sources"}
# `key: value` spans that are not our config: source schemes (pip:), SSE lines and response
# bodies (data:, choices:, policies:, param:), a log line (playground:), Docker Compose (ipc:)
NOT_CONFIG = {"pip", "gguf", "hf", "data", "choices", "policies", "playground", "param", "ipc"}
DOTTED = re.compile(r"^(server|fusion|options|models)\.[\w.<>-]+$")
KEY_VALUE = re.compile(r"^([a-z_]+):(?:\s|$)")


def _nodes(annotation: Any) -> list[Any]:
    """What a field holds: models, ("list", nodes), ("dict", nodes) or "leaf"."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _nodes(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [n for arg in typing.get_args(annotation) for n in _nodes(arg)]
    if origin is list:
        return [("list", _nodes(typing.get_args(annotation)[0]))]
    if origin is dict:
        return [("dict", _nodes(typing.get_args(annotation)[1]))]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return ["leaf"]


def _resolves(nodes: list[Any], parts: list[str]) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    for node in nodes:
        if isinstance(node, type) and head in node.model_fields:
            inner = _nodes(FIELD_TYPES.get((node, head), node.model_fields[head].annotation))
        elif isinstance(node, tuple) and (node[0] == "dict" or head.isdigit() or "<" in head):
            inner = node[1]  # a dict's key or a list's index (or a <placeholder> for either)
        else:
            continue
        if _resolves(inner, rest):
            return True
    return False


def config_name_known(name: str) -> bool:
    """A dotted name (``fusion.selection.min_support``, ``options.gpu``,
    ``models.0.options.n_ctx``) that the config, or for ``fusion.*`` the request's
    ``fusion`` field, has."""
    parts = name.split(".")
    if parts[0] == "options":
        return _resolves(list(OPTION_MODELS), parts[1:])
    if parts[0] == "fusion" and (
        name in RESPONSE_FIELDS or _resolves([protocol.FusionOptions], parts[1:])
    ):
        return True
    return _resolves([AppConfig], parts)


def all_field_names() -> set[str]:
    names: set[str] = set()
    seen: set[type] = set()
    todo: list[Any] = [AppConfig, protocol.FusionOptions, *OPTION_MODELS]
    while todo:
        node = todo.pop()
        if isinstance(node, tuple):
            todo.extend(node[1])
        elif isinstance(node, type) and node not in seen:
            seen.add(node)
            for field, info in node.model_fields.items():
                names.add(field)
                todo.extend(_nodes(FIELD_TYPES.get((node, field), info.annotation)))
    return names


def _keys(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield str(key)
            yield from _keys(value)


def bad_config_names(text: str, fields: set[str]) -> list[str]:
    """Dotted config names and ``key: value`` spans whose keys the config lacks."""
    problems = []
    for span in inline_code(text):
        if DOTTED.match(span):
            if not config_name_known(span):
                problems.append(span)
            continue
        m = KEY_VALUE.match(span)
        if m is None or m[1] in NOT_CONFIG:
            continue
        try:
            keys = list(_keys(yaml.safe_load(span)))
        except yaml.YAMLError:
            keys = [m[1]]  # a placeholder value (`leader_margin: m`): the key still counts
        problems += [f"{span} ({key})" for key in keys if key not in fields]
    return problems


def shipped() -> AppConfig:
    return load_config(ROOT / "config.yaml")


def bad_yaml_blocks(text: str, shipped_config: AppConfig) -> list[str]:
    """YAML blocks shaped like a config (top-level server, models, fusion) the typed config
    refuses, and variants named like the shipped ones that would serve other settings."""
    problems = []
    for lang, body in fenced(text):
        if lang != "yaml":
            continue
        data = yaml.safe_load(body)
        if not isinstance(data, dict) or not set(data) <= {"server", "models", "fusion"}:
            continue
        first = body.strip().splitlines()[0]
        try:
            if "models" in data and "fusion" in data:
                load_config(None, **data)
            if "server" in data:
                ServerConfig.model_validate(data["server"])
            if "models" in data:
                TypeAdapter(list[ModelConfig]).validate_python(data["models"])
            if "fusion" in data:
                FusionConfig.model_validate(data["fusion"])
        except Exception as exc:
            problems.append(f"block at {first!r}: {exc}")
            continue
        for name, variant in ((data.get("fusion") or {}).get("variants") or {}).items():
            problems += _variant_differs(name, variant, shipped_config)
    return problems


def _variant_differs(name: str, variant: dict[str, Any], config: AppConfig) -> list[str]:
    """A variant shown under a shipped name must serve what config.yaml serves under it
    (its selection merged over the shipped fused model's, as at start)."""
    if name not in config.fusion.variants:
        return []
    ours = config.fusion.variants[name]
    fusion = config.fusion.model_copy(
        update={"variants": {name: VariantConfig.model_validate(variant)}}
    )
    problems = []
    if variant.get("method", ours.method) != ours.method:
        problems.append(f"variant {name}: method {variant.get('method')} != {ours.method}")
    if fusion.variant_selection(name) != config.fusion.variant_selection(name):
        problems.append(f"variant {name}: its selection is not config.yaml's")
    return problems


@pytest.mark.parametrize("path", DOC_FILES, ids=where)
def test_config_names_and_yaml_in_the_docs_are_the_configs(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert bad_config_names(text, all_field_names()) == []
    assert bad_yaml_blocks(text, shipped()) == []


# --- (d) metric names are the ones /metrics renders ---------------------------------------

METRIC = re.compile(r"(?<![\w./-])(fusion_[a-z_]+)")


def rendered_metrics() -> set[str]:
    """The names a scrape shows: each family as rendered (counters with ``_total``) and a
    histogram's ``_bucket`` / ``_sum`` / ``_count`` series."""
    names = set()
    for line in Metrics().render().decode().splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if m:
            names.add(m[1])
            if m[2] == "histogram":
                names |= {m[1] + s for s in ("_bucket", "_sum", "_count")}
    return names


def unknown_metrics(text: str, known: set[str]) -> list[str]:
    return sorted(set(METRIC.findall(text)) - known)


@pytest.mark.parametrize("path", DOC_FILES, ids=where)
def test_every_metric_the_docs_name_is_rendered(path: Path) -> None:
    assert unknown_metrics(path.read_text(encoding="utf-8"), rendered_metrics()) == []


# --- (e) the README is short --------------------------------------------------------------


def test_the_readme_has_at_most_200_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


# --- (f) every result number in the README comes from docs/ -------------------------------

NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
UNIT = r"(?:%|x\b|\s?(?:ms|s|min|tok/s|tokens/s|GB|GiB|MiB|KB|points)\b)"
# an interval, a percentage or ratio, a p-value, a measurement with its unit; not a version
# (3.11), a model size (0.5B), a port or a count
RESULT = re.compile(
    rf"(?<![\w.,/-])(?:{NUM}\s?[-–]\s?{NUM}{UNIT}?|{NUM}{UNIT}|(?<=p = ){NUM}|(?<=p < ){NUM})"
    rf"(?![\w.]\d)"
)


def result_numbers(markdown: str) -> set[str]:
    """The result numbers in a README's prose: code, link targets and URLs left out."""
    text = INLINE.sub(" ", prose(markdown))
    text = re.sub(r"\]\([^)]*\)|<[a-z]+://[^>]*>|https?://\S+", " ", text)
    return {" ".join(m[0].split()) for m in RESULT.finditer(text)}


def _number_in(token: str, text: str) -> bool:
    return re.search(rf"(?<![\d.,]){re.escape(token)}(?![\d])", text) is not None


def unsourced_numbers(readme: str, doc_texts: list[str]) -> list[str]:
    corpus = "\n".join(" ".join(t.split()) for t in doc_texts)
    return sorted(n for n in result_numbers(readme) if not _number_in(n, corpus))


def test_every_result_number_in_the_readme_appears_in_docs() -> None:
    doc_texts = [text for path, text in docs() if path != README]
    assert unsourced_numbers(README.read_text(encoding="utf-8"), doc_texts) == []


# --- each check can fail ------------------------------------------------------------------


def test_the_checks_catch_what_they_are_for() -> None:
    """One broken line per check, so a check that matches nothing cannot pass silently."""
    assert missing_paths("see `tests/server/test_nothing.py`", ROOT) == [
        "tests/server/test_nothing.py"
    ]
    assert missing_paths("`tests/fusion/test_loop.py::test_no_such_thing`", ROOT)
    assert missing_paths("[x](docs/NOPE.md)", ROOT) == ["docs/NOPE.md"]
    assert missing_paths("[x](docs/API.md#no-such-heading)", ROOT)
    assert not missing_paths("[x](docs/API.md#chat-uis)", ROOT)
    assert unknown_tests("`test_no_such_thing_anywhere`", defined_tests())
    parsers = subparsers()
    assert bad_flags("`fusion-server calibrate --questions 20 --no-such-flag`", parsers)
    assert bad_flags("```\nfusion-server serve A \\\n  --rule nope\n```", parsers)
    assert not bad_flags("`fusion-server serve --rule gate --leader qwen`", parsers)
    assert not bad_flags("`~/.cache/fusion-server/x --nope`, `fusion-server-cpu --nope`", parsers)
    fields = all_field_names()
    assert bad_config_names("`fusion.selection.min_supprot`", fields)
    assert bad_config_names("`options.gpus`", fields)
    assert not bad_config_names("`fusion.variants.fusion-cool.selection.rule`", fields)
    assert bad_config_names("`min_suport: 2`", fields)
    # the paper's rule without min_support: 1 inherits the default's consensus filter
    variant = "fusion-cool: {method: cool, selection: {rule: mean_ppl}}"
    assert bad_yaml_blocks(f"```yaml\nfusion:\n  variants:\n    {variant}\n```", shipped())
    # engine auto has a block per engine: gpu belongs in options.vllm
    model = "{name: a, source: x, options: {gpu: '1'}}"
    assert bad_yaml_blocks(f"```yaml\nmodels:\n  - {model}\n```", shipped())
    assert unknown_metrics("`fusion_tokens{model,method}`", rendered_metrics()) == ["fusion_tokens"]
    assert unsourced_numbers("fused: 99.9% (p = 0.123), 7.7x, 11-12 s", ["nothing"]) == [
        "0.123",
        "11-12 s",
        "7.7x",
        "99.9%",
    ]
    assert not unsourced_numbers("Python 3.11, Qwen2.5-0.5B, port 8000", ["nothing"])
