"""Selection rules on hand-computed numbers (fusion/selection.py).

Single-token candidates with log-prob ``-ln k`` have perplexity exactly ``k``, so the
expected scores below can be checked with a pocket calculator.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.selection import (
    Scored,
    gate_confident,
    leader_ppl,
    mean_ppl,
    nll,
    packllm_weights,
    repeats,
    select,
    settled,
    vetoed,
    weighted,
    zscore,
)
from fusion.types import NllStats, SelectionPolicy, perplexity


def cand(text: str, ppl: dict[str, float], proposers: tuple[str, ...] = ("x",)) -> Scored:
    """A one-token candidate whose perplexity under each model is ``ppl[model]``."""
    return Scored(text, proposers, False, tuple((n, (-math.log(p),)) for n, p in ppl.items()))


# Two weak models (x, y) agree on A; the strong one (z) wrote B and finds A unlikely.
A = cand(" A", {"x": 1.2, "y": 1.2, "z": 6.0}, ("x", "y"))
B = cand(" B", {"x": 4.0, "y": 4.0, "z": 1.1}, ("z",))


def test_mean_ppl_is_the_arithmetic_mean_and_lets_two_weak_models_outvote_the_strong():
    assert mean_ppl(A) == pytest.approx((1.2 + 1.2 + 6.0) / 3)  # 2.8
    assert mean_ppl(B) == pytest.approx((4.0 + 4.0 + 1.1) / 3)  # 3.0333
    chosen = select([A, B])
    assert chosen.index == 0 and chosen.rule == "mean_ppl"
    assert chosen.scores == pytest.approx((2.8, 3.033333))


def test_mean_ppl_honours_the_sum_mode():
    two = Scored("ab", ("x",), False, (("x", (-math.log(2), -math.log(3))),))
    assert mean_ppl(two, "mean") == pytest.approx(math.sqrt(6))  # exp of the mean NLL
    assert mean_ppl(two, "sum") == pytest.approx(6.0)  # exp of the summed NLL


@given(
    st.lists(
        st.lists(st.floats(-12.0, 0.0), min_size=1, max_size=5).map(tuple),
        min_size=3,
        max_size=12,
    ),
    st.sampled_from(["mean", "sum"]),
)
def test_mean_ppl_chooses_exactly_as_the_loop_did_before_policies(lps, mode):
    """Regression guard: the old ``min(range(n), key=mean_perplexity)``, bit for bit."""
    models = ("x", "y", "z")
    cands = [
        Scored(f"c{i}", ("x",), False, tuple(zip(models, lps[i : i + 3], strict=False)))
        for i in range(len(lps) - 2)
    ]
    old_means = []
    for c in cands:
        ppl = tuple((n, perplexity(lp, mode)) for n, lp in c.logprobs)
        old_means.append(sum(p for _, p in ppl) / len(ppl))
    old_best = min(range(len(cands)), key=lambda i: old_means[i])
    chosen = select(cands, SelectionPolicy(), mode)
    assert chosen.index == old_best
    assert list(chosen.scores) == old_means  # identical floats, not approximately


def test_weighted_mean_of_perplexities():
    w = {"z": 4.0}  # x and y weigh 1
    assert weighted(A, w, "ppl") == pytest.approx((1.2 + 1.2 + 4 * 6.0) / 6)  # 4.4
    assert weighted(B, w, "ppl") == pytest.approx((4.0 + 4.0 + 4 * 1.1) / 6)  # 2.0667
    policy = SelectionPolicy(rule="weighted", aggregate="ppl", weights=(("z", 4.0),))
    chosen = select([A, B], policy)
    assert chosen.index == 1 and chosen.scores == pytest.approx((4.4, 2.066667))


def test_weighted_nll_is_a_weighted_geometric_mean_of_perplexities():
    w = {"z": 4.0}
    # exp((ln 1.2 + ln 1.2 + 4 ln 6) / 6) = (1.2^2 * 6^4)^(1/6)
    assert weighted(A, w, "nll") == pytest.approx((1.2**2 * 6.0**4) ** (1 / 6))  # 3.5088
    assert weighted(B, w, "nll") == pytest.approx((4.0**2 * 1.1**4) ** (1 / 6))  # 1.6915
    assert weighted(A, w, "nll") == pytest.approx(3.5088, abs=1e-4)


def test_one_exploding_perplexity_rules_any_arithmetic_mean_but_not_the_geometric():
    """gemma3 gave 131,742,967 once: in an arithmetic mean it outweighs everything, even
    at a tenth of a vote; in the NLL mean it adds ln(131,742,967) = 18.7 nats."""
    big = cand(" big", {"x": 1.1, "y": 1.1, "z": 131_742_967.0})
    ok = cand(" ok", {"x": 3.0, "y": 3.0, "z": 3.0})
    assert select([big, ok]).index == 1
    tenth = (("z", 0.1),)
    arithmetic = SelectionPolicy(rule="weighted", aggregate="ppl", weights=tenth)
    assert select([big, ok], arithmetic).index == 1
    geo = select([big, ok], SelectionPolicy(rule="weighted", aggregate="nll", weights=tenth))
    # exp((2 ln 1.1 + 0.1 ln 131742967) / 2.1) = exp(0.98107) = 2.6673 < 3
    assert geo.index == 0
    assert geo.scores == pytest.approx((2.6673, 3.0), abs=1e-4)


def test_zscore_normalises_each_models_nll_by_its_calibration():
    stats = {"x": NllStats(0.5, 0.25), "y": NllStats(0.5, 0.25), "z": NllStats(1.0, 0.5)}
    # A: x, y: (ln 1.2 - 0.5) / 0.25 = -1.27071; z: (ln 6 - 1) / 0.5 = 1.58352
    assert zscore(A, stats, {}) == pytest.approx((2 * -1.270714 + 1.583519) / 3, abs=1e-5)
    # B: x, y: (ln 4 - 0.5) / 0.25 = 3.54518; z: (ln 1.1 - 1) / 0.5 = -1.80938
    assert zscore(B, stats, {}) == pytest.approx((2 * 3.545177 - 1.809380) / 3, abs=1e-5)
    # weighted: z counts 4 times
    assert zscore(A, stats, {"z": 4.0}) == pytest.approx(
        (2 * -1.270714 + 4 * 1.583519) / 6, abs=1e-5
    )
    policy = SelectionPolicy(rule="zscore", calibration=tuple(stats.items()))
    assert select([A, B], policy).index == 0


def test_zscore_ignores_models_without_calibration():
    stats = {"z": NllStats(1.0, 0.5)}
    assert zscore(A, stats, {}) == pytest.approx((math.log(6) - 1) / 0.5)


def test_packllm_weights_are_a_softmax_of_minus_prompt_nll_over_tau():
    w = packllm_weights({"x": 2.0, "y": 3.0, "z": 1.0})
    # e^-1, e^-2, e^-3 over their sum 0.553001
    assert w == pytest.approx({"z": 0.665241, "x": 0.244728, "y": 0.090031}, abs=1e-6)
    sharp = packllm_weights({"x": 2.0, "y": 3.0, "z": 1.0}, temperature=0.5)
    assert sharp == pytest.approx({"z": 0.866813, "x": 0.117310, "y": 0.015876}, abs=1e-6)
    assert packllm_weights({"x": math.inf, "y": math.inf}) == {"x": 0.5, "y": 0.5}
    assert packllm_weights({"x": math.inf, "y": 1.0}) == {"x": 0.0, "y": 1.0}


def test_packllm_rule_weighs_the_candidates_nll_with_the_prompt_weights():
    weights = {"x": 0.1, "y": 0.1, "z": 0.8}
    chosen = select([A, B], SelectionPolicy(rule="packllm"), prompt_weights=weights)
    expect_a = math.exp(0.1 * math.log(1.2) * 2 + 0.8 * math.log(6.0))  # 4.3487
    expect_b = math.exp(0.1 * math.log(4.0) * 2 + 0.8 * math.log(1.1))  # 1.4241
    assert chosen.scores == pytest.approx((expect_a, expect_b))
    assert chosen.scores[0] == pytest.approx(4.3487, abs=1e-4)
    assert chosen.index == 1 and chosen.rule == "packllm"


def test_leader_rule_uses_the_leaders_perplexity_alone():
    assert leader_ppl(A, "z") == pytest.approx(6.0)
    chosen = select([A, B], SelectionPolicy(rule="leader", leader="z"))
    assert chosen.index == 1 and chosen.scores == pytest.approx((6.0, 1.1))


def test_leader_rule_without_its_leader_falls_back_to_the_papers_mean():
    chosen = select([A, B], SelectionPolicy(rule="leader", leader="gone"))
    assert chosen.index == 0 and chosen.rule == "mean_ppl"


def test_gate_chooses_fused_steps_with_its_fallback():
    policy = SelectionPolicy(rule="gate", leader="z", gate_fallback="leader")
    assert select([A, B], policy).rule == "leader"
    assert select([A, B], policy).index == 1


def test_gate_confident_needs_every_token_at_the_threshold():
    assert gate_confident([math.log(0.6), math.log(0.9)], 0.5)
    assert gate_confident([math.log(0.5)], 0.5)
    assert not gate_confident([math.log(0.9), math.log(0.4)], 0.5)
    assert not gate_confident(None, 0.5)
    assert not gate_confident([], 0.5)


def test_nll_is_the_log_of_perplexity():
    assert nll([-math.log(2), -math.log(8)]) == pytest.approx(math.log(4))
    assert nll([-math.log(2), -math.log(8)], "sum") == pytest.approx(math.log(16))
    assert nll([]) == math.inf


def test_repeats_counts_earlier_occurrences_of_the_ngram_the_addition_closes():
    assert repeats("a b c d a b c", " d", 4) == 1
    assert repeats("a b c d x a b c d y a b c", " d", 4) == 2
    assert repeats("a b c d a b c", " e", 4) == 0
    assert repeats("a b c d a b c", " ", 4) == 0  # no new word
    assert repeats("a b c d a b c", "d", 4) == 0  # "cd" is a new word
    assert repeats("a b", " a b", 2) == 1  # the whole addition is checked (rerank)


def test_repetition_guard_excludes_a_looping_candidate_unless_all_loop():
    answer = "so x is 5 so x is"
    loop = cand(" 5", {"x": 1.01})
    other = cand(" 6", {"x": 3.0})
    policy = SelectionPolicy(repetition_ngram=4, repetition_limit=1)
    chosen = select([loop, other], policy, answer=answer)
    assert chosen.index == 1 and chosen.excluded == (True, False)
    assert select([loop, other], answer=answer).index == 0  # off by default
    only = select([loop], policy, answer=answer)
    assert only.index == 0 and only.excluded == (False,)


def test_leader_veto_excludes_what_the_leader_finds_far_less_likely_than_its_own():
    # z proposed B (NLL ln 1.1 = 0.095); A costs it ln 6 = 1.79, C ln 1.5 = 0.405
    C = cand(" C", {"x": 2.5, "y": 2.5, "z": 1.5}, ("x",))
    policy = SelectionPolicy(rule="weighted", leader="z", leader_margin=1.0)
    chosen = select([A, B, C], policy)
    assert chosen.excluded == (True, False, False)
    assert chosen.index == 2  # the weak models still outvote z among what it allows
    assert select([A, B, C], SelectionPolicy(rule="weighted")).index == 0  # off: A wins
    tight = select([A, B, C], SelectionPolicy(rule="weighted", leader="z", leader_margin=0.3))
    assert tight.excluded == (True, False, True) and tight.index == 1
    assert select([A, B], SelectionPolicy(leader="z", leader_margin=1.7)).index == 0
    assert select([A, B], SelectionPolicy(leader="z", leader_margin=1.6)).index == 1


def test_leader_excess_vetoes_one_surprising_word_that_a_per_token_mean_dilutes():
    def toks(text, lps, proposers, x_lp):
        return Scored(text, proposers, False, (("z", lps), ("x", (x_lp,) * len(lps))))

    own = toks(" Seattle has 20 sheep", (-0.9, -0.1, -0.1, -0.1, -0.1), ("z",), -0.5)  # rate 0.26
    other = toks(" Toulouse has 20 sheep", (-1.2, -0.1, -2.6, -0.1, -0.1), ("x",), -0.1)  # 0.82
    # per token the other is 0.56 nats worse: inside a margin of 1; in all, 2.8 nats
    assert vetoed([own, other], "z", 1.0) == (False, False)
    assert vetoed([own, other], "z", None, 2.5) == (False, True)
    assert vetoed([own, other], "z", None, 3.0) == (False, False)
    assert vetoed([own, other], "z", 1.0, 2.5) == (False, True)
    policy = SelectionPolicy(rule="weighted", weights=(("z", 0.0),), leader="z", leader_excess=2.5)
    assert select([own, other], replace(policy, leader_excess=None)).index == 1
    assert select([own, other], policy).index == 0


def test_consensus_lets_weak_models_overrule_the_leader_only_together():
    # A (proposed by x and y) beats the leader's B under the paper's rule
    policy = SelectionPolicy(leader="z", min_support=2)
    assert select([A, B], policy).index == 0  # x and y agree: A may win
    alone = cand(" A", {"x": 1.2, "y": 1.2, "z": 6.0}, ("x",))
    other = cand(" C", {"x": 5.0, "y": 1.1, "z": 9.0}, ("y",))
    chosen = select([alone, B, other], policy)
    assert chosen.excluded == (True, False, True) and chosen.index == 1
    assert select([alone, B, other]).index == 0  # off: A wins on its own
    # without a leader, a lone proposal never wins while a shared one exists
    assert select([alone, A], SelectionPolicy(min_support=2)).index == 1
    assert select([alone], SelectionPolicy(min_support=3)).excluded == (False,)


def test_leader_veto_is_off_when_the_leader_proposed_nothing():
    C = cand(" C", {"x": 1.3, "y": 1.3, "z": 1.5}, ("y",))
    chosen = select([A, C], SelectionPolicy(leader="z", leader_margin=0.0))
    assert chosen.excluded == (False, False)
    assert vetoed([A, B], None, 0.5) == (False, False)


def test_ties_go_to_the_first_candidate():
    same = cand(" s", {"x": 2.0})
    assert select([same, cand(" t", {"x": 2.0})]).index == 0


def test_select_needs_candidates():
    with pytest.raises(ValueError):
        select([])


# -- settled: the winner the filters alone decide ------------------------------------------
MODELS = ("x", "y", "z")
TEXTS = (" the mat.", " the rug.", " the mat. the mat.", " a")


@st.composite
def steps(draw):
    """A step: each model proposes one of a few texts or nothing, every model scores
    every candidate anyhow, under any policy with filters."""
    # distinct (text, ended) pairs: the same text ended and not is two candidates
    pairs = st.tuples(st.sampled_from(TEXTS), st.booleans())
    texts = draw(st.lists(pairs, min_size=1, max_size=3, unique=True))
    owner = {m: draw(st.sampled_from([None, *range(len(texts))])) for m in MODELS}
    owner["x"] = 0 if owner["x"] is None else owner["x"]  # someone proposed something
    # log-probs as engines give them: finite, -inf (a token a model cannot produce), or
    # none at all (a model that could not score the candidate)
    lp = st.one_of(st.floats(-15.0, 0.0), st.just(-math.inf))
    lps = st.lists(lp, min_size=0, max_size=4).map(tuple)
    candidates = [
        Scored(t, ps, ended, tuple((m, draw(lps)) for m in MODELS))
        for i, (t, ended) in enumerate(texts)
        if (ps := tuple(m for m in MODELS if owner[m] == i))
    ]
    margin = st.one_of(st.none(), st.floats(-1.0, 3.0))  # negative: not from a config
    policy = SelectionPolicy(
        draw(st.sampled_from(["mean_ppl", "weighted", "leader", "gate"])),
        leader=draw(st.sampled_from([None, *MODELS])),
        min_support=draw(st.integers(1, 3)),
        repetition_limit=draw(st.integers(0, 2)),
        repetition_ngram=draw(st.integers(1, 3)),
    )
    if policy.leader is not None:
        policy = replace(policy, leader_margin=draw(margin), leader_excess=draw(margin))
    answer = draw(st.sampled_from(["", " the mat.", " the mat. the mat. the rug."]))
    return candidates, policy, answer


@settings(max_examples=600)
@given(steps())
def test_settled_names_the_candidate_select_chooses_whatever_the_scores(step):
    candidates, policy, answer = step
    decided = settled([(c.text, c.proposers) for c in candidates], policy, answer)
    chosen = select(candidates, policy, answer=answer)
    if decided is not None:
        assert decided == (chosen.index, chosen.excluded)


def test_consensus_settles_a_step_where_the_others_disagree():
    policy = SelectionPolicy("weighted", leader="z", min_support=2)
    split = [(" mat.", ("z",)), (" rug.", ("x",)), (" sofa.", ("y",))]
    assert settled(split, policy) == (0, (False, True, True))
    agreeing = [(" mat.", ("z",)), (" rug.", ("x", "y"))]
    assert settled(agreeing, policy) is None  # the weak pair may overrule: scores decide
    assert settled(split, replace(policy, min_support=1)) is None  # no filter: scores decide


def test_a_settled_step_needs_the_leaders_veto_unable_to_exclude_the_winner():
    policy = SelectionPolicy("weighted", leader="z", min_support=2, leader_margin=0.5)
    split = [(" mat.", ("z",)), (" rug.", ("x",))]
    assert settled(split, policy) == (0, (False, True))  # the leader's own: never vetoed
    guard = SelectionPolicy("weighted", repetition_limit=1, repetition_ngram=1)
    # the leader's repeats a word, so the other's is left; with the veto on, the veto
    # may exclude that one too, and then the scores of all decide
    assert settled(split, replace(guard, leader="z"), " mat.") == (1, (True, False))
    assert settled(split, replace(guard, leader="z", leader_margin=0.5), " mat.") is None
