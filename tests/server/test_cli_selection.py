"""The CLI's selection options: calibrate's and generate's arguments are checked before
any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--questions", "0"], "--questions must be 1-597"),
        (["--questions", "598"], "--questions must be 1-597"),  # never beyond index 599
        (["--gate-thresholds", "0,0.5"], "--gate-thresholds"),
        (["--gate-thresholds", "1.5"], "--gate-thresholds"),
        (["--task", "qa", "--data", "/nonexistent/qa.jsonl"], "--data /nonexistent/qa.jsonl"),
        (["--task", "qa", "--questions", "0"], "--questions must be at least 1"),
        (["--max-time-ratio", "0.5"], "--max-time-ratio must be at least 1"),
        (["--max-time-ratio", "nan"], "--max-time-ratio must be at least 1"),
    ],
)
def test_calibrate_refuses_bad_arguments(args, message, capsys):
    assert main(["calibrate", "--config", "config.yaml", *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_a_rule_without_its_leader(capsys, tmp_path):
    # config.yaml's default policy names a leader; without that block there is none
    config = yaml.safe_load(Path("config.yaml").read_text())
    del config["fusion"]["selection"]
    leaderless = tmp_path / "config.yaml"
    leaderless.write_text(yaml.safe_dump(config))
    assert main(["generate", "hi", "--config", str(leaderless), "--rule", "gate"]) == 2
    assert "selection.leader" in capsys.readouterr().err
    assert main(["generate", "hi", "--config", "config.yaml", "--leader", "nobody"]) == 2
    assert "unknown source models: nobody" in capsys.readouterr().err


def test_generate_refuses_to_rerank_one_model(capsys):
    for method in ("rerank", "cool_rerank"):
        args = ["generate", "hi", "--config", "config.yaml", "--method", method]
        assert main([*args, "--models", "qwen2.5-0.5b"]) == 2  # before any model loads
        assert f"method {method} reranks the answers of two or more" in capsys.readouterr().err
