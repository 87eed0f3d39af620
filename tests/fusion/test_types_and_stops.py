from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from fusion.stops import StopStringTracker
from fusion.types import perplexity


def test_mean_perplexity_is_per_token_and_sum_is_the_papers_eq1():
    lps = [-1.0, -3.0]
    assert math.isclose(perplexity(lps, "mean"), math.exp(2.0))
    assert math.isclose(perplexity(lps, "sum"), math.exp(4.0))
    assert perplexity([], "mean") == math.inf
    assert perplexity([-5000.0]) < math.inf  # capped, never an overflow


def test_stop_tracker_holds_back_possible_prefixes():
    t = StopStringTracker(("END",))
    assert t.feed("abc E") == "abc "
    assert t.feed("N") == ""
    assert t.feed("x") == "ENx"
    assert t.feed(" and EN") == " and "
    assert t.feed("D more") == ""
    assert t.stopped and t.text == "abc ENx and "


@given(
    parts=st.lists(st.text(alphabet="abXY", max_size=4), max_size=8),
    stops=st.lists(st.text(alphabet="abXY", min_size=1, max_size=3), max_size=2),
)
def test_stop_tracker_emits_exactly_the_text_before_the_first_stop(parts, stops):
    """Generation stops at the first piece after which some stop string is in the text,
    which is cut where the earliest of those starts (vLLM's way). A stop that would only
    complete later never does, even if it starts earlier: pieces "aY", "Y" with stops
    "Y" and "aYY" give "a"."""
    t = StopStringTracker(tuple(stops))
    emitted = "".join(t.feed(p) for p in parts) + t.flush()
    seen = ""
    cut = None
    for p in parts:
        seen += p
        hits = [i for s in stops if (i := seen.find(s)) >= 0]
        if hits:
            cut = min(hits)
            break
    assert emitted == (seen[:cut] if cut is not None else seen)


def test_a_stop_that_starts_earlier_but_completes_later_does_not_apply():
    t = StopStringTracker(("Y", "aYY"))
    assert t.feed("aY") + t.feed("Y") + t.flush() == "a"
