"""Calibration (fusion/calibration.py): its development sets, its pure parts on hand-made
numbers, and end-to-end runs on the first development question with scripted engines."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import yaml

from fusion.calibration import (
    MAX_QUESTIONS,
    Recommendation,
    Run,
    Tried,
    calibrate,
    candidate_policies,
    choose_leader,
    gsm8k_task,
    keep_members,
    member_weights,
    nll_samples,
    nll_stats,
    qa_task,
    recommend,
    to_yaml,
)
from fusion.loop import Fuser
from fusion.types import NllStats, ScoredCandidate, Segment, SelectionPolicy
from server.config import load_config


def seg(*cands: ScoredCandidate) -> Segment:
    return Segment(0, cands[0].text, cands[0].proposers[0], cands, 1)


def cand(text: str, by: tuple[str, ...], ppl: dict[str, float]) -> ScoredCandidate:
    return ScoredCandidate(text, by, False, tuple(ppl.items()), sum(ppl.values()) / len(ppl))


def test_gsm8k_questions_come_from_indices_0_to_599_only():
    task = gsm8k_task(10_000)
    assert task.questions[0].index == 3 and task.questions[-1].index == MAX_QUESTIONS - 1
    assert len(task.questions) == MAX_QUESTIONS - 3
    few = gsm8k_task(2)
    assert [q.index for q in few.questions] == [3, 4]
    prompt = few.questions[0].prompt
    # the three shots (questions 0-2) with their solutions, then the question, lm-eval's way
    assert prompt.count("Question: ") == 4 and prompt.count("#### ") == 3
    assert prompt.startswith("Question: Janet") and prompt.endswith("\nAnswer:")


def test_gsm8k_answers_are_judged_by_their_last_number():
    task = gsm8k_task(1)
    q = replace(task.questions[0], answers=("He runs 3*3*60 = 540 meters.\n#### 540",))
    assert task.is_correct("3 sprints of 60 m, 3 times: 540 meters.", q)
    assert task.is_correct("The total is $540.", q)
    assert not task.is_correct("540 meters, or 541?", q)
    assert not task.is_correct("no number", q)


def test_a_qa_task_reads_shots_and_dev_rows_only_and_matches_any_target(tmp_path):
    rows = [
        {
            "index": 0,
            "input": "The capital of Occitania is",
            "targets": ["Toulouse"],
            "role": "dev",
        },
        {"index": 1, "input": "Ostia is located in", "targets": ["Rome", "Lazio"], "role": "dev"},
        {"index": 2, "input": "The capital of Peru is", "targets": ["Lima"], "role": "heldout"},
        {"index": 9, "input": "The capital of Togo is", "targets": ["Lomé", "x"], "role": "shot"},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = qa_task(path, 10)
    assert [q.index for q in task.questions] == [0, 1]  # the held-out row is never read
    assert task.questions[1].prompt == "The capital of Togo is Lomé\nOstia is located in"
    assert task.stop == ("\n",) and task.max_tokens == 16
    q = task.questions[1]
    assert task.is_correct(" the Lazio, in Italy", q) and task.is_correct(" Rome.", q)
    assert not task.is_correct(" Roma", q)
    assert [q.index for q in qa_task(path, 1).questions] == [0]
    empty = tmp_path / "shots-only.jsonl"
    empty.write_text(json.dumps(rows[3]) + "\n")
    with pytest.raises(ValueError, match="no rows with role 'dev'"):
        qa_task(empty, 1)


def test_nll_samples_split_each_models_own_candidates_from_the_others():
    segments = [
        seg(
            cand(" a", ("x",), {"x": math.e, "y": math.e**2}),
            cand(" b", ("y", "fusion"), {"x": 5.0, "y": 5.0}),  # Cool+R's own: skipped
        ),
        seg(cand(" c", ("x",), {"x": 1.0})),  # one scorer: not a fused step
    ]
    samples = nll_samples(segments)
    assert samples["x"] == {"own": [pytest.approx(1.0)], "other": []}
    assert samples["y"] == {"own": [], "other": [pytest.approx(2.0)]}


def test_weights_are_smoothed_accuracies_averaging_one():
    runs = [Run("x", (True, True, True, False), ()), Run("y", (False,) * 4, ())]
    # (3+1)/6 = 0.6667 and (0+1)/6 = 0.1667; mean 0.4167 -> 1.6 and 0.4
    assert member_weights(runs) == {"x": 1.6, "y": 0.4}


def test_nll_stats_are_the_mean_and_population_spread():
    stats = nll_stats({"x": {"own": [1.0, 3.0], "other": [2.0]}, "y": {"own": [1.0], "other": []}})
    assert stats["x"].mean == 2.0 and stats["x"].std == pytest.approx(math.sqrt(2 / 3), abs=1e-4)
    assert "y" not in stats  # one value says nothing about spread


def test_leader_is_the_most_accurate_member_ties_to_the_better_judge():
    runs = [Run("x", (True, False), ()), Run("y", (True, False), ()), Run("z", (False,) * 2, ())]
    samples = {"x": {"own": [], "other": [2.0, 3.0]}, "y": {"own": [], "other": [1.0]}}
    assert choose_leader(runs, samples) == "y"
    assert keep_members(runs) == ("x", "y")  # z is under half the best member's accuracy
    weak = [Run("x", (True,) * 4, ()), Run("y", (True, False, False, False), ())]
    assert keep_members(weak) == ("x",)  # 25% is under half of 100%


def tried(name: str, run: Run, members=("x", "y"), policy=None, leader="x") -> Tried:
    weights = {m: 1.0 for m in members}
    return Tried(name, members, leader, weights, {}, policy or SelectionPolicy(), run)


def test_recommendation_prefers_the_cheaper_policy_on_a_tie_and_says_why():
    members = [Run("x", (True, True, False, False), ()), Run("y", (True, False, False, False), ())]
    paper = Run("mean_ppl", (False,) * 4, ())
    good = Run("any", (True, True, True, False), ())
    systems = [
        tried("mean_ppl", paper),
        tried("weighted", good, policy=SelectionPolicy("weighted")),
        tried("gate@0.5", good, policy=SelectionPolicy("gate", leader="x")),
    ]
    rec = recommend(members, systems, "x")
    assert rec.policy.rule == "gate" and rec.leader == "x" and rec.members == ("x", "y")
    assert any("gate@0.5" in r and "mean_ppl" in r for r in rec.reasons)


def test_a_tie_in_accuracy_goes_to_the_faster_system():
    members = [Run("x", (True, False), (), 2.0), Run("y", (True, False), (), 1.0)]
    good = (True, True)
    systems = [
        tried("gate@0.5", Run("g", good, (), 9.0), policy=SelectionPolicy("gate", leader="x")),
        tried("zscore", Run("z", good, (), 3.0), policy=SelectionPolicy("zscore")),
    ]
    rec = recommend(members, systems, "x")
    assert rec.policy.rule == "zscore"
    assert any("zscore" in r and "1.5x x's time" in r for r in rec.reasons)


def test_the_leader_answers_alone_when_no_policy_beats_it():
    members = [Run("x", (True, True, False, False), ()), Run("y", (True, False, False, False), ())]
    tie = Run("any", (True, True, False, False), ())  # as good as x alone: not worth its cost
    systems = [tried("mean_ppl", tie), tried("gate@0.5", tie, policy=SelectionPolicy("gate"))]
    rec = recommend(members, systems, "x")
    assert rec.members == ("x",) and rec.policy.rule == "leader" and rec.policy.leader == "x"
    assert any("x alone" in r and "gate@0.5" in r for r in rec.reasons)
    better = [systems[0], tried("gate@0.5", Run("g", (True,) * 3 + (False,), ()))]
    assert recommend(members, better, "x").members == ("x", "y")


def test_a_time_limit_leaves_out_the_slower_systems_even_when_more_accurate():
    # x alone: 4 questions in 4 s; the trio is the most accurate but takes 3x that
    members = [
        Run("x", (True, True, False, False), (), 4.0),
        Run("y", (True, False, False, False), (), 2.0),
        Run("z", (True, False, True, False), (), 6.0),
    ]
    trio = tried("zscore", Run("t", (True,) * 4, (), 12.0), ("x", "y", "z"))
    pair = tried(
        "gate@0.5 w/o z",
        Run("p", (True, True, True, False), (), 5.0),
        ("x", "y"),
        SelectionPolicy("gate", leader="x"),
    )
    assert recommend(members, [trio, pair], "x").members == ("x", "y", "z")  # no limit
    rec = recommend(members, [trio, pair], "x", max_time_ratio=1.5)
    assert rec.members == ("x", "y") and rec.policy.rule == "gate"
    assert any(
        "1 of 2 fused systems over the time limit (1.5x x's 1.00 s" in r for r in rec.reasons
    )
    assert any("members: x, y" in r for r in rec.reasons)
    # nothing fused fits under 1.2x: the leader answers alone, and says so
    alone = recommend(members, [trio, pair], "x", max_time_ratio=1.2)
    assert alone.members == ("x",) and any("fast enough" in r for r in alone.reasons)


def test_a_smaller_set_brings_its_own_leader_and_weights():
    members = [Run("x", (True, False), ()), Run("y", (True, False), ()), Run("z", (False,) * 2, ())]
    pair = Tried(
        "zscore w/o x",
        ("y", "z"),
        "y",
        {"y": 1.3, "z": 0.7},
        {"y": NllStats(1.0, 0.5), "z": NllStats(2.0, 1.0)},
        SelectionPolicy("zscore"),
        Run("p", (True, True), ()),
    )
    rec = recommend(
        members, [tried("mean_ppl", Run("m", (True, False), ()), ("x", "y", "z")), pair], "x"
    )
    assert (rec.members, rec.leader, rec.weights) == (("y", "z"), "y", {"y": 1.3, "z": 0.7})
    block = yaml.safe_load(to_yaml(rec, []))["fusion"]
    assert block["models"] == ["y", "z"] and block["selection"]["leader"] == "y"
    assert block["selection"]["calibration"]["z"] == {"nll_mean": 2.0, "nll_std": 1.0}


async def test_calibrate_end_to_end_writes_a_config_block_that_loads(make_model, tmp_path):
    answer = "He runs 3 * 3 * 60 = 540 meters a week."
    models = [
        make_model("smollm2-135m", "He runs 3 sprints, so 180 meters."),
        make_model("qwen2.5-0.5b", answer),
    ]
    rec, report = await calibrate(Fuser(models), [m.name for m in models], gsm8k_task(1, 40))
    # smollm2 is wrong, under half qwen's accuracy: dropped, and nothing is fused
    assert rec.leader == "qwen2.5-0.5b" and rec.members == ("qwen2.5-0.5b",)
    assert rec.policy.rule == "leader" and rec.weights == {"qwen2.5-0.5b": 1.0}
    assert any("questions 3-3" in line for line in report)
    assert any(line.startswith("smollm2-135m") and " no " in line for line in report)
    assert not any(line.startswith("gate@0.5") for line in report)
    text = to_yaml(rec, ["test"])
    block = yaml.safe_load(text)["fusion"]
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": "smollm2-135m", "source": "x"},
                    {"name": "qwen2.5-0.5b", "source": "y"},
                ],
                "fusion": block,
            }
        )
    )
    config = load_config(path)
    assert config.fusion.selection.leader == "qwen2.5-0.5b"
    assert config.fusion.models == ["qwen2.5-0.5b"]
    assert config.fusion.selection.rule == "leader"


async def test_calibrate_fuses_the_members_it_keeps_under_every_candidate_policy(make_model):
    answer = "He runs 3 * 3 * 60 = 540 meters a week."
    models = [make_model("smollm2-135m", answer), make_model("qwen2.5-0.5b", answer)]
    rec, report = await calibrate(Fuser(models), [m.name for m in models], gsm8k_task(1, 40))
    # both right: both kept, every policy run; none beats a member alone, so one answers
    assert any(line.startswith("mean_ppl ") for line in report)
    assert any(line.startswith("gate@0.5/veto@1") for line in report)
    assert len(rec.members) == 1 and any("no more accurate" in r for r in rec.reasons)
    assert not any(" w/o " in line for line in report)  # two members: no smaller set


async def test_calibrate_with_three_members_also_tries_each_set_without_one(make_model):
    answer = "He runs 3 * 3 * 60 = 540 meters a week."
    names = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
    models = [make_model(n, answer) for n in names]
    rec, report = await calibrate(Fuser(models), names, gsm8k_task(1, 40))
    at = report.index(next(line for line in report if line.startswith("fused ")))
    fused = [line.rsplit(None, 5)[0] for line in report[at + 1 :] if line]
    policies = ["mean_ppl", "leader", "weighted", "zscore", "gate@0.5", "gate@0.5/veto@1"]
    without = [f"{p} w/o {n}" for n in names for p in policies]
    # the consensus gate needs two members besides the leader: the trio only
    assert fused[: len(policies) * 4 + 1] == [*policies, "gate@0.5/consensus", *without]
    # every row ends with its seconds per answer and its time against the leader alone
    assert all(line.split()[-1].endswith("x") for line in report[at + 1 : at + 25])
    # all equally right: none beats the leader alone, which answers
    assert rec.members == ("smollm2-135m",)
    _, fewer = await calibrate(Fuser(models), names, gsm8k_task(1, 40), subsets=False)
    assert not any(" w/o " in line for line in fewer)


def test_each_gate_threshold_is_also_tried_with_each_leader_margin():
    got = candidate_policies("x", {"x": 1.5, "y": 0.5}, {}, [0.5, 0.3], [1.0, 2.0])
    assert {n for n in got if "veto" in n} == {
        "gate@0.5/veto@1",
        "gate@0.5/veto@2",
        "gate@0.3/veto@1",
        "gate@0.3/veto@2",
    }
    p = got["gate@0.3/veto@2"]
    assert (p.rule, p.gate_threshold, p.leader_margin, p.leader) == ("gate", 0.3, 2.0, "x")
    assert got["gate@0.3"].leader_margin is None
    rec = Recommendation(("x", "y"), "x", {"x": 1.5, "y": 0.5}, {}, p, ())
    block = yaml.safe_load(to_yaml(rec, []))["fusion"]["selection"]
    assert block["leader_margin"] == 2.0 and block["gate_threshold"] == 0.3


def test_the_consensus_candidate_is_the_gate_needing_two_proposers_and_is_written_out():
    two = candidate_policies("x", {"x": 1.0, "y": 1.0}, {}, [0.5, 0.3], consensus=False)
    assert not any("consensus" in n for n in two)
    three = candidate_policies("x", {"x": 1.0, "y": 1.0, "z": 1.0}, {}, [0.5], consensus=True)
    p = three["gate@0.5/consensus"]
    assert (p.rule, p.gate_threshold, p.min_support, p.leader) == ("gate", 0.5, 2, "x")
    assert three["gate@0.5"].min_support == 1
    rec = Recommendation(("x", "y", "z"), "x", {}, {}, p, ())
    block = yaml.safe_load(to_yaml(rec, []))["fusion"]["selection"]
    assert block["min_support"] == 2 and block["rule"] == "gate"


async def test_calibrate_tries_vote_and_recommends_it_when_it_beats_the_member_alone(
    make_model, tmp_path
):
    # greedy, Qwen answers 180; three of its four samples say 540, the right answer
    qwen = make_model(
        "qwen2.5-0.5b",
        "He runs 3 sprints, so 180 meters.",
        answers=["So 540.", "It is 540.", "So 7.", "540 meters."],
    )
    rec, report = await calibrate(
        Fuser([qwen]), ["qwen2.5-0.5b"], gsm8k_task(1, 40), vote_settings=[(4, 0.75, 8)]
    )
    row = next(line for line in report if line.startswith("vote k4/t0.75/b8"))
    assert row.split()[2] == "100%"
    assert rec.vote is not None and (rec.vote.k, rec.vote.threshold, rec.vote.budget) == (
        4,
        0.75,
        8,
    )
    assert rec.vote.answer == "last_number"  # GSM8K's judge reads the last number too
    assert any("vote k4/t0.75/b8 had the best development accuracy" in r for r in rec.reasons)
    block = yaml.safe_load(to_yaml(rec, ["test"]))["fusion"]
    path = tmp_path / "c.yaml"
    models = [{"name": "qwen2.5-0.5b", "source": "y"}]
    path.write_text(yaml.safe_dump({"models": models, "fusion": block}))
    config = load_config(path)
    assert config.fusion.method == "vote" and config.fusion.answer == "last_number"
    assert (config.fusion.vote.k, config.fusion.vote.seed) == (4, 0)


async def test_without_vote_settings_no_vote_is_tried(make_model):
    qwen = make_model("qwen2.5-0.5b", "So 540.", answers=["So 540."])
    rec, report = await calibrate(
        Fuser([qwen]), ["qwen2.5-0.5b"], gsm8k_task(1, 40), vote_settings=[]
    )
    assert rec.vote is None and not any(line.startswith("vote") for line in report)
    assert rec.members == ("qwen2.5-0.5b",)
