"""Splits of the packaged GSM8K test set for the gsm8k_pkg tasks (lm-evaluation-harness).

The package ships only the test split (1,319 questions), so the three few-shot examples
are its last three items and are left out of the evaluation; ``heldout`` keeps questions
600-1315, those ``fusion-server calibrate`` never uses (it reads questions 0-599 only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHOTS = 3
CALIBRATION_QUESTIONS = 600  # questions 0-599 are calibrate's development set
DATA = Path("eval/data/gsm8k_test.jsonl")


def without_shots(dataset: Any) -> Any:
    """Every question but the last three (the few-shot examples)."""
    return dataset.select(range(len(dataset) - SHOTS))


def heldout(dataset: Any) -> Any:
    """Questions 600 to the last before the shots: never seen by calibration."""
    return dataset.select(range(CALIBRATION_QUESTIONS, len(dataset) - SHOTS))


def dev(dataset: Any) -> Any:
    """Questions 3-599: the development slice, after its own three shots (0-2)."""
    return dataset.select(range(SHOTS, CALIBRATION_QUESTIONS))


def dev_shots() -> list[dict[str, str]]:
    """Questions 0-2, the shots of the development slice (as ``fusion-server calibrate``)."""
    return _rows()[:SHOTS]


def shots() -> list[dict[str, str]]:
    """The test set's last three items, in order (the shots of gsm8k_pkg and _heldout)."""
    return _rows()[-SHOTS:]


def _rows() -> list[dict[str, str]]:
    lines = [x for x in DATA.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [json.loads(x) for x in lines]
