"""``fusion-server serve [NAME=]SOURCE ... --flags``: models and settings on the command line,
the flags generated from the typed config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.cli import _load, _parser
from server.config import (
    ConfigError,
    FusionConfig,
    LlamaCppOptions,
    SelectionConfig,
    ServerConfig,
    TransformersOptions,
    VllmOptions,
    _ModelBase,
    load_config,
)


def load(*argv: str):
    return _load(_parser().parse_args(["serve", *argv]))


def flags_of(command: str) -> set[str]:
    parser = _parser()
    sub = next(a for a in parser._subparsers._group_actions if a.choices)  # type: ignore[union-attr]
    return {s for a in sub.choices[command]._actions for s in a.option_strings}


def test_every_config_field_a_flag_could_set_has_one():
    flags = flags_of("serve")
    renamed = {"api_keys": "--api-key", "cors_origins": "--allowed-origins"}
    for model, left_to_the_file in (
        (ServerConfig, set()),
        (FusionConfig, {"models", "selection", "variants"}),
        (SelectionConfig, {"weights", "calibration"}),
        (_ModelBase, {"name", "source"}),
        (LlamaCppOptions, set()),
        (TransformersOptions, set()),
        (VllmOptions, set()),
    ):
        for name in set(model.model_fields) - left_to_the_file:
            flag = renamed.get(name, f"--{name.replace('_', '-')}")
            if (model, name) == (FusionConfig, "name"):
                flag = "--served-model-name"  # vLLM's spelling
            assert flag in flags, f"{model.__name__}.{name} has no flag {flag}"
    assert {"--engine", "--config", "--enforce-eager", "--no-enforce-eager"} <= flags
    assert flags_of("prepare") == flags  # prepare fetches exactly what serve would serve


def test_models_on_the_command_line_replace_the_config_and_default_to_the_papers_rule():
    config = load("Qwen/Qwen2.5-7B-Instruct", "small=./phi-3-mini.gguf", "pip:gemma3-270m")
    assert [(m.name, m.source) for m in config.models] == [
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("small", "./phi-3-mini.gguf"),
        ("gemma3-270m", "pip:gemma3-270m"),
    ]
    assert all(m.engine == "auto" for m in config.models)
    assert config.fusion.method == "cool"
    assert config.fusion.selection.rule == "mean_ppl" and config.fusion.selection.min_support == 1
    assert config.fusion.variants == {}


def test_without_models_serve_reads_config_yaml():
    config = load()
    shipped = yaml.safe_load(Path("config.yaml").read_text())
    assert [m.name for m in config.models] == [m["name"] for m in shipped["models"]]
    assert config.fusion.selection.rule == "gate"


def test_everyday_flags_reach_the_config():
    config = load(
        "org/a",
        "org/b",
        "--api-key",
        "K1",
        "--api-key",
        "K2",
        "--port",
        "9001",
        "--host",
        "0.0.0.0",
        "--served-model-name",
        "duo",
        "--method",
        "cool_rerank",
        "--rule",
        "leader",
        "--leader",
        "org/b",
        "--max-model-len",
        "4096",
        "--gpu-memory-utilization",
        "0.4",
        "--dtype",
        "bfloat16",
        "--threads",
        "2",
        "--trust-remote-code",
    )
    assert config.server.api_keys == ["K1", "K2"]
    assert (config.server.port, config.server.host) == (9001, "0.0.0.0")
    assert (config.fusion.name, config.fusion.method) == ("duo", "cool_rerank")
    assert (config.fusion.selection.rule, config.fusion.selection.leader) == ("leader", "org/b")
    for m in config.models:
        assert m.options.vllm.max_model_len == 4096
        assert m.options.vllm.gpu_memory_utilization == 0.4
        assert m.options.vllm.dtype == m.options.transformers.dtype == "bfloat16"
        assert m.options.threads == 2
        assert m.trust_remote_code is True


def test_flags_override_a_config_file_which_keeps_the_rest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"port": 8100, "max_queue": 3},
                "models": [{"name": "a", "source": "pip:gemma3-270m", "engine": "llamacpp"}],
                "fusion": {"name": "mine", "selection": {"rule": "gate", "leader": "a"}},
            }
        )
    )
    config = load(
        "--config", str(path), "--port", "8200", "--gate-threshold", "0.7", "--n-ctx", "4096"
    )
    assert (config.server.port, config.server.max_queue) == (8200, 3)
    assert config.fusion.name == "mine"
    assert config.fusion.selection.rule == "gate" and config.fusion.selection.gate_threshold == 0.7
    assert config.models[0].options.n_ctx == 4096  # an engine flag reaches the file's models


def test_environment_sits_between_the_file_and_the_flags(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"server": {"port": 8100}, "models": [{"name": "a", "source": "x"}]})
    )
    monkeypatch.setenv("FUSION_SERVER__PORT", "8300")
    assert load("--config", str(path)).server.port == 8300
    assert load("--config", str(path), "--port", "8400").server.port == 8400


def test_an_engine_flag_for_another_engine_is_refused_naming_both():
    with pytest.raises(
        ConfigError, match=r"--n-ctx does not apply to model 'org/a' \(engine vllm\)"
    ):
        load("org/a", "--engine", "vllm", "--n-ctx", "4096")


def test_two_models_with_one_default_name_must_be_named():
    with pytest.raises(ConfigError, match="two source models are named org/a: name them"):
        load("org/a", "hf:org/a@v2")
    config = load("a=org/a", "b=hf:org/a@v2")
    assert [m.name for m in config.models] == ["a", "b"]


def test_a_leader_that_is_not_a_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"selection\.leader: unknown source models: nope"):
        load("org/a", "org/b", "--rule", "gate", "--leader", "nope")


def test_a_bad_value_is_refused_by_the_parser_with_its_flag():
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "org/a", "--gate-threshold", "high"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--gate-threshold: invalid float value: 'high'" in done.stderr


def test_help_lists_the_models_and_vllm_spelled_flags():
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for text in ("[NAME=]SOURCE", "--served-model-name", "--max-model-len", "ORG/NAME-GGUF:Q4_K_M"):
        assert text in done.stdout


def test_serve_exits_non_zero_when_its_models_cannot_load(tmp_path):
    """As vLLM: a start that cannot load its models fails (an orchestrator sees it),
    rather than listening forever with /health 503."""
    from tests.fixtures.processes import free_port

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            str(tmp_path / "missing.gguf"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "loading the source models failed" in done.stderr
    assert "missing.gguf does not exist" in done.stderr


def test_options_go_between_models_and_vllm_and_llamacpp_spellings_add_models():
    args = _parser().parse_args(
        [
            "serve",
            "pip:gemma3-270m",
            "--api-key",
            "K",
            "org/b",
            "--stop",
            "###",
            "org/c",
            "-hf",
            "org/d-GGUF:Q4_K_M",
            "--model",
            "org/e",
            "--log-level",
            "DEBUG",
        ]
    )
    config = _load(args)
    assert [m.name for m in config.models] == [
        "gemma3-270m",
        "org/b",
        "org/c",
        "org/d-GGUF",
        "org/e",
    ]
    assert config.models[1].source == "org/b" and config.models[3].source == "org/d-GGUF:Q4_K_M"
    assert config.models[0].stop == ["###"]  # one value: the models after it stay models
    assert config.server.api_keys == ["K"] and args.log_level == "DEBUG"


def test_engine_flag_over_an_auto_config_takes_that_engines_block():
    config = load("--config", "config.gpu.yaml", "--engine", "vllm")
    assert all(m.engine == "vllm" and m.options.max_model_len == 8192 for m in config.models)


def test_a_chat_template_file_is_read_as_vllm_reads_it(tmp_path):
    from server.engines import template_text

    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert template_text(str(path)) == "{{ messages[0]['content'] }}"
    assert template_text("{{ x }}") == "{{ x }}"
    assert template_text(None) is None


def test_dtype_is_checked_and_auto_by_default():
    assert load("org/a").models[0].options.transformers.dtype == "auto"
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'bf16'"
        load("org/a", "--dtype", "bf16")
    with pytest.raises(ConfigError, match="dtype"):  # and the same in a config file
        load_config(
            None, models=[{"name": "a", "source": "x", "options": {"vllm": {"dtype": "bf16"}}}]
        )
