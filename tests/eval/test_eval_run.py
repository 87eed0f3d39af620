"""eval/run.py: a task whose data file is missing is left out, saying why, before any
server starts."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tests.eval.test_eval_report import load

run = load("eval/run.py")


def _checkout(tmp_path: Path) -> None:
    """The real task files, without their data files."""
    shutil.copytree(Path(__file__).parents[2] / "eval" / "tasks", tmp_path / "eval" / "tasks")
    (tmp_path / "eval" / "data").mkdir(parents=True)


def test_a_task_without_its_data_is_left_out_and_says_which_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    main = _Run(tmp_path, monkeypatch)
    assert main("qa_wikidata_pkg_dev,gsm8k_pkg_chat_dev") == 1
    err = capsys.readouterr().err
    assert "left out qa_wikidata_pkg_dev: eval/data/qa_wikidata.jsonl is missing" in err
    assert "made by eval/wikidata_data.py" in err
    assert "left out gsm8k_pkg_chat_dev: eval/data/gsm8k_test.jsonl is missing" in err
    assert "nothing to run" in err
    assert main.started == []  # refused before a server was started


def test_a_task_with_its_data_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n")
    assert run.missing_data("gsm8k_pkg_chat_dev") is None
    assert run.missing_data("gsm8k_pkg_heldout") is None
    assert run.missing_data("qa_wikidata_pkg_heldout") == (
        "eval/data/qa_wikidata.jsonl is missing (made by eval/wikidata_data.py)"
    )
    assert run.missing_data("gsm8k") is None  # not ours: lm-eval's own task and data


def _task(tmp_path: Path, relative: str, text: str) -> None:
    path = tmp_path / "eval" / "tasks" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class _Run:
    """eval/run.py's main, with the server and lm-eval recorded, not started or run."""

    def __init__(self, tmp_path: Path, monkeypatch: Any) -> None:
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.started: list[Any] = []
        self.stopped: list[Any] = []
        self.ran: list[list[str]] = []
        server = ("proc", "http://127.0.0.1:1")
        monkeypatch.setattr(run, "start_server", lambda c: self.started.append(c) or server)
        monkeypatch.setattr(run, "stop_server", self.stopped.append)
        monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: self.ran.append(cmd))

    def __call__(self, tasks: str, *more: str, out: str = "o") -> int:
        lm_eval = shutil.which("true")
        assert lm_eval is not None
        argv = ["run.py", "--tasks", tasks, "--systems", "fusion", "--lm-eval", lm_eval]
        out_dir = str(self.tmp_path / out)
        self.monkeypatch.setattr(sys, "argv", [*argv, "--out", out_dir, *more])
        return run.main()


def test_a_tag_is_left_out_when_any_task_it_holds_has_no_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n")
    assert run.missing_data("gsm8k_pkg_all") is None
    _task(
        tmp_path,
        "gsm8k_pkg/gsm8k_pkg_more.yaml",
        "include: gsm8k_pkg.yaml\ntask: gsm8k_pkg_more\n"
        "dataset_kwargs:\n  data_files:\n    test: eval/data/more.jsonl\n",
    )
    assert run.missing_data("gsm8k_pkg_all") == "eval/data/more.jsonl is missing"
    assert run.missing_data("gsm8k_pkg_dev") is None

    main = _Run(tmp_path, monkeypatch)
    assert main("gsm8k_pkg_all") == 1 and main.started == []  # refused before a server
    assert "left out gsm8k_pkg_all: eval/data/more.jsonl is missing" in capsys.readouterr().err


def test_a_wildcard_is_left_out_when_a_task_it_matches_has_no_data(tmp_path, monkeypatch):
    """lm-eval matches --tasks entries as shell patterns over task and tag names."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    main = _Run(tmp_path, monkeypatch)
    assert main("gsm8k_pkg*") == 1 and main.started == []
    gsm8k = "eval/data/gsm8k_test.jsonl is missing (made by eval/gsm8k_data.py)"
    assert run.missing_data("gsm8k_pkg*") == gsm8k
    assert run.missing_data("gsm8k_pkg_[cd]*_dev") == gsm8k
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n")
    assert run.missing_data("gsm8k_pkg*") is None
    assert run.missing_data("*_dev") == (
        "eval/data/qa_wikidata.jsonl is missing (made by eval/wikidata_data.py)"
    )


def test_a_task_in_a_nested_folder_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    _task(tmp_path, "gsm8k_pkg/extra/x.yaml", "include: ../gsm8k_pkg.yaml\ntask: nested_x\n")
    assert run.missing_data("nested_x") == (
        "eval/data/gsm8k_test.jsonl is missing (made by eval/gsm8k_data.py)"
    )


def test_every_local_data_file_a_task_names_is_checked(tmp_path, monkeypatch):
    """Every split and every path in ``data_files`` (datasets loads them all); a glob
    that matches, a URL and a file inside a Hub dataset are not reported missing."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    (tmp_path / "eval" / "data" / "a.jsonl").write_text("{}\n")
    head = "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    _task(
        tmp_path, "t/t.yaml", head + "    train: eval/data/b.jsonl\n    test: eval/data/a.jsonl\n"
    )
    assert run.missing_data("t") == "eval/data/b.jsonl is missing"
    _task(tmp_path, "t/t.yaml", head + "    test: [eval/data/a.jsonl, eval/data/c.jsonl]\n")
    assert run.missing_data("t") == "eval/data/c.jsonl is missing"
    _task(
        tmp_path, "t/t.yaml", "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: d.json\n"
    )
    assert run.missing_data("t") == "d.json is missing"
    _task(tmp_path, "t/t.yaml", head + "    test: eval/data/*.jsonl\n    train: https://x/y.json\n")
    assert run.missing_data("t") is None
    _task(
        tmp_path,
        "t/t.yaml",
        "task: t\ndataset_path: org/set\ndataset_kwargs:\n  data_files: d.json\n",
    )
    assert run.missing_data("t") is None  # a file inside a Hub dataset


def test_the_data_file_checked_is_the_one_the_tasks_yaml_names(tmp_path, monkeypatch):
    """One way to find a task's data (its YAML, as lm-eval reads it), for the check that
    it is there and for the size of its slice."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    template = tmp_path / "eval" / "tasks" / "gsm8k_pkg" / "_default_template_yaml"
    text = template.read_text()
    assert "test: eval/data/gsm8k_test.jsonl" in text
    template.write_text(text.replace("eval/data/gsm8k_test.jsonl", "eval/data/other.jsonl"))
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n")
    assert run.missing_data("gsm8k_pkg_dev") == "eval/data/other.jsonl is missing"
    assert run.slice_size("gsm8k_pkg_dev") is None
    (tmp_path / "eval" / "data" / "other.jsonl").write_text("{}\n" * 5)
    assert run.missing_data("gsm8k_pkg_dev") is None
    assert run.slice_size("gsm8k_pkg") == 2  # five rows, the last three are the shots


def test_a_task_file_that_does_not_read_is_passed_over(tmp_path, monkeypatch):
    """As lm-eval passes it over: the other tasks are still checked, and its own missing
    data does not leave out the tag it would have joined."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    gone = "tag: broken\ndataset_path: json\ndataset_kwargs:\n  data_files: gone.json\n"
    bad = {
        "bad_yaml": "task: [unclosed\n",
        "no_include": "include: gone.yaml\ntask: a\n",
        "odd_include": "include: 5\ntask: b\n",
        "empty_include": "include: ''\ntask: c\n",
        "cycle": "include: cycle.yaml\ntask: d\n",
    }
    for file, text in bad.items():
        _task(tmp_path, f"bad/{file}.yaml", text + (gone if "task: [" not in text else ""))
    _task(tmp_path, "bad/a_list.yaml", "- task: x\n")
    (tmp_path / "eval" / "tasks" / "bad" / "latin1.yaml").write_bytes(b"task: \xe9\n")
    assert run.missing_data("broken") is None
    assert run.missing_data("gsm8k_pkg_dev") == (
        "eval/data/gsm8k_test.jsonl is missing (made by eval/gsm8k_data.py)"
    )
    _task(tmp_path, "bad/odd_path.yaml", "task: e\ndataset_path: {x: 1}\n")
    assert run.missing_data("e") is None  # read, but not a local data set: nothing to check
    _task(tmp_path, "bad/ok.yaml", "task: f\n" + gone)
    assert run.missing_data("broken") == "gone.json is missing"  # so the first check can fail


def test_a_name_belongs_to_the_first_file_that_claims_it(tmp_path, monkeypatch):
    """As in lm-eval's index: a later task of a taken name is passed over, and a tag adds
    nothing to a task that took its name first."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n")
    local = "dataset_path: json\ndataset_kwargs:\n  data_files: eval/data/gone.jsonl\n"
    gone = "eval/data/gone.jsonl is missing"
    _task(tmp_path, "a/0.yaml", "task: gsm8k_pkg_dev\n" + local)
    assert run.missing_data("gsm8k_pkg_dev") == gone  # a/ sorts before gsm8k_pkg/
    (tmp_path / "eval" / "tasks" / "a" / "0.yaml").unlink()
    assert run.missing_data("gsm8k_pkg_dev") is None
    _task(tmp_path, "z/0.yaml", "task: ta\ntag: [grp, gsm8k_pkg_dev]\n" + local)
    _task(tmp_path, "z/1.yaml", "task: ta\n")
    assert run.missing_data("ta") == gone
    assert run.missing_data("grp") == gone
    assert run.missing_data("gsm8k_pkg_dev") is None  # the task's name: the tag adds nothing


def test_a_data_glob_that_matches_nothing_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    _task(
        tmp_path,
        "t/t.yaml",
        "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: d/*.json\n",
    )
    assert run.missing_data("t") == "d/*.json is missing"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.json").write_text("{}")
    assert run.missing_data("t") is None
    for path in ['"d\\0/*.json"', '"d\\0.json"']:  # no file system holds a NUL byte
        head = "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: "
        _task(tmp_path, "t/t.yaml", head + path + "\n")
        assert run.missing_data("t") == f"d\0{path[4:-1]} is missing"


def test_a_slice_that_cannot_be_counted_is_not_guessed(tmp_path, monkeypatch):
    """slice_size gives None (the chunk goes unchecked) rather than a wrong count or a
    crash: a split that also names a glob, a folder, a compressed file, a JSON file read
    under one key, code that fails."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    (tmp_path / "eval" / "data" / "a.jsonl").write_text("{}\n" * 10)
    (tmp_path / "eval" / "data" / "a.jsonl.gz").write_bytes(bytes(range(256)))
    (tmp_path / "eval" / "data" / "more").mkdir()
    head = "task: t\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
    _task(tmp_path, "t/t.yaml", head + "    test: eval/data/a.jsonl\n")
    assert run.slice_size("t") == 10
    _task(tmp_path, "t/t.yaml", head + "    test: [eval/data/a.jsonl, eval/data/more/*.jsonl]\n")
    assert run.slice_size("t") is None
    for path in ["eval/data/more", "eval/data/a.jsonl.gz"]:
        _task(tmp_path, "t/t.yaml", head + f"    test: {path}\n")
        assert run.slice_size("t") is None
    _task(tmp_path, "t/t.yaml", head + "    test: eval/data/a.jsonl\n  field: rows\n")
    assert run.slice_size("t") is None
    (tmp_path / "eval" / "tasks" / "t" / "code.py").write_text("def docs(d):\n    1 / 0\n")
    _task(
        tmp_path,
        "t/t.yaml",
        head + "    test: eval/data/a.jsonl\nprocess_docs: !function code.docs\n",
    )
    assert run.slice_size("t") is None


def test_make_eval_without_the_wikidata_data_still_runs_gsm8k(tmp_path, monkeypatch, capsys):
    """The registry lost bigbench==1.0.0: the qa_wikidata task is left out with its reason
    and the GSM8K tasks run (lm-eval's command is recorded, not run)."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _checkout(tmp_path)
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n")
    main = _Run(tmp_path, monkeypatch)

    assert main("qa_wikidata_pkg_dev,gsm8k_pkg_dev,gsm8k_pkg_chat_dev") == 0
    assert "left out qa_wikidata_pkg_dev" in capsys.readouterr().err
    run_tasks = [cmd[cmd.index("--tasks") + 1] for cmd in main.ran]
    assert run_tasks == ["gsm8k_pkg_dev", "gsm8k_pkg_chat_dev"]
    assert main.stopped == ["proc"]


def test_a_chunk_asks_lm_eval_for_its_questions_by_index():
    args = argparse.Namespace(concurrency=8, lm_eval="lm_eval", out=Path("o"), limit=3, start=50)
    cmd = run.lm_eval_command(args, "http://127.0.0.1:1", "gsm8k_pkg_chat_dev", "fusion")
    assert "--limit" not in cmd
    assert json.loads(cmd[cmd.index("--samples") + 1]) == {"gsm8k_pkg_chat_dev": [50, 51, 52]}
    args.start = 0
    cmd = run.lm_eval_command(args, "http://127.0.0.1:1", "gsm8k_pkg_dev", "fusion")
    assert cmd[cmd.index("--limit") + 1] == "3" and "--samples" not in cmd


def _gsm8k_checkout(tmp_path: Path, rows: int) -> None:
    """The real task files, and a GSM8K data file of ``rows`` questions."""
    _checkout(tmp_path)
    lines = [json.dumps({"question": f"q{i}", "answer": "#### 1"}) for i in range(rows)]
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("\n".join(lines) + "\n")


def test_each_tasks_slice_size_comes_from_its_own_process_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    assert run.slice_size("gsm8k_pkg_dev") == 597  # questions 3-599
    assert run.slice_size("gsm8k_pkg_chat_dev") == 597
    assert run.slice_size("gsm8k_pkg_heldout") == 716  # 600 to the last before the shots
    assert run.slice_size("gsm8k_pkg") == 1316
    assert run.slice_size("no_such_task") is None
    assert run.slice_size("qa_wikidata_pkg_dev") is None  # its data file is not there
    roles = ["shot"] * 3 + ["dev"] * 5 + ["heldout"] * 2
    rows = [json.dumps({"input": "x", "target": ["y"], "role": r}) for r in roles]
    (tmp_path / "eval" / "data" / "qa_wikidata.jsonl").write_text("\n".join(rows) + "\n")
    assert run.slice_size("qa_wikidata_pkg_dev") == 5  # utils.dev filters by role
    assert run.slice_size("qa_wikidata_pkg_heldout") == 2  # through its include
    (tmp_path / "eval" / "data" / "gsm8k_test.jsonl").write_text("{}\n" * 100)
    assert run.slice_size("gsm8k_pkg_dev") is None  # too short for its slice: unreadable


def test_a_chunk_past_the_end_of_the_slice_is_refused_before_a_server_starts(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    main = _Run(tmp_path, monkeypatch)

    assert main("gsm8k_pkg_dev", "--limit", "50", "--start", "550") == 1
    assert "runs past the end of gsm8k_pkg_dev (597 questions): give --limit 47" in (
        capsys.readouterr().err
    )
    assert main("gsm8k_pkg_dev", "--limit", "50", "--start", "597") == 1
    assert "--start 597 is past the end of gsm8k_pkg_dev: its questions are 0-596" in (
        capsys.readouterr().err
    )
    assert main.started == []


def test_the_last_chunk_that_fits_runs_and_a_first_chunk_is_not_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    main = _Run(tmp_path, monkeypatch)
    for i, chunk in enumerate((["--start", "547", "--limit", "50"], ["--limit", "5000"])):
        assert main("gsm8k_pkg_dev", *chunk, out=f"o{i}") == 0
    ran = main.ran
    samples = json.loads(ran[0][ran[0].index("--samples") + 1])["gsm8k_pkg_dev"]
    assert samples[0] == 547 and samples[-1] == 596  # the slice's last question
    assert ran[1][ran[1].index("--limit") + 1] == "5000"  # lm-eval stops at the end itself


def _samples(out: Path, system: str, *tasks: str) -> None:
    """lm-eval's samples files of ``tasks`` for ``system`` (their names as it writes them)."""
    (out / system).mkdir(parents=True, exist_ok=True)
    for task in tasks:
        (out / system / f"samples_{task}_2026-12-07T18-56-29.895213.jsonl").write_text("{}\n")


def test_a_task_is_done_by_its_own_samples_not_by_a_longer_name(tmp_path, monkeypatch, capsys):
    """gsm8k_pkg_dev's samples file begins with gsm8k_pkg's name: it does not make
    gsm8k_pkg done, and a resumed sweep runs gsm8k_pkg."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    _samples(tmp_path / "o", "fusion", "gsm8k_pkg_dev")
    main = _Run(tmp_path, monkeypatch)
    assert main("gsm8k_pkg_dev,gsm8k_pkg") == 0
    assert [cmd[cmd.index("--tasks") + 1] for cmd in main.ran] == ["gsm8k_pkg"]
    assert "skip gsm8k_pkg_dev fusion: done" in capsys.readouterr().out


def _pair(tmp_path: Path) -> None:
    """A tag ``pair`` of two completion tasks (GSM8K's dev slice under two names)."""
    for name in ("pair_a", "pair_b"):
        _task(
            tmp_path,
            f"pair/{name}.yaml",
            f"include: ../gsm8k_pkg/gsm8k_pkg_dev.yaml\ntask: {name}\ntag: [pair]\n",
        )


def test_a_tag_is_done_when_each_of_its_tasks_is(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    _pair(tmp_path)
    assert run.members("pair") == ["pair_a", "pair_b"]
    _samples(tmp_path / "o", "fusion", "pair_a")
    main = _Run(tmp_path, monkeypatch)
    assert main("pair") == 0 and len(main.ran) == 1  # pair_b has no samples
    _samples(tmp_path / "o", "fusion", "pair_b")
    assert main("pair") == 0 and len(main.ran) == 1  # both done: not run again


def test_lm_evals_own_task_is_done_by_its_recorded_run(tmp_path, monkeypatch):
    """lm-eval's gsm8k is not made done by gsm8k_pkg's samples; one of lm-eval's own
    entries (its files are named after tasks not known here) is done once runs.jsonl
    has its run."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    _samples(tmp_path / "o", "fusion", "gsm8k_pkg", "mmlu_anatomy")
    main = _Run(tmp_path, monkeypatch)
    assert main("gsm8k,mmlu") == 0
    assert [cmd[cmd.index("--tasks") + 1] for cmd in main.ran] == ["gsm8k", "mmlu"]
    assert main("gsm8k,mmlu") == 0 and len(main.ran) == 2  # recorded: not run again
    assert run.done(tmp_path / "o", "mmlu", "fusion")
    assert not run.done(tmp_path / "o", "mmlu", "qwen2.5-0.5b")


def test_a_tag_of_chat_and_completion_tasks_is_refused(tmp_path, monkeypatch, capsys):
    """lm-eval asks one way per run: gsm8k_pkg_all's chat tasks would go through
    completions without their chat template."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    main = _Run(tmp_path, monkeypatch)
    assert main("gsm8k_pkg_all") == 1 and main.started == []
    assert "gsm8k_pkg_all holds chat and completion tasks" in capsys.readouterr().err


def test_a_chunk_of_a_tag_asks_for_each_of_its_tasks_questions(tmp_path, monkeypatch, capsys):
    """lm-eval reads --samples by task name: a tag's chunk names each of its tasks (a
    tag's name there would run every question of every task)."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    _pair(tmp_path)
    main = _Run(tmp_path, monkeypatch)
    assert main("pair", "--start", "50", "--limit", "3") == 0
    (cmd,) = main.ran
    asked = json.loads(cmd[cmd.index("--samples") + 1])
    assert asked == {"pair_a": [50, 51, 52], "pair_b": [50, 51, 52]}
    # each of its tasks' slice is checked: the dev slice ends at 597 questions
    assert main("pair", "--start", "596", "--limit", "3", out="o2") == 1
    assert "runs past the end of pair_a (597 questions)" in capsys.readouterr().err
    for entry in ("pair_*", "mmlu"):  # a wildcard; one of lm-eval's own
        assert main(entry, "--start", "50", "--limit", "3", out="o3") == 1
        assert f"--start with {entry}: lm-eval takes a chunk per task" in capsys.readouterr().err
    assert len(main.ran) == 1 and main.started == ["config.yaml"]  # the first run only


def test_a_samples_files_task_is_read_from_its_name():
    name = run.samples_task
    assert name(Path("samples_gsm8k_pkg_dev_2026-12-07T18-56-29.895213.jsonl")) == "gsm8k_pkg_dev"
    assert name(Path("samples_gsm8k_2026-12-07T18-56-29.jsonl")) == "gsm8k"
    for other in ("samples_x.jsonl", "results_2026-12-07T18-56-29.json", "samples__1.jsonl"):
        assert name(Path(other)) is None, other


def test_a_tag_of_chat_tasks_is_asked_through_chat(tmp_path, monkeypatch, capsys):
    """Chat or completions goes by the tag's tasks, not by the tag's own name; a wildcard
    over both kinds is refused as a mixed tag is."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    for name in ("talk_a", "talk_b"):
        _task(
            tmp_path,
            f"talk/{name}_chat.yaml",
            f"include: ../gsm8k_pkg/gsm8k_pkg_chat_dev.yaml\ntask: {name}_chat\ntag: [talk]\n",
        )
    main = _Run(tmp_path, monkeypatch)
    assert main("talk") == 0
    (cmd,) = main.ran
    assert cmd[cmd.index("--model") + 1] == "local-chat-completions"
    assert (
        "--apply_chat_template" in cmd
        and "/v1/chat/completions" in cmd[cmd.index("--model_args") + 1]
    )
    assert main("gsm8k_pkg*", out="o2") == 1
    assert "gsm8k_pkg* holds chat and completion tasks" in capsys.readouterr().err


def test_a_recorded_run_without_its_samples_is_not_done_for_our_task(tmp_path, monkeypatch):
    """Our tasks are done by their samples (what the report reads); a wildcard, which may
    match lm-eval's tasks too, by its recorded run."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    _gsm8k_checkout(tmp_path, 1319)
    out = tmp_path / "o"
    out.mkdir()
    rows = [{"task": t, "system": "fusion", "seconds": 1.0} for t in ("gsm8k_pkg_dev", "gsm8k*")]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"task": "cut')
    assert not run.done(out, "gsm8k_pkg_dev", "fusion")
    assert run.done(out, "gsm8k*", "fusion") and not run.done(out, "gsm8k_pkg_d*", "fusion")
    _samples(out, "fusion", "gsm8k_pkg_dev")
    assert run.done(out, "gsm8k_pkg_dev", "fusion")
    assert not run.done(out, "gsm8k_pkg_d*", "fusion")  # its run is not recorded
