"""How an answer is judged right, as the evaluation tasks judge it, and the extractors
that map an answer to the key ``vote`` counts (the same reading of an answer for both).

Standard library only at import: eval/tasks/qa_wikidata_pkg/utils.py imports this module
inside lm-evaluation-harness's own environment, and ``fusion-server calibrate`` uses it on
its development sets, so both judge an answer the same way. (The ``regex:`` extractor
alone takes the ``regex`` package, for its time limit.)
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

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
    if not math.isfinite(value):  # "inf", "nan", 1e400: no int to make of it
        return n
    return str(int(value)) if value == int(value) else str(value)


def last_number(text: str) -> str | None:
    """GSM8K's flexible extract: the last number of ``text``, normalised (None: none, or
    a last match without a digit, such as "...", which no reference equals)."""
    found = _NUMBER.findall(text)
    if not found or not any(c.isdigit() for c in found[-1]):
        return None
    return normalise_number(found[-1])


def last_number_matches(text: str, reference: str) -> bool:
    """GSM8K: the last number of ``text`` equals the reference's after ``####``
    (flexible-extract)."""
    said = last_number(text)
    return said is not None and said == normalise_number(reference.split("####")[-1])


def normalise_phrase(text: str) -> str:
    """A short answer up to its first line end, comma, semicolon, parenthesis or sentence
    end; lower case, without articles, punctuation or extra spaces (SQuAD-style)."""
    text = _CUT.split(text.strip(), maxsplit=1)[0].lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def phrase_matches(text: str, targets: Sequence[str]) -> bool:
    """Exact match after :func:`normalise_phrase`, against any of the right answers."""
    said = normalise_phrase(text)
    return any(said == normalise_phrase(t) for t in targets)


# -- extractors: an answer's key for ``vote`` ------------------------------------------------
# the letter is a capital: "the answer is a dog" names no choice
_CHOICE_SAID = re.compile(r"(?i:answer|choice|option)\s*(?i:is)?\s*:?\s*\(?([A-J])\b")
_CHOICE_ALONE = re.compile(r"^\s*\(?([A-J])(?:[).:]|\s*$)")
_CHOICE_PAREN = re.compile(r"\(([A-J])\)")
_PRONOUN = re.compile(r"\s+[a-z]")  # "the answer is I think B": "I" is no choice there
REGEX_SECONDS = 0.1  # a per-request pattern's time on one answer (backtracking: no key)


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), normalised as a number
    when it is one, else without spaces."""
    at = text.rfind("\\boxed{")
    if at < 0:
        return None
    depth, start = 0, at + len("\\boxed{")
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                inner = "".join(text[start:i].split())
                if not inner:
                    return None
                number = normalise_number(inner)
                return number if _is_number(number) else inner
            depth -= 1
    return None  # never closed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def choice(text: str) -> str | None:
    """A multiple-choice letter A-J: the one after "answer is" (or "answer:"), else an
    answer that is a letter alone ("B", "(B)", "B."), else the last "(B)" in the text."""
    said = [
        m.group(1)
        for m in _CHOICE_SAID.finditer(text)
        if not (m.group(1) == "I" and _PRONOUN.match(text, m.end()))
    ]
    if said:
        return said[-1]
    alone = _CHOICE_ALONE.match(text)
    if alone:
        return alone.group(1)
    paren = _CHOICE_PAREN.findall(text)
    return paren[-1] if paren else None


def exact(text: str) -> str | None:
    """The answer as the short-answer judge reads it (:func:`normalise_phrase`)."""
    return normalise_phrase(text) or None


def regex_extractor(pattern: str) -> Callable[[str], str | None]:
    """The last match of ``pattern`` (its first group when it has groups), stripped. A
    request's pattern may backtrack for ever: past ``REGEX_SECONDS`` on an answer, none."""
    import regex

    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"answer extractor 'regex:{pattern}': invalid pattern: {exc}") from None

    def extract(text: str) -> str | None:
        try:
            found = list(compiled.finditer(text, timeout=REGEX_SECONDS))
        except TimeoutError:
            return None
        if not found:
            return None
        last = found[-1]
        said = last.group(1) if compiled.groups else last.group(0)
        return said.strip() if said is not None and said.strip() else None

    return extract


def json_extractor(path: str) -> Callable[[str], str | None]:
    """The value at ``path`` (dot-separated keys, list indices as numbers) of the answer
    read as JSON (the whole answer, else its first ``{...}`` block); strings as they are,
    other values as compact JSON with sorted keys."""
    steps = path.split(".")

    def extract(text: str) -> str | None:
        value = _json_of(text)
        for step in steps:
            if isinstance(value, dict) and step in value:
                value = value[step]
            elif isinstance(value, list) and step.lstrip("-").isdigit():
                index = int(step)
                if not -len(value) <= index < len(value):
                    return None
                value = value[index]
            else:
                return None
        if value is None:
            return None
        if isinstance(value, str):
            return value.strip() or None
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    return extract


def _json_of(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    return value


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "last_number": last_number,
    "boxed": boxed,
    "choice": choice,
    "exact": exact,
}
EXTRACTOR_NAMES = (*EXTRACTORS, "regex:<pattern>", "json:<field path>")


def extractor(spec: str) -> Callable[[str], str | None]:
    """The extractor ``spec`` names (ValueError naming the ones that exist otherwise)."""
    if spec in EXTRACTORS:
        return EXTRACTORS[spec]
    kind, _, arg = spec.partition(":")
    if kind == "regex" and arg:
        return regex_extractor(arg)
    if kind == "json" and arg and all(arg.split(".")):
        return json_extractor(arg)
    raise ValueError(f"unknown answer extractor {spec!r}; one of: {', '.join(EXTRACTOR_NAMES)}")
