"""GSM8K scoring in bench/quality.py: answer extraction, the reference, the interval."""

from __future__ import annotations

import pytest

from bench.quality import SHOTS, extract, fewshot_prompt, load_gsm8k, reference
from bench.quality_report import common_questions, summary, wilson


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (" She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        (" The total is $1,250.00.", "1250"),
        (" It takes 3 bolts, so 3.5 hours", "3.5"),
        (" The answer is -4.", "-4"),
        (" no number here", None),
    ],
)
def test_the_last_number_in_the_answer_is_extracted(text, want):
    assert extract(text) == want


def test_references_and_prompts_come_from_the_packaged_test_set():
    data = load_gsm8k()
    assert len(data) == 1319
    assert reference(data[0]["answer"]) == "18"
    prompt = fewshot_prompt(data[-SHOTS:], data[0]["question"])
    assert prompt.count("Question: ") == SHOTS + 1 and prompt.endswith("\nAnswer:")
    assert prompt.count("#### ") == SHOTS  # the shots are solved, the question is not


def test_wilson_interval_is_sound_at_the_edges():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.31
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.75
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)


def test_systems_are_compared_on_the_questions_all_of_them_answered():
    answers = [
        {"system": "a", "method": None, "index": 0, "correct": True, "seconds": 1.0,
         "completion_tokens": 5},
        {"system": "a", "method": None, "index": 1, "correct": True, "seconds": 1.0,
         "completion_tokens": 5},
        {"system": "cool", "method": "cool", "index": 0, "correct": False, "seconds": 2.0,
         "completion_tokens": 6},
    ]
    assert common_questions(answers) == {0}
    lines = {x["system"]: x for x in summary(answers, [])}
    assert lines["a"]["n"] == 1 and lines["a"]["accuracy"] == 1.0
    assert lines["cool"]["n"] == 1 and lines["cool"]["accuracy"] == 0.0
