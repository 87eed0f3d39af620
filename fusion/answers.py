"""How an answer is judged right, as the evaluation tasks judge it.

Standard library only: eval/tasks/qa_wikidata_pkg/utils.py imports this module inside
lm-evaluation-harness's own environment, and ``fusion-server calibrate`` uses it on its
development sets, so both judge an answer the same way.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")  # lm-eval's gsm8k flexible-extract pattern
_CUT = re.compile(r"\n|,|;|\(|\.\s|\.$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_number(number: str) -> str:
    """A GSM8K number as lm-eval compares them: no commas or $, 12.0 == 12."""
    n = number.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(n)
    except ValueError:
        return n
    return str(int(value)) if value == int(value) else str(value)


def last_number_matches(text: str, reference: str) -> bool:
    """GSM8K: the last number of ``text`` equals the reference's after ``####``
    (flexible-extract)."""
    found = _NUMBER.findall(text)
    return bool(found) and normalise_number(found[-1]) == normalise_number(
        reference.split("####")[-1]
    )


def normalise_phrase(text: str) -> str:
    """A short answer up to its first line end, comma, semicolon, parenthesis or sentence
    end; lower case, without articles, punctuation or extra spaces (SQuAD-style)."""
    text = _CUT.split(text.strip(), maxsplit=1)[0].lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def phrase_matches(text: str, targets: Sequence[str]) -> bool:
    """Exact match after :func:`normalise_phrase`, against any of the right answers."""
    said = normalise_phrase(text)
    return any(said == normalise_phrase(t) for t in targets)
