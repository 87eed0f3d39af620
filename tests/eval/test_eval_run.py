"""eval/run.py: a task whose data file is missing is left out, saying why, before any
server starts."""

from __future__ import annotations

import shutil
import sys

from tests.eval.test_eval_report import load

run = load("eval/run.py")


def test_a_task_without_its_data_is_left_out_and_says_which_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    started = []
    monkeypatch.setattr(run, "start_server", lambda config: started.append(config))
    lm_eval = shutil.which("true")
    assert lm_eval is not None
    argv = ["run.py", "--tasks", "qa_wikidata_pkg_dev,gsm8k_pkg_chat_dev", "--systems", "fusion"]
    monkeypatch.setattr(sys, "argv", [*argv, "--lm-eval", lm_eval, "--out", str(tmp_path / "o")])

    assert run.main() == 1
    err = capsys.readouterr().err
    assert "left out qa_wikidata_pkg_dev: eval/data/qa_wikidata.jsonl is missing" in err
    assert "made by eval/wikidata_data.py" in err
    assert "left out gsm8k_pkg_chat_dev: eval/data/gsm8k_test.jsonl is missing" in err
    assert "nothing to run" in err
    assert started == []  # refused before a server was started


def test_a_task_with_its_data_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    (tmp_path / "eval" / "data").mkdir(parents=True)
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n")
    assert run.missing_data("gsm8k_pkg_chat_dev") is None
    assert run.missing_data("gsm8k_pkg_heldout") is None
    assert run.missing_data("qa_wikidata_pkg_heldout") == (
        "eval/data/qa_wikidata.jsonl is missing (made by eval/wikidata_data.py)"
    )
