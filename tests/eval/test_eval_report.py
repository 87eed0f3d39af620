"""eval/: the report's statistics and pairing, and the task scoring lm-eval calls back."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = load("eval/report.py")
wikidata = load("eval/tasks/qa_wikidata_pkg/utils.py")


def test_wilson_interval_is_sound_at_the_edges():
    lo, hi = report.wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.31
    lo, hi = report.wilson(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.75
    lo, hi = report.wilson(5, 10)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)


def test_mcnemar_is_the_exact_two_sided_binomial_test():
    assert report.mcnemar_exact(0, 0) == 1.0
    assert report.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert report.mcnemar_exact(3, 7) == report.mcnemar_exact(7, 3)
    assert report.mcnemar_exact(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    assert report.mcnemar_exact(5, 5) == 1.0


def write_samples(out: Path, system: str, task: str, correct: dict[int, bool]) -> None:
    rows = []
    for doc, ok in correct.items():
        for filt in ("strict-match", "flexible-extract"):
            rows.append(
                {
                    "doc_id": doc,
                    "arguments": {"gen_args_0": {"arg_0": f"Question {doc}", "arg_1": {}}},
                    "resps": [[f" answer {doc}"]],
                    "filter": filt,
                    # strict-match is the opposite, so reading the wrong filter shows
                    "exact_match": float(ok if filt == "flexible-extract" else not ok),
                }
            )
    path = out / system / f"samples_{task}_2026-11-22T03-00-00.000000.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_systems_are_paired_on_the_questions_all_answered_against_the_best_single(tmp_path):
    task = "gsm8k_pkg_dev"
    write_samples(tmp_path, "a", task, {0: True, 1: True, 2: False, 3: False, 4: True})
    write_samples(tmp_path, "b", task, {0: False, 1: False, 2: False, 3: True, 4: True})
    write_samples(tmp_path, "fusion", task, {0: True, 1: False, 2: True, 3: True})  # no 4
    (tmp_path / "runs.jsonl").write_text(
        json.dumps({"task": task, "system": "fusion", "seconds": 8.0}) + "\n"
    )
    samples = report.read_samples(tmp_path)
    text, rows = report.table(task, samples[task], ["a", "b"], report.read_runs(tmp_path), {})
    by = {r["system"]: r for r in rows}
    assert {r["n"] for r in rows} == {4}  # question 4 is dropped for everyone
    assert by["a"]["correct"] == 2 and by["b"]["correct"] == 1 and by["fusion"]["correct"] == 3
    assert "p" not in by["a"]  # a is the best single
    assert (by["fusion"]["b"], by["fusion"]["c"]) == (2, 1)  # right on 2, 3; wrong on 1
    assert (by["b"]["b"], by["b"]["c"]) == (1, 2)
    assert "| fusion | 3 | 75.0% |" in text and "| 2.0 |" in text  # 8 s / 4 questions


def test_every_system_is_also_paired_with_each_system_it_is_asked_against(tmp_path):
    task = "gsm8k_pkg_chat_dev"
    write_samples(tmp_path, "qwen", task, {0: True, 1: False, 2: False, 3: True})
    write_samples(tmp_path, "qwen-sc8", task, {0: True, 1: True, 2: False, 3: False})
    write_samples(tmp_path, "fusion-vote", task, {0: False, 1: True, 2: True, 3: True})
    samples = report.read_samples(tmp_path)
    text, rows = report.table(task, samples[task], ["qwen"], {}, {}, ["qwen-sc8", "absent"])
    by = {r["system"]: r for r in rows}
    assert (by["fusion-vote"]["b"], by["fusion-vote"]["c"]) == (2, 1)  # against qwen
    sc = by["fusion-vote"]["vs qwen-sc8"]  # right on 2, 3 where sc8 is not; wrong on 0
    assert (sc["b"], sc["c"]) == (2, 1) and sc["p"] == report.mcnemar_exact(2, 1)
    assert (by["qwen"]["vs qwen-sc8"]["b"], by["qwen"]["vs qwen-sc8"]["c"]) == (1, 1)
    assert "vs qwen-sc8" not in by["qwen-sc8"] and "absent" not in text
    header, rule = text.splitlines()[2:4]
    assert "vs qwen-sc8: b/c, p" in header and header.count("|") == rule.count("|")


def test_the_chunks_of_one_run_are_reported_together(tmp_path):
    """eval/run.py --start: each chunk in its own folder; the report pairs the systems on
    every chunk's questions and adds up each system's seconds."""
    task = "gsm8k_pkg_chat_dev"
    first, second = tmp_path / "q0", tmp_path / "q2"
    write_samples(first, "qwen", task, {0: True, 1: False})
    write_samples(first, "fusion", task, {0: False, 1: False})
    write_samples(second, "qwen", task, {2: True, 3: False})
    write_samples(second, "fusion", task, {2: True, 3: True})
    for out, seconds in ((first, 3.0), (second, 5.0)):
        (out / "runs.jsonl").write_text(
            json.dumps({"task": task, "system": "fusion", "seconds": 99.0})
            + "\n"
            + json.dumps({"task": task, "system": "fusion", "seconds": seconds})  # newest
            + "\n"
        )
    samples = report.read_samples(first, second)
    runs = report.read_runs(first, second)
    assert runs[(task, "fusion")] == 8.0
    text, rows = report.table(task, samples[task], ["qwen"], runs, {})
    by = {r["system"]: r for r in rows}
    assert {r["n"] for r in rows} == {4}
    assert by["qwen"]["correct"] == 2 and by["fusion"]["correct"] == 2
    assert (by["fusion"]["b"], by["fusion"]["c"]) == (1, 1)  # right on 3, wrong on 0
    assert "| fusion | 2 | 50.0% |" in text and "| 2.0 |" in text  # 8 s / 4 questions

    # a system that ran the first chunk only: its seconds are over its own questions
    write_samples(first, "late", task, {0: True, 1: True})
    (first / "runs.jsonl").write_text(
        "".join(
            json.dumps({"task": task, "system": s, "seconds": x}) + "\n"
            for s, x in (("fusion", 3.0), ("late", 6.0))
        )
    )
    samples = report.read_samples(first, second)
    text, rows = report.table(task, samples[task], ["qwen"], report.read_runs(first, second), {})
    assert {r["n"] for r in rows} == {2}  # paired on the first chunk only
    per_answer = {line.split(" | ")[0][2:]: line.split(" | ")[-2] for line in text.splitlines()[4:]}
    assert per_answer["late"] == "3.0"  # 6 s / its 2 questions
    assert per_answer["fusion"] == "2.0"  # 8 s / its 4 questions, not the 2 paired

    # left out, it no longer narrows the others' pairing to its chunk
    kept = report.keep(samples, [task], ["qwen", "fusion"])
    text, rows = report.table(task, kept[task], ["qwen"], report.read_runs(first, second), {})
    assert {r["system"] for r in rows} == {"qwen", "fusion"} and {r["n"] for r in rows} == {4}
    assert report.keep(samples, ["other_task"], None) == {}


@pytest.mark.parametrize(
    ("said", "targets", "right"),
    [
        (" Toulouse\n", ["Toulouse"], True),
        (" Toulouse. It is in France", ["Toulouse"], True),
        (" the United Kingdom", ["United Kingdom"], True),
        (" Kent, Surrey", ["Hampshire", "Surrey", "Kent"], True),
        (" Surrey", ["Hampshire", "Surrey", "Kent"], True),
        (" Toulouse-Blagnac", ["Toulouse"], False),
        (" France and Italy", ["France"], False),
        (" ", ["France"], False),
    ],
)
def test_wikidata_answers_match_any_target_after_normalising(said, targets, right):
    result = wikidata.process_results({"targets": targets}, [said])
    assert result == {"exact_match": float(right)}


def test_cross_model_perplexity_shows_only_once_every_answer_is_scored(tmp_path):
    task = "qa_wikidata_pkg_dev"
    write_samples(tmp_path, "a", task, {0: True, 1: False, 2: True})
    write_samples(tmp_path, "fusion", task, {0: True, 1: True, 2: True})
    cache = tmp_path / "ppl.jsonl"
    scores = {  # NLLs per model; the cross-model perplexity is exp of their mean
        ("a", 0): {"x": 1.0, "y": 3.0},  # e^2
        ("a", 1): {"x": 0.0, "y": 0.0},  # e^0
        ("a", 2): {"x": 2.0, "y": 4.0},  # e^3
        ("fusion", 0): {"x": 1.0, "y": 1.0},
    }
    cache.write_text(
        "".join(
            json.dumps({"task": task, "system": s, "doc_id": i, "nll": v}) + "\n"
            for (s, i), v in scores.items()
        )
    )
    samples = report.read_samples(tmp_path)
    text, _ = report.table(task, samples[task], ["a"], {}, report.read_ppl(cache))
    line = {row.split("|")[1].strip(): row for row in text.splitlines() if row.startswith("| ")}
    assert line["a"].rstrip(" |").endswith(f"{math.exp(2):.2f}")  # the median of e^0, e^2, e^3
    assert line["fusion"].rstrip(" |").endswith("-")  # one of three answers scored: no median
