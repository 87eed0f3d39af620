"""qa_wikidata_pkg (lm-evaluation-harness): BIG-bench's qa_wikidata facts as sentences to
complete, from eval/data/qa_wikidata.jsonl (``python eval/wikidata_data.py``).

Scoring: the completion up to its first line end, comma, semicolon, parenthesis or
sentence end, normalised (lower case, no articles, punctuation or extra spaces), must
equal one of the fact's right answers, normalised the same way (SQuAD-style exact
match, over every target; lm-eval's bigbench template checks the first target only).
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

DATA = Path("eval/data/qa_wikidata.jsonl")
_CUT = re.compile(r"\n|,|;|\(|\.\s|\.$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def dev(dataset: Any) -> Any:
    return dataset.filter(lambda r: r["role"] == "dev")


def heldout(dataset: Any) -> Any:
    return dataset.filter(lambda r: r["role"] == "heldout")


def shots() -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [r for r in rows if r["role"] == "shot"]


def first_target(doc: dict[str, Any]) -> str:
    return str(doc["targets"][0])


def normalise(text: str) -> str:
    text = _CUT.split(text.strip(), maxsplit=1)[0].lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    said = normalise(results[0])
    return {"exact_match": float(any(said == normalise(t) for t in doc["targets"]))}
