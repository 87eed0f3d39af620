"""qa_wikidata_pkg (lm-evaluation-harness): BIG-bench's qa_wikidata facts as sentences to
complete, from eval/data/qa_wikidata.jsonl (``python eval/wikidata_data.py``).

Scoring: the completion up to its first line end, comma, semicolon, parenthesis or
sentence end, normalised (lower case, no articles, punctuation or extra spaces), must
equal one of the fact's right answers, normalised the same way (SQuAD-style exact
match, over every target; lm-eval's bigbench template checks the first target only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# the judge is shared with `fusion-server calibrate`: fusion/answers.py, standard library
# only, imported from the repository this file lives in
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from fusion.answers import phrase_matches

DATA = Path("eval/data/qa_wikidata.jsonl")


def dev(dataset: Any) -> Any:
    return dataset.filter(lambda r: r["role"] == "dev")


def heldout(dataset: Any) -> Any:
    return dataset.filter(lambda r: r["role"] == "heldout")


def shots() -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [r for r in rows if r["role"] == "shot"]


def first_target(doc: dict[str, Any]) -> str:
    return str(doc["targets"][0])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(phrase_matches(results[0], doc["targets"]))}
