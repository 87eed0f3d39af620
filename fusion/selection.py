"""Selection policies: which candidate segment a fusion step keeps (docs/SELECTION.md).

Each rule is a pure function of the candidates, every scoring model's token
log-probabilities of each candidate, and the policy's settings; it returns the chosen
index and every candidate's aggregate score (lower is better), so the trace can show it.

- ``mean_ppl``: Cool-Fusion (Liu et al., ACL 2025, §2.3): arithmetic mean of the models'
  perplexities, one equal vote each. The default; unchanged from the paper.
- ``weighted``: static per-model weights over perplexities (``aggregate="ppl"``) or over
  mean NLLs (``aggregate="nll"``: a weighted geometric mean of perplexities, so one
  exploding perplexity no longer decides alone).
- ``zscore``: each model's NLL as a z-score against its own calibration mean and spread,
  then (weighted) averaged, as Ensemble-Hub normalises its members' scores.
- ``packllm``: weights from each model's perplexity on the prompt, per request
  (PackLLM-sim, Mavromatis et al. 2024, arXiv:2404.11531: ``λ = softmax(-log PPL_k / τ)``
  with log PPL_k the mean token NLL of the prompt, τ = 1 in their code), applied to the
  candidates' NLLs as PackLLM applies them to the models' logits (a log-linear mix).
- ``leader``: the leader model's perplexity alone (leader-scored selection, ThinkFuse).
- ``gate``: the loop asks the leader first and keeps its segment when every token's
  probability is at least ``gate_threshold`` (GaC's uncertainty gate, 0.5); otherwise the
  step is fused and ``gate_fallback`` chooses. Here that is the fallback rule.

Two filters compose with any rule; a candidate either one excludes cannot win, unless
every candidate is excluded:
- the repetition guard: a candidate whose words close an n-gram already seen
  ``repetition_limit`` times in the answer;
- the leader's veto (``leader_margin``, a trust region around the leader): a candidate
  whose NLL per token under the leader exceeds that of the leader's own candidate by more
  than ``leader_margin`` nats. The others still vote among the rest, so they decide where
  the leader finds several continuations about as likely, and cannot push it onto text it
  finds far less likely. ``leader_excess`` is the same veto on the candidate's summed
  surprise beyond the leader's own per-token rate (nats in all);
- consensus (``min_support: k``): a candidate fewer than k models proposed (the same
  text) is excluded, unless the leader proposed it. With a leader and two weak members
  and k = 2, they overrule the leader only when they agree with each other. It applies to
  segments only: Rerank's whole answers, and Cool+R's fused one, are judged without it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fusion.types import (
    DEFAULT_POLICY,
    Aggregate,
    NllStats,
    PplMode,
    Rule,
    SelectionPolicy,
    perplexity,
)

_MAX_NLL = 700.0  # as fusion.types.perplexity: exp() of more overflows


@dataclass(frozen=True)
class Scored:
    """One candidate with every scoring model's token log-probabilities of it."""

    text: str
    proposers: tuple[str, ...]
    ended: bool
    logprobs: tuple[tuple[str, tuple[float, ...]], ...]  # (scoring model, token log-probs)


@dataclass(frozen=True)
class Selection:
    """A rule's verdict: the chosen candidate and every candidate's aggregate score."""

    index: int
    scores: tuple[float, ...]  # lower is better; the chosen one is the lowest not excluded
    excluded: tuple[bool, ...]  # by the repetition guard or the leader's veto
    rule: Rule


def nll(logprobs: Sequence[float], mode: PplMode = "mean") -> float:
    """Negative log-likelihood per token (``mean``) or in all (``sum``); log of perplexity."""
    if not logprobs:
        return math.inf
    total = -sum(logprobs)
    return min(total / len(logprobs) if mode == "mean" else total, _MAX_NLL)


def _weighted_mean(values: Sequence[tuple[float, float]]) -> float:
    """Mean of ``(weight, value)`` pairs; inf if no weight is positive."""
    total = sum(w for w, _ in values)
    if total <= 0:
        return math.inf
    return sum(w * v for w, v in values if w) / total


def mean_ppl(c: Scored, mode: PplMode = "mean") -> float:
    """The paper's score: the arithmetic mean of the models' perplexities."""
    ppl = [perplexity(lps, mode) for _, lps in c.logprobs]
    return sum(ppl) / len(ppl)


def weighted(
    c: Scored, weights: Mapping[str, float], aggregate: Aggregate, mode: PplMode = "mean"
) -> float:
    """Weighted mean of perplexities, or ``exp`` of the weighted mean NLL (a weighted
    geometric mean of perplexities). Models missing from ``weights`` weigh 1."""
    if aggregate == "ppl":
        return _weighted_mean(
            [(weights.get(n, 1.0), perplexity(lps, mode)) for n, lps in c.logprobs]
        )
    mean = _weighted_mean([(weights.get(n, 1.0), nll(lps, mode)) for n, lps in c.logprobs])
    return math.exp(min(mean, _MAX_NLL))


def zscore(
    c: Scored,
    stats: Mapping[str, NllStats],
    weights: Mapping[str, float],
    mode: PplMode = "mean",
) -> float:
    """Weighted mean over models of ``(NLL - calibration mean) / calibration std``.
    Models without calibration stats do not vote."""
    zs = [
        (weights.get(n, 1.0), (nll(lps, mode) - stats[n].mean) / stats[n].std)
        for n, lps in c.logprobs
        if n in stats and stats[n].std > 0
    ]
    return _weighted_mean(zs)


def leader_nll(c: Scored, leader: str, mode: PplMode = "mean") -> float:
    """The leader's NLL of the candidate (inf if the leader did not score it)."""
    for name, lps in c.logprobs:
        if name == leader:
            return nll(lps, mode)
    return math.inf


def vetoed(
    candidates: Sequence[Scored],
    leader: str | None,
    margin: float | None,
    excess: float | None = None,
) -> tuple[bool, ...]:
    """The leader's veto: which candidates the leader finds more than ``margin`` nats per
    token less likely than its own, or whose tokens together cost it more than ``excess``
    nats beyond its own per-token rate (none when both are off, or the leader proposed
    nothing). The second sees one surprising word in a long candidate, which a per-token
    mean dilutes."""
    none = tuple(False for _ in candidates)
    if leader is None or (margin is None and excess is None):
        return none
    own = [leader_nll(c, leader) for c in candidates if leader in c.proposers]
    if not own or not math.isfinite(own[0]):
        return none
    rate = own[0]

    def veto(c: Scored) -> bool:
        lps = next((lps for name, lps in c.logprobs if name == leader), None)
        if not lps:
            return True  # the leader could not score it
        per_token = nll(lps)
        if margin is not None and per_token > rate + margin:
            return True
        return excess is not None and (per_token - rate) * len(lps) > excess

    return tuple(veto(c) for c in candidates)


def unsupported(proposers: Sequence[str], min_support: int, leader: str | None) -> bool:
    """Consensus: fewer than ``min_support`` models proposed a candidate, and the leader
    was not one of them."""
    return len(proposers) < min_support and (leader is None or leader not in proposers)


def excluded_unscored(
    text: str, proposers: Sequence[str], policy: SelectionPolicy, answer: str
) -> bool:
    """The filters that read no score: consensus and the repetition guard."""
    return unsupported(proposers, policy.min_support, policy.leader) or (
        policy.repetition_limit > 0
        and repeats(answer, text, policy.repetition_ngram) >= policy.repetition_limit
    )


def settled(
    candidates: Sequence[tuple[str, Sequence[str]]], policy: SelectionPolicy, answer: str = ""
) -> tuple[int, tuple[bool, ...]] | None:
    """The candidate ``select`` chooses whatever the scores, and which the filters exclude;
    None when the scores decide. That is when the filters that read no score leave one
    candidate (``(text, proposers)``) and the leader's veto cannot exclude it: the veto is
    off, the leader proposed nothing, or the candidate is the leader's own (which its veto
    never excludes: its rate is the leader's own, unless a margin is negative)."""
    excluded = tuple(excluded_unscored(t, ps, policy, answer) for t, ps in candidates)
    allowed = [i for i, out in enumerate(excluded) if not out]
    if len(allowed) != 1:
        return None  # several to compare, or none (then every candidate is compared)
    index = allowed[0]
    leader = policy.leader
    veto_on = leader is not None and (
        policy.leader_margin is not None or policy.leader_excess is not None
    )
    leader_proposed = any(leader in ps for _, ps in candidates)
    negative = any(m is not None and m < 0 for m in (policy.leader_margin, policy.leader_excess))
    if veto_on and leader_proposed and (negative or leader not in candidates[index][1]):
        return None
    return index, excluded


class Hopeless:
    """Under consensus, a non-leader's segment still being written that can neither win
    nor help another win, so that it may stop (the step is then ``settled`` on the
    leader's candidate, as it would be with that segment written out).

    A segment the leader did not write needs ``min_support`` proposers; the leader's
    always qualifies. Once every other non-leader has finished, a segment whose text so
    far has left the leader's and each finished one's (a character differs before both
    end, the last one it wrote aside) will be a different text from all of them, since a
    candidate is a prefix of what its model writes, or ends the answer with nothing: it
    has one proposer. Only where nothing but consensus filters without scores: greedy
    (a stop changes no later draw), no repetition guard, no negative veto margin."""

    def __init__(self, leader_text: str, others: Sequence[str], min_support: int = 2) -> None:
        self.leader_text = leader_text
        self.others = tuple(others)
        self.min_support = min_support
        # written on the event loop, read on engines' threads: replaced, never mutated
        self.finished: dict[str, str] = {}
        self.stopped = False  # some segment was found hopeless (and stopped)

    @staticmethod
    def applies(policy: SelectionPolicy, greedy: bool, grammar: bool = False) -> bool:
        """Greedy, no grammar (a segment cut to nothing would leave the leader's alone,
        which is scored), consensus, no repetition guard, no negative veto margin."""
        margins = (policy.leader_margin, policy.leader_excess)
        return (
            greedy
            and not grammar
            and policy.min_support >= 2
            and policy.repetition_limit == 0
            and not any(m is not None and m < 0 for m in margins)
        )

    def finish(self, model: str, text: str) -> None:
        self.finished = {**self.finished, model: text}

    def check(self, model: str) -> Callable[[str], bool]:
        """``model``'s test, told its text so far: True once its segment is hopeless."""
        peers = [o for o in self.others if o != model]

        def hopeless(text: str) -> bool:
            done = self.finished
            if any(o not in done for o in peers):
                return False
            # finished peers that agree on a segment (4+ members): it may win, and the
            # step is scored, so every segment is written out as without the stop
            agreed = Counter(t for t in done.values() if t and t != self.leader_text)
            if any(n >= self.min_support for n in agreed.values()):
                return False
            if _left(text, self.leader_text) and all(_left(text, done[o]) for o in peers):
                self.stopped = True
                return True
            return False

        return hopeless


def _left(text: str, other: str) -> bool:
    """``text`` (still growing; its last character aside) differs from ``other`` at a
    character both have."""
    n = min(len(text) - 1, len(other))
    return n > 0 and text[:n] != other[:n]


def leader_ppl(c: Scored, leader: str, mode: PplMode = "mean") -> float:
    """The leader's perplexity of the candidate (inf if the leader did not score it)."""
    for name, lps in c.logprobs:
        if name == leader:
            return perplexity(lps, mode)
    return math.inf


def packllm_weights(prompt_nll: Mapping[str, float], temperature: float = 1.0) -> dict[str, float]:
    """PackLLM-sim importance weights: ``softmax_k(-prompt_nll_k / τ)`` (arXiv:2404.11531;
    their code uses the prompt's mean token cross-entropy and τ = 1). Models whose prompt
    NLL is unknown (a one-token prompt) share the weights equally."""
    finite = {n: v for n, v in prompt_nll.items() if math.isfinite(v)}
    if not finite:
        return {n: 1.0 / len(prompt_nll) for n in prompt_nll} if prompt_nll else {}
    top = max(-v / temperature for v in finite.values())
    exps = {n: math.exp(-v / temperature - top) for n, v in finite.items()}
    total = sum(exps.values())
    return {n: exps.get(n, 0.0) / total for n in prompt_nll}


def rule_for(policy: SelectionPolicy, scorers: set[str]) -> Rule:
    """The rule that judges candidates scored by ``scorers`` under ``policy``: the gate's
    fallback; the paper's mean where the leader, or any calibration, is missing."""
    rule = policy.gate_fallback if policy.rule == "gate" else policy.rule
    if rule == "leader" and (policy.leader is None or policy.leader not in scorers):
        return "mean_ppl"  # the leader is not taking part (a subset, or it was dropped)
    if rule == "zscore" and not scorers & {n for n, _ in policy.calibration}:
        return "mean_ppl"
    return rule


def _score(
    c: Scored,
    policy: SelectionPolicy,
    mode: PplMode,
    prompt_weights: Mapping[str, float] | None,
) -> tuple[float, Rule]:
    rule = rule_for(policy, {n for n, _ in c.logprobs})
    if rule == "weighted":
        return weighted(c, dict(policy.weights), policy.aggregate, mode), rule
    if rule == "zscore":
        return zscore(c, dict(policy.calibration), dict(policy.weights), mode), rule
    if rule == "packllm":
        return weighted(c, prompt_weights or {}, "nll", mode), rule
    if rule == "leader" and policy.leader is not None:
        return leader_ppl(c, policy.leader, mode), rule
    return mean_ppl(c, mode), "mean_ppl"


def select(
    candidates: Sequence[Scored],
    policy: SelectionPolicy = DEFAULT_POLICY,
    mode: PplMode = "mean",
    *,
    answer: str = "",
    prompt_weights: Mapping[str, float] | None = None,
) -> Selection:
    """Choose among ``candidates`` (non-empty) under ``policy``.

    ``answer`` is the text written so far, for the repetition guard; ``prompt_weights``
    are PackLLM's per-request weights. Ties go to the earliest candidate (model order),
    as ``min`` did before policies existed, so ``mean_ppl`` chooses exactly as it did.
    """
    if not candidates:
        raise ValueError("select() needs at least one candidate")
    scored = [_score(c, policy, mode, prompt_weights) for c in candidates]
    scores = tuple(s for s, _ in scored)
    veto = vetoed(candidates, policy.leader, policy.leader_margin, policy.leader_excess)
    excluded = tuple(
        veto[i] or excluded_unscored(c.text, c.proposers, policy, answer)
        for i, c in enumerate(candidates)
    )
    if all(excluded):
        excluded = tuple(False for _ in candidates)
    allowed = [i for i in range(len(candidates)) if not excluded[i]]
    best = min(allowed, key=lambda i: _order(scores[i]))
    return Selection(best, scores, excluded, scored[best][1])


def _order(score: float) -> float:
    return math.inf if math.isnan(score) else score


def repeats(answer: str, addition: str, n: int) -> int:
    """How often the most repeated word n-gram that ends inside ``addition`` had already
    occurred earlier in ``answer + addition`` (0 when ``addition`` adds no word)."""
    if n < 1 or not addition.strip():
        return 0
    words = (answer + addition).split()
    kept = answer.split()  # words the addition leaves as they were
    if kept and not answer[-1].isspace() and not addition[0].isspace():
        kept.pop()  # the addition continues the answer's last word
    seen: Counter[tuple[str, ...]] = Counter()
    worst = 0
    for end in range(n, len(words) + 1):
        gram = tuple(words[end - n : end])
        if end > len(kept):
            worst = max(worst, seen[gram])
        seen[gram] += 1
    return worst


def gate_confident(logprobs: Sequence[float] | None, threshold: float) -> bool:
    """GaC's gate: every token's probability is at least ``threshold``. Unknown log-probs
    (the leader's text does not end on one of its tokens) are never confident."""
    if not logprobs:
        return False
    floor = math.log(threshold) if threshold > 0 else -math.inf
    return all(lp >= floor for lp in logprobs)
