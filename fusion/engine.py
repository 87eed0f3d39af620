"""The engine boundary: what the fusion loop needs from one source model's runtime.

Modelled on the paper's worker API (Table 1): M1 ``open`` a state from prompt tokens,
M2 ``generate`` greedily from it, M3 ``score`` token sequences against it (their
log-probabilities), M4 ``commit`` one of them as the new state. Engines keep whatever
they computed on the way (KV caches, tokens generated past a boundary, the next-token
distribution after a scored candidate) so that committing a candidate they already saw
costs nothing. The transformers and vLLM backends implement this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class EngineError(RuntimeError):
    """A source model's engine failed (the request may go on without that model)."""


@dataclass(frozen=True)
class Generation:
    """Tokens generated greedily from a state, with their log-probabilities."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    stopped_on: int | None = None  # the stop token id that ended generation, if any


@dataclass(frozen=True)
class Sampling:
    """How a model picks its tokens: greedy at temperature 0 (the default)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


GREEDY = Sampling()

# Called with all ids generated so far in this call; True stops generation there.
StopCheck = Callable[[Sequence[int]], bool]


@runtime_checkable
class StateHandle(Protocol):
    """Opaque per-request model state owned by an engine."""

    request_id: str


@runtime_checkable
class Engine(Protocol):
    """One source model's runtime."""

    name: str

    async def start(self) -> None:
        """Load the model; called once before any request."""

    async def open(self, request_id: str, prompt_ids: Sequence[int]) -> StateHandle:
        """M1: a new state whose context is ``prompt_ids``."""

    async def generate(
        self,
        state: StateHandle,
        max_tokens: int,
        stop_ids: frozenset[int],
        should_stop: StopCheck,
        sampling: Sampling = GREEDY,
    ) -> Generation:
        """M2: tokens after the state's context (greedy unless ``sampling`` says otherwise),
        until a stop id, ``should_stop`` or ``max_tokens``. Does not change the committed
        context; tokens past what is later committed may be kept as look-ahead."""

    async def score(
        self, state: StateHandle, candidates: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """M3: log-probability of every token of every candidate, each given the
        state's context (all candidates in one batched pass where the engine can)."""

    async def commit(self, state: StateHandle, ids: Sequence[int]) -> None:
        """M4: append ``ids`` to the state's committed context."""

    async def release(self, state: StateHandle) -> None:
        """Free the state and stop any work still running for it."""

    async def check_health(self) -> None:
        """Raise ``EngineError`` when the engine cannot serve."""

    async def shutdown(self) -> None:
        """Free the model."""
