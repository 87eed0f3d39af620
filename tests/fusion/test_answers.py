"""The answer extractors that ``vote`` counts with, and the judges they share code with."""

from __future__ import annotations

import pytest

from fusion.answers import (
    EXTRACTOR_NAMES,
    boxed,
    choice,
    exact,
    extractor,
    last_number,
    last_number_matches,
)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("She has 3 apples, then 5. So the answer is 8.", "8"),
        ("It costs $1,200.", "1200"),
        ("#### 12.0", "12"),
        ("-4 degrees", "-4"),
        ("half is 2.5", "2.5"),
        ("no numbers here", None),
    ],
)
def test_last_number_reads_gsm8k_s_flexible_extract(text, key):
    assert last_number(text) == key
    if key is not None:  # the judge and the extractor agree on what the answer says
        assert last_number_matches(text, f"... #### {key}")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} first, then \boxed{ 1,000 }", "1000"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{x + 1}", "x+1"),
        (r"\boxed{}", None),
        (r"\boxed{42", None),
        ("42", None),
    ],
)
def test_boxed_reads_the_last_balanced_box(text, key):
    assert boxed(text) == key


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("I think the answer is D, not A.", "D"),
        ("B", "B"),
        ("(A) because it rains", "A"),
        ("C. The others are wrong", "C"),
        ("Between (A) and (C), (C) fits.", "C"),
        ("the answer is a dog", None),
        ("A dog.", None),
        ("no letter", None),
    ],
)
def test_choice_reads_a_capital_letter_named_as_the_answer(text, key):
    assert choice(text) == key


def test_exact_is_the_short_answer_judge_s_normal_form():
    assert exact("The Eiffel Tower, in Paris") == "eiffel tower"
    assert exact("  eiffel   TOWER. It is tall") == "eiffel tower"
    assert exact("...") is None


def test_regex_takes_the_last_match_and_its_first_group_when_it_has_one():
    assert extractor(r"regex:x = (\d+)")("x = 3, later x = 44") == "44"
    assert extractor(r"regex:\d+")("a 1 b 22") == "22"
    assert extractor(r"regex:x = (\d+)")("nothing") is None


def test_json_follows_a_field_path_in_the_answer_or_its_first_object():
    get = extractor("json:result.items.1")
    assert get('{"result": {"items": ["a", "b"]}}') == "b"
    assert get('Here: {"result": {"items": [1, {"z": 2, "a": 1}]}} done') == '{"a":1,"z":2}'
    assert get('{"result": {"items": ["a"]}}') is None
    assert get("not json") is None
    assert extractor("json:n")('{"n": 7}') == "7"


@pytest.mark.parametrize("spec", ["nope", "regex:", "regex:(", "json:", "json:a..b"])
def test_an_unknown_or_malformed_extractor_is_refused_naming_those_that_exist(spec):
    with pytest.raises(ValueError) as err:
        extractor(spec)
    if spec != "regex:(":
        assert all(name in str(err.value) for name in EXTRACTOR_NAMES)
    else:
        assert "invalid pattern" in str(err.value)
