"""Calibration (fusion/calibration.py): its pure parts on hand-made numbers, and one
end-to-end run on the first development question with scripted engines."""

from __future__ import annotations

import math

import pytest
import yaml

from fusion.calibration import (
    MAX_QUESTIONS,
    Recommendation,
    Run,
    calibrate,
    candidate_policies,
    choose_leader,
    is_correct,
    keep_members,
    load_questions,
    member_weights,
    nll_samples,
    nll_stats,
    recommend,
    to_yaml,
)
from fusion.loop import Fuser
from fusion.types import ScoredCandidate, Segment, SelectionPolicy
from server.config import load_config


def seg(*cands: ScoredCandidate) -> Segment:
    return Segment(0, cands[0].text, cands[0].proposers[0], cands, 1)


def cand(text: str, by: tuple[str, ...], ppl: dict[str, float]) -> ScoredCandidate:
    return ScoredCandidate(text, by, False, tuple(ppl.items()), sum(ppl.values()) / len(ppl))


def test_questions_come_from_indices_0_to_599_only():
    shots, dev = load_questions(10_000)
    assert [q.index for q in shots] == [0, 1, 2]
    assert dev[0].index == 3 and dev[-1].index == MAX_QUESTIONS - 1
    assert len(dev) == MAX_QUESTIONS - 3
    _, few = load_questions(2)
    assert [q.index for q in few] == [3, 4]


def test_answers_are_judged_by_their_last_number():
    ref = "He runs 3*3*60 = 540 meters.\n#### 540"
    assert is_correct("3 sprints of 60 m, 3 times: 540 meters.", ref)
    assert is_correct("The total is $540.", ref)
    assert not is_correct("540 meters, or 541?", ref)
    assert not is_correct("no number", ref)


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
    assert keep_members(runs, "y") == ("x", "y")  # z is under half the leader's accuracy


def test_recommendation_prefers_the_cheaper_policy_on_a_tie_and_says_why():
    members = [Run("x", (True, False), ()), Run("y", (False, False), ())]
    paper = Run("mean_ppl", (False, False), ())
    good = Run("any", (True, False), ())
    policies = {
        "mean_ppl": (SelectionPolicy(), paper),
        "weighted": (SelectionPolicy("weighted"), good),
        "gate@0.5": (SelectionPolicy("gate", leader="x"), good),
    }
    rec = recommend(members, policies, "x", {"x": 1.2, "y": 0.8}, {})
    assert rec.policy.rule == "gate" and rec.leader == "x" and rec.members == ("x",)
    assert any("gate@0.5" in r and "mean_ppl" in r for r in rec.reasons)


async def test_calibrate_end_to_end_writes_a_config_block_that_loads(make_model, tmp_path):
    answer = "He runs 3 * 3 * 60 = 540 meters a week."
    models = [
        make_model("smollm2-135m", "He runs 3 sprints, so 180 meters."),
        make_model("qwen2.5-0.5b", answer),
    ]
    rec, report = await calibrate(Fuser(models), [m.name for m in models], 1, max_tokens=40)
    assert rec.leader == "qwen2.5-0.5b" and rec.members == ("qwen2.5-0.5b",)
    # (0+1)/3 and (1+1)/3, scaled to average 1
    assert rec.weights == {"smollm2-135m": 0.667, "qwen2.5-0.5b": 1.333}
    assert any("questions 3-3" in line for line in report)
    assert any(line.startswith("gate@0.5") for line in report)
    assert any(line.startswith("gate@0.5/veto@1") for line in report)
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
    assert set(config.fusion.selection.calibration) <= {"smollm2-135m", "qwen2.5-0.5b"}


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
