"""Look-ahead and prompt-logprob reading shared by the two vLLM engines.

Both the in-process engine (``vllm_engine.py``) and the remote one
(``vllm_remote_engine.py``) score a candidate as one vLLM request on ``context +
candidate`` with ``prompt_logprobs`` while reading the prefix cache
(``skip_reading_prefix_cache=False``). vLLM then computes prompt log-probs only for the
positions it recomputed; the entries of positions served from the cache are left as
uninitialised memory (stale or garbage). The entry for the candidate's j-th token needs
position ``L + j - 1`` recomputed (L = context length); when the cache covered it, the
value is taken from what the state saw before:

- the top log-probs after the context (seen when its last token was generated),
- its own look-ahead (the tokens it generated past the context, with their top-20),

and when neither has it, the caller recomputes the candidate without the cache.

``LookAhead`` is that knowledge, kept per state. Its layout::

    ids / lps / tops   greedy (or sampled) tokens after the committed context, each with
                       its log-prob and the top log-probs at its position
    next_top           top log-probs at the first position after the context
    scored             per scored candidate: the tokens vLLM generated after it
    sampled            False when ``ids`` came from a greedy scoring pass (a sampling
                       request must not replay them)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fusion.engine import Generation, StopCheck

TOP_LOGPROBS = 20  # vLLM's default max_logprobs

Top = dict[int, float]


@dataclass(frozen=True)
class Scored:
    """What a scoring request saw after its candidate: the next tokens, for look-ahead."""

    ids: list[int]
    logprobs: list[float]
    tops: list[Top]


@dataclass
class LookAhead:
    """What a state knows past its committed context (layout in the module docstring)."""

    ids: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    tops: list[Top] = field(default_factory=list)
    sampled: bool = True
    next_top: Top = field(default_factory=dict)
    scored: dict[tuple[int, ...], Scored] = field(default_factory=dict)

    def check(self) -> None:
        """The layout's invariants (cheap)."""
        assert len(self.ids) == len(self.lps) == len(self.tops)

    def for_sampling(self, greedy: bool) -> None:
        """Forget a greedy scoring pass's tokens before a sampled generation."""
        if not greedy and not self.sampled:
            self.ids, self.lps, self.tops = [], [], []

    def push(self, tok: int, top: Top) -> float:
        """Append a generated token with the top log-probs at its position; its log-prob."""
        if not self.ids:
            self.next_top = top
        self.ids.append(tok)
        self.lps.append(top[tok])
        self.tops.append(top)
        return top[tok]

    def record_scored(self, cand: Sequence[int], ids: Sequence[int], tops: list[Top]) -> None:
        """The tokens a scoring request generated after ``cand`` (with their top-k)."""
        ids = list(ids)
        self.scored[tuple(cand)] = Scored(ids, [t[i] for t, i in zip(tops, ids)], tops)

    def commit(self, ids: Sequence[int]) -> None:
        """``ids`` join the context: keep whatever is known after them."""
        ids = list(ids)
        n = len(ids)
        scored = self.scored.get(tuple(ids))
        if self.ids[:n] == ids:
            self.next_top = self.tops[n] if n < len(self.tops) else {}
            self.ids, self.lps, self.tops = self.ids[n:], self.lps[n:], self.tops[n:]
        elif scored is not None:
            self.ids, self.lps, self.tops = scored.ids, scored.logprobs, scored.tops
            self.next_top = scored.tops[0] if scored.tops else {}
            self.sampled = False
        else:
            self.ids, self.lps, self.tops, self.next_top = [], [], [], {}
        self.scored.clear()

    def candidate_logprobs(
        self,
        context_len: int,
        cand: Sequence[int],
        entries: Sequence[Mapping[int, float] | None],
        cached: int,
    ) -> list[float] | None:
        """The candidate's token log-probs, or None when a cached gap leaves one unknown.

        ``entries``: the prompt-logprob entries of the candidate's positions (the last
        ``len(cand)`` of the request's list; fewer or none when vLLM returned fewer);
        ``cached``: how many prompt tokens vLLM read from its prefix cache."""
        out: list[float] = []
        for j, tok in enumerate(cand):
            entry = entries[j] if j < len(entries) else None
            if context_len + j - 1 >= cached and entry is not None and tok in entry:
                out.append(float(entry[tok]))
            elif j == 0 and tok in self.next_top:
                out.append(self.next_top[tok])
            elif j < len(self.ids) and self.ids[: j + 1] == list(cand[: j + 1]):
                out.append(self.lps[j])
            elif (
                0 < j <= len(self.ids)
                and self.ids[:j] == list(cand[:j])
                and j < len(self.tops)
                and tok in self.tops[j]
            ):
                out.append(self.tops[j][tok])
            else:
                return None
        return out


def candidate_entries(plp: Sequence[object], n: int) -> list[object]:
    """The last ``n`` entries of a prompt-logprob list (none if it is shorter)."""
    return list(plp[-n:]) if n and len(plp) >= n else []


@dataclass
class Taker:
    """The tokens of one ``generate`` call: the kept look-ahead replayed first, then the
    ones the engine streams, until a stop id, ``should_stop`` or ``max_tokens``."""

    max_tokens: int
    stop_ids: frozenset[int]
    should_stop: StopCheck
    out: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    reused: int = 0  # of ``out``, tokens replayed from the look-ahead

    def take(self, tok: int, lp: float) -> bool:
        """Add a token; True when the call is over."""
        self.out.append(tok)
        self.lps.append(lp)
        if tok in self.stop_ids or self.should_stop(self.out):
            return True
        return len(self.out) >= self.max_tokens

    def replay(self, look: LookAhead) -> bool:
        """Take the look-ahead kept from earlier calls; True when that already ends it."""
        done = False
        for tok, lp in zip(look.ids, look.lps):
            if self.take(tok, lp):
                done = True
                break
        self.reused = len(self.out)
        return done

    @property
    def left(self) -> int:
        return self.max_tokens - len(self.out)

    def result(self) -> Generation:
        return generation(self.out, self.lps, self.stop_ids, self.reused)


def generation(
    out: list[int], lps: list[float], stop_ids: frozenset[int], reused: int
) -> Generation:
    """A ``Generation`` of ``out`` (ended by a stop id when it is the last token)."""
    stopped = out[-1] if out and out[-1] in stop_ids else None
    return Generation(tuple(out), tuple(lps), stopped_on=stopped, reused=reused)
