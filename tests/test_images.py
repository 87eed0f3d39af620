"""The Docker images and the compose file, checked without Docker (the development machines
have no Docker engine): what each Dockerfile copies exists and reaches the build (not
excluded by .dockerignore), the files its commands name are copied, and its default
command, run outside Docker from a folder holding exactly the files the image holds in its
WORKDIR, does what the image would."""

from __future__ import annotations

import itertools
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from bench.server_process import free_port
from server import cli
from server.config import load_config
from server.state import ServerState

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


# --- reading a Dockerfile and .dockerignore ------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """One COPY/ADD from the build context (COPY --from=<stage> is not listed)."""

    sources: tuple[str, ...]
    dest: str  # absolute in the image
    directory: bool  # dest names a folder the sources go into


@dataclass
class Stage:
    workdir: str = "/"
    copies: list[Copy] = field(default_factory=list)
    runs: list[tuple[str, frozenset[str]]] = field(default_factory=list)  # (command, files then)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # ENV (this stage's own)
    healthcheck: dict[str, str] = field(default_factory=dict)  # HEALTHCHECK's --options

    def files(self, root: Path = ROOT) -> dict[str, Path]:
        """Image path -> repo file for everything this stage copies from the context."""
        out: dict[str, Path] = {}
        for c in self.copies:
            for src in c.sources:
                path = root / src
                base = posixpath.join(c.dest, path.name) if c.directory else c.dest
                if path.is_dir():
                    for f in context_files(path, root):
                        out[posixpath.join(base, f.relative_to(path).as_posix())] = f
                else:
                    out[base] = path
        return out


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments, also between continuation lines
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for word, args in instructions(path):
        if word == "FROM":
            stages.append(Stage())
            continue
        if not stages:  # ARG before the first FROM
            continue
        stage = stages[-1]
        if word == "WORKDIR":
            stage.workdir = posixpath.normpath(posixpath.join(stage.workdir, args))
        elif word in ("COPY", "ADD"):
            tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
            flags = [t for t in tokens if t.startswith("--")]
            paths = [t for t in tokens if not t.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                continue
            *sources, dest = paths
            directory = dest.endswith("/") or len(sources) > 1
            dest = posixpath.normpath(posixpath.join(stage.workdir, dest))
            stage.copies.append(Copy(tuple(sources), dest, directory))
        elif word == "RUN":
            stage.runs.append((args, frozenset(stage.files())))
        elif word in ("CMD", "ENTRYPOINT"):
            assert args.startswith("["), f"{path.name}: {word} in shell form gets no SIGTERM"
            setattr(stage, word.lower(), json.loads(args))
        elif word == "ENV":
            pairs = shlex.split(args)
            if "=" not in pairs[0]:  # the old form, ENV KEY VALUE
                pairs = ["=".join(args.split(None, 1))]
            stage.env |= dict(pair.split("=", 1) for pair in pairs)
        elif word == "HEALTHCHECK":
            options = itertools.takewhile(lambda t: t.startswith("--"), args.split())
            stage.healthcheck = dict(o[2:].split("=", 1) for o in options)
    return stages


def _ignore_rules(root: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        parts = re.split(r"(\*\*/?|\*|\?)", pattern)
        wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        rules.append((negate, re.compile("".join(wild.get(p, re.escape(p)) for p in parts))))
    return rules


def ignored(rel: str, root: Path = ROOT) -> bool:
    """Whether .dockerignore keeps ``rel`` out of the build context (it, or a folder above
    it, matches; the last matching rule wins, ``!`` lets a path back in)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, rx in _ignore_rules(root):
        if any(rx.fullmatch(c) for c in candidates):
            result = not negate
    return result


def context_files(folder: Path, root: Path = ROOT) -> list[Path]:
    """The files under ``folder`` that reach the build context."""
    found = (Path(d) / n for d, _, names in os.walk(folder) for n in names)
    return sorted(f for f in found if not ignored(f.relative_to(root).as_posix(), root))


def materialize(stage: Stage, into: Path) -> None:
    """Lay out what ``stage`` copies under its WORKDIR as ``into`` (files elsewhere are
    left out: the default command runs in WORKDIR)."""
    for image_path, src in stage.files().items():
        rel = posixpath.relpath(image_path, stage.workdir)
        if rel.startswith(".."):
            continue
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, into / rel)


def final(name: str) -> Stage:
    return parse_dockerfile(ROOT / name)[-1]


def referenced_files(command: list[str]) -> list[str]:
    """The relative paths a command names: --config / -r values and config-like arguments."""
    out = []
    for i, arg in enumerate(command):
        value = command[i + 1] if arg in ("--config", "-r") and i + 1 < len(command) else arg
        if value.endswith((".yaml", ".yml", ".txt", ".json", ".gguf")) and not value.startswith(
            "/"
        ):
            out.append(value)
    return sorted(set(out))


# --- what the images copy ------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist_and_reach_the_build(name: str) -> None:
    for stage in parse_dockerfile(ROOT / name):
        for c in stage.copies:
            for src in c.sources:
                path = ROOT / src
                assert path.exists(), f"{name}: COPY {src}: no such file in the repo"
                assert not ignored(src), f"{name}: COPY {src}: excluded by .dockerignore"
                if path.is_dir():
                    tracked = _tracked(src)
                    left_out = [f for f in tracked if ignored(f)]
                    assert not left_out, f"{name}: COPY {src}: .dockerignore drops {left_out}"


def _installs_package(run: tuple[str, frozenset[str]]) -> bool:
    """``pip install .`` or ``pip install ".[extra]"`` somewhere in a RUN."""
    tokens = shlex.split(run[0])
    return "install" in tokens and any(t == "." or t.startswith(".[") for t in tokens)


def _tracked(folder: str) -> list[str]:
    """The repo's files under ``folder`` (git's list; the folder's own files without git)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", folder], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        return [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        return [f.relative_to(ROOT).as_posix() for f in (ROOT / folder).rglob("*") if f.is_file()]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_a_stage_that_installs_the_package_copies_what_its_build_reads(name: str) -> None:
    """pyproject.toml's readme and every package it finds (a missing one would install a
    package without, say, tokenizers_align, and fail only at import)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    found = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    packages = [p for p in found if any(re.fullmatch(i.replace("*", ".*"), p) for i in include)]
    assert {"fusion", "server", "tokenizers_align"} <= set(packages)
    installs = [s for s in parse_dockerfile(ROOT / name) if any(map(_installs_package, s.runs))]
    assert installs, f"{name} installs the package nowhere"
    for stage in installs:
        copied = {posixpath.relpath(p, stage.workdir) for p in stage.files()}
        for needed in ["pyproject.toml", project["project"]["readme"]]:
            assert needed in copied, f"{name}: the stage that installs the package lacks {needed}"
        for package in packages:
            assert f"{package}/__init__.py" in copied, f"{name}: package {package} not copied"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_files_the_commands_name_are_copied(name: str) -> None:
    stages = parse_dockerfile(ROOT / name)
    for stage in stages:
        for run, present in stage.runs:
            for rel in referenced_files(shlex.split(run)):
                image_path = posixpath.join(stage.workdir, rel)
                assert image_path in present, f"{name}: RUN {run!r} needs {rel}, not copied before"
    image = stages[-1]
    assert image.entrypoint == ["fusion-server"], f"{name}: ENTRYPOINT {image.entrypoint}"
    assert image.cmd[:1] == ["serve"], image.cmd
    files = image.files()
    configs = referenced_files(image.cmd)
    assert configs, f"{name}: the default command names no config"
    for rel in configs:
        assert posixpath.join(image.workdir, rel) in files, f"{name}: CMD needs {rel}, not copied"
        load_config(ROOT / rel)  # a config the image would refuse at start fails here


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_listens_outside_whatever_arguments_it_gets(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the GPU image listened on 127.0.0.1 as soon as a user passed arguments of
    their own (they replace CMD, and CMD's --host 0.0.0.0 went with them). The image's
    FUSION_ environment, its WORKDIR's files: its CMD, a config of the user's and models
    on the command line all bind 0.0.0.0; a --host flag still wins."""
    image = final(name)
    materialize(image, tmp_path)
    (tmp_path / "mine.yaml").write_text("models: [{name: a, source: pip:smollm2-135m-instruct}]")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in [k for k in os.environ if k.startswith("FUSION_")]:
        monkeypatch.delenv(key)
    for key, value in image.env.items():
        if key.startswith("FUSION_"):  # not PATH=/opt/venv/bin:$PATH
            monkeypatch.setenv(key, value)
    for args, host in [
        (image.cmd, "0.0.0.0"),
        (["serve", "--config", "mine.yaml"], "0.0.0.0"),
        (["serve", "Qwen/Qwen2.5-7B-Instruct", "--port", "9000"], "0.0.0.0"),
        (["serve", "--config", "mine.yaml", "--host", "127.0.0.1"], "127.0.0.1"),
    ]:
        config = cli._load(cli._parser().parse_args(args))
        assert config.server.host == host, f"{name}: fusion-server {shlex.join(args)}"


def test_health_probes_wait_longer_than_health_does() -> None:
    """/health may wait ``health_timeout_seconds`` for a hung engine's check, then answers
    with the engine down: a probe that gives up first fails the server in exactly the case
    /health was built to survive. Twice that, for the answer itself and a busy event loop."""
    limit = ServerState.health_timeout_seconds
    probes = {name: final(name).healthcheck["timeout"] for name in DOCKERFILES}
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    probes["compose.yaml fusion"] = services["fusion"]["healthcheck"]["timeout"]
    for where, timeout in probes.items():
        assert re.fullmatch(r"\d+s", timeout), f"{where}: timeout {timeout}"
        assert float(timeout[:-1]) >= 2 * limit, f"{where}: {timeout}; /health waits {limit} s"


def test_dockerignore_keeps_local_state_out() -> None:
    for rel in (
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-eval/bin/python",
        "eval/results/x.json",
        "fusion/__pycache__/loop.cpython-311.pyc",
        "server/routers/__pycache__/ops.cpython-311.pyc",
        ".pytest_cache/v",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        "bench/results/a",
        ".env",
        "deploy/.env",
        "model.gguf",
        "models/smollm2.Q4_K_M.gguf",
    ):
        assert ignored(rel), f"{rel} would be sent to the Docker build"


# --- the default commands, run outside Docker -----------------------------------------------


def _run_as_image(name: str, tmp_path: Path) -> tuple[Stage, Path, list[str]]:
    """The image's WORKDIR laid out in tmp_path; its default command with this venv's
    executable and a free port."""
    image = final(name)
    workdir = tmp_path / "app"
    workdir.mkdir()
    materialize(image, workdir)
    command = [*image.entrypoint, *image.cmd]
    command[0] = _venv_executable(command[0])
    if "--port" in command:
        command[command.index("--port") + 1] = str(free_port())
    else:
        command += ["--port", str(free_port())]
    return image, workdir, command


def _venv_executable(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.is_file() else shutil.which(name)
    assert found, f"{name} is not installed in this environment"
    return found


@pytest.mark.integration
def test_cpu_image_serves_the_embedded_default(tmp_path: Path) -> None:
    """Dockerfile.cpu's build-time commands and CMD, from its WORKDIR's files: /health
    turns 200, a streamed chat completion arrives, SIGTERM ends the server."""
    image, workdir, command = _run_as_image("Dockerfile.cpu", tmp_path)
    for run, _ in image.runs:
        argv = shlex.split(run)
        if argv[0] == "fusion-server":  # e.g. prepare: the models assembled at build time
            argv[0] = _venv_executable(argv[0])
            subprocess.run(argv, cwd=workdir, check=True, timeout=600)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
        _wait_healthy(proc, url, log)
        text, events = _stream_chat(url)
        assert text.strip() and events[-1] == "[DONE]", (text, events[-3:])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"no exit 60 s after SIGTERM:\n{log.read_text()}") from None
    # uvicorn shuts down gracefully, then re-raises the signal (docker stop sees 143)
    shutdown = log.read_text()
    assert code in (0, -signal.SIGTERM), f"exit {code} after SIGTERM:\n{shutdown[-3000:]}"
    assert "Application shutdown complete" in shutdown, shutdown[-3000:]


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"/health not 200 after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stream_chat(url: str) -> tuple[str, list[str]]:
    """The text of one streamed chat completion and its SSE data fields."""
    body = {
        "model": "fusion",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 16,
    }
    text, events = "", []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
                if events[-1] != "[DONE]":
                    for choice in json.loads(events[-1])["choices"]:
                        text += choice["delta"].get("content") or ""
    return text, events


def test_gpu_image_without_the_hub_names_the_missing_model(tmp_path: Path) -> None:
    """Dockerfile's CMD, offline with an empty Hub cache: it stops at once, naming its
    first model's Hub repo as not in the cache (rather than loading, or a traceback)."""
    _, workdir, command = _run_as_image("Dockerfile", tmp_path)
    repo = _first_hub_repo(command, workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=180
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert repo in output and re.search(r"not in the (local )?(Hub )?cache", output), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert time.monotonic() - started < 120


def _first_hub_repo(command: list[str], workdir: Path) -> str:
    """The Hub repo of the first model the command serves: its first SOURCE argument, else
    the first model of its --config."""
    args = command[command.index("serve") + 1 :]
    sources = list(itertools.takewhile(lambda a: not a.startswith("-"), args))
    if not sources:
        config = yaml.safe_load((workdir / args[args.index("--config") + 1]).read_text())
        sources = [config["models"][0]["source"]]
    source = sources[0].split("=", 1)[-1] if "=" in sources[0].split("/")[0] else sources[0]
    repo = re.split(r"[@:]", source.removeprefix("hf:"))[0]
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", repo), f"the first model {sources[0]!r} is no Hub repo"
    return repo


# --- deploy/compose.yaml -------------------------------------------------------------------


def test_compose_file_parses_and_names_files_that_exist() -> None:
    compose_dir = ROOT / "deploy"
    services = yaml.safe_load((compose_dir / "compose.yaml").read_text())["services"]
    members = [n for n, s in services.items() if str(s.get("image", "")).startswith("vllm/")]
    assert members and "fusion" in services
    for name in members:
        assert services[name]["ipc"] == "host", f"{name}: vLLM needs ipc: host (shared memory)"
        assert services[name]["healthcheck"]["test"], name
    fusion = services["fusion"]
    assert fusion["depends_on"] == {m: {"condition": "service_healthy"} for m in members}
    build = fusion["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).is_file()
    mounts = {}
    for volume in fusion["volumes"]:
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            assert (compose_dir / host).exists(), f"fusion mounts {host}, which does not exist"
            mounts[container] = compose_dir / host
    config_path = fusion["command"][fusion["command"].index("--config") + 1]
    assert config_path in mounts, f"fusion serves {config_path}, which no volume provides"
    config = load_config(mounts[config_path])
    for model in config.models:
        host = httpx.URL(model.options.url).host
        assert host in members, f"model {model.name} points at {host}, not a compose service"
