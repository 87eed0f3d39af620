"""Engine kinds from config: typed options per kind, and what ``auto`` picks and why."""

from __future__ import annotations

import pytest

from server.config import ConfigError, LlamaCppOptions, load_config
from server.engine_registry import ENGINES, choose, gpu_present


def one_model(**model: object):
    return load_config(None, models=[{"name": "m", **model}]).models[0]


def test_every_kind_in_config_has_a_factory():
    for kind in ("transformers", "vllm", "llamacpp"):
        assert kind in ENGINES
        assert choose(one_model(source="pip:x", engine=kind)).kind == kind


def test_an_option_of_another_engine_is_refused_with_the_field_and_engine():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            models=[
                {"name": "m", "source": "x", "engine": "llamacpp", "options": {"dtype": "float32"}}
            ],
        )
    assert "models.0.options.dtype" in str(err.value)
    assert "(engine llamacpp)" in str(err.value)


def test_an_unknown_engine_names_the_engine_field():
    with pytest.raises(ConfigError) as err:
        load_config(None, models=[{"name": "m", "source": "x", "engine": "tpu"}])
    assert "models.0.engine: engine must be one of: auto, llamacpp" in str(err.value)


def test_engine_defaults_to_auto():
    assert one_model(source="pip:x").engine == "auto"


def test_auto_without_a_gpu_puts_gguf_sources_on_llamacpp(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever the host has
    assert not gpu_present()
    picked = choose(one_model(source="pip:smollm2-135m-instruct", options={"threads": 2}))
    assert picked.kind == "llamacpp"
    assert "no GPU" in picked.reason and "GGUF" in picked.reason
    assert isinstance(picked.options, LlamaCppOptions)
    assert picked.options.threads == 2  # auto's shared threads reach the picked engine


def test_auto_without_a_gpu_puts_hf_folders_on_transformers(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    picked = choose(one_model(source=f"hf:{tmp_path}"))
    assert picked.kind == "transformers"
    assert "no GGUF" in picked.reason
