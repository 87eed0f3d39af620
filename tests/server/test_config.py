"""Configuration: YAML, env and CLI precedence; errors that name the field."""

from __future__ import annotations

import pytest

from server.cli import main
from server.config import ConfigError, load_config


def test_default_config_file_loads_the_three_pip_models():
    config = load_config("config.yaml")
    assert [m.name for m in config.models] == ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
    assert all(m.source.startswith("pip:") for m in config.models)
    assert config.fusion.name == "fusion" and config.fusion.method == "cool"


def test_env_overrides_yaml_and_flags_override_env(monkeypatch):
    monkeypatch.setenv("FUSION_SERVER__PORT", "9100")
    assert load_config("config.yaml").server.port == 9100
    config = load_config("config.yaml", server={"port": 9200})
    assert config.server.port == 9200
    assert config.server.host == "127.0.0.1"  # the rest of the section is kept


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("models: []", "models"),
        ("models: [{name: a}]", "models.0.source"),
        ("models: [{name: a, source: x, engine: tpu}]", "models.0.engine"),
        ("models: [{name: a, source: x}]\nfusion: {method: majority}", "fusion.method"),
        ("models: [{name: a, source: x}]\nserver: {port: -1}", "server.port"),
        ("models: [{name: a, source: x}, {name: a, source: y}]", "models"),
        ("models: [{name: a, source: x, options: {threads: 0}}]", "models.0.options.threads"),
        ("models: [{name: a, source: x}]\nserver: {prot: 1}", "server.prot"),
        ("models: [{name: a, source: x}]\nfusion: {models: [a, a]}", "fusion.models"),
        (
            "models: [{name: a, source: x}]\nfusion: {variants: {v: {models: [a, a]}}}",
            "fusion.variants.v.models",
        ),
    ],
)
def test_invalid_config_names_the_field(tmp_path, yaml_text, field):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"  {field}:" in str(err.value)


def test_cli_reports_a_bad_config_and_exits_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("models: [{name: a}]")
    assert main(["serve", "--config", str(path)]) == 2
    assert "models.0.source" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "none.yaml")]) == 2


def test_the_selection_settings_are_declared_once():
    """The config's SelectionConfig is the declaration; the request's options are made
    from it, and the core's SelectionPolicy has the same fields and defaults."""
    import dataclasses

    from fusion.types import DEFAULT_POLICY, SelectionPolicy
    from server.config import SelectionConfig
    from server.protocol import SelectionOptions

    core = [f.name for f in dataclasses.fields(SelectionPolicy)]
    assert list(SelectionConfig.model_fields) == core == list(SelectionOptions.model_fields)
    assert SelectionConfig().policy() == DEFAULT_POLICY
    assert all(f.default is None for f in SelectionOptions.model_fields.values())
    custom = SelectionConfig(rule="gate", leader="a", weights={"a": 2}, min_support=2)
    assert custom.policy() == SelectionPolicy(
        rule="gate", leader="a", weights=(("a", 2.0),), min_support=2
    )
