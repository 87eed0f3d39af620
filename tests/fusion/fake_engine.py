"""A scripted engine for unit tests of the loop: the one fake, at the engine boundary.

It "wants" to write a fixed text. Generation continues that text greedily in its real
tokenizer's tokens (ending with its end token); scoring gives tokens that agree with the
text a high log-probability and others a low one. So its perplexity of a candidate says
how close the candidate is to what it would have written. Asked for the most likely
tokens at a position (``top_logprobs``, ``score_top``), it names the token it wants there
(GOOD) and one other (BAD): its end token, or token 0 where it wants its end token.
Given ``answers``, a generation that samples (temperature > 0) writes the next of them
instead, in turn, from the start of the answer (``sampled`` records each one's sampling),
its tokens as likely as scoring them would say.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from fusion.engine import GREEDY, EngineError, Generation, Sampling, StopCheck, TopLogprobs
from tokenizers_align import TokenizerAdapter

GOOD, BAD = -0.05, -3.0


@dataclass
class FakeState:
    request_id: str
    prompt: list[int]
    committed: list[int] = field(default_factory=list)
    released: bool = False


class ScriptedEngine:
    def __init__(
        self,
        name: str,
        adapter: TokenizerAdapter,
        script: str,
        *,
        end_id: int,
        fail_at_call: int | None = None,
        delay: float = 0.0,
        release_delay: float = 0.0,
        answers: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.answers = list(answers)
        self.sampled: list[Sampling] = []
        self.most_open = 0  # the most states open at once
        self.adapter = adapter
        self.script = script
        self.end_id = end_id
        self.fail_at_call = fail_at_call
        self.delay = delay
        self.release_delay = release_delay
        self.calls = 0
        self.states: list[FakeState] = []
        self.commits: list[list[int]] = []
        self.scored: list[list[list[int]]] = []

    async def _tick(self) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            raise EngineError(f"{self.name} failed on purpose")

    def _written(self, st: FakeState) -> str:
        return self.adapter.decode(st.committed)

    def _rest(self, st: FakeState) -> list[int] | None:
        """Tokens of the script after what is committed (None if it went elsewhere)."""
        written = self._written(st)
        if not self.script.startswith(written):
            return None
        return self.adapter.encode(self.script)[len(self.adapter.encode(written)) :]

    @property
    def open_states(self) -> int:
        return sum(not st.released for st in self.states)

    async def start(self) -> None: ...
    async def check_health(self) -> None: ...
    async def shutdown(self) -> None: ...

    async def open(
        self, request_id: str, prompt_ids: Sequence[int], room: int | None = None
    ) -> FakeState:
        await self._tick()
        st = FakeState(request_id, list(prompt_ids))
        self.states.append(st)
        self.most_open = max(self.most_open, self.open_states)
        return st

    async def generate(
        self,
        state: FakeState,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling = GREEDY,
    ) -> Generation:
        await self._tick()
        rest = self._rest(state)
        sampled = bool(self.answers) and not sampling.greedy
        if sampled:
            rest = self.adapter.encode(self.answers[len(self.sampled) % len(self.answers)])
            self.sampled.append(sampling)
        plan = (rest if rest is not None else self.adapter.encode(" off script")) + [self.end_id]
        out: list[int] = []
        for tok in plan[:max_tokens]:
            out.append(tok)
            if tok in stop_ids or should_stop(out):
                break
        n = sampling.top_logprobs
        # a sampled answer's tokens are as likely as the script makes them
        lps = self._scores(state, out)[0] if sampled else [GOOD for _ in out]
        return Generation(
            tuple(out),
            tuple(lps),
            out[-1] if out[-1] in stop_ids else None,
            top=tuple(self._top(tok, n) for tok in out) if n else (),
        )

    def _top(self, wanted: int, n: int) -> TopLogprobs:
        other = self.end_id if wanted != self.end_id else 0
        return ((wanted, GOOD), (other, BAD))[:n]

    async def score(
        self, state: FakeState, candidates: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        await self._tick()
        self.scored.append([list(c) for c in candidates])
        return [self._scores(state, cand)[0] for cand in candidates]

    async def score_top(
        self, state: FakeState, ids: Sequence[int], n: int
    ) -> tuple[list[float], list[TopLogprobs]]:
        await self._tick()
        self.scored.append([list(ids)])
        lps, wanted = self._scores(state, ids)
        return lps, [self._top(w, n) for w in wanted]

    def _scores(self, state: FakeState, cand: Sequence[int]) -> tuple[list[float], list[int]]:
        """The candidate's log-probs, and the token the script wants at each position
        (its end token once the candidate left the script)."""
        rest = self._rest(state)
        want = (rest or []) + [self.end_id]
        lps, wanted = [], []
        agree = rest is not None
        for j, tok in enumerate(cand):
            wanted.append(want[j] if agree and j < len(want) else self.end_id)
            agree = agree and j < len(want) and want[j] == tok
            lps.append(GOOD if agree else BAD)
        return lps, wanted

    async def commit(self, state: FakeState, ids: Sequence[int]) -> None:
        await self._tick()
        state.committed.extend(ids)
        self.commits.append(list(ids))

    async def release(self, state: FakeState) -> None:
        # real engines may await work here (an abort call), so must the fake: a release
        # that is cancelled half-way would otherwise go unnoticed
        await asyncio.sleep(self.release_delay)
        state.released = True
