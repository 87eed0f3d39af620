"""Where a fusion step's wall time goes: phases, tokenizer work, each model's busy time."""

from __future__ import annotations

import time

from fusion.types import StepTimings


class StepClock:
    """Times one step at a time. ``lap(phase)`` closes a phase; tokenizer work reported
    through ``add_align`` during it is taken out of that phase and counted as ``align``."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.align = 0.0
        self.busy: dict[str, float] = {}
        self.spent: dict[str, float] = {}
        self.started = self.mark = time.perf_counter()
        self.align_mark = 0.0

    def add_align(self, seconds: float) -> None:
        self.align += seconds

    def add_busy(self, model: str, seconds: float) -> None:
        self.busy[model] = self.busy.get(model, 0.0) + seconds

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        align = self.align - self.align_mark
        self.spent[phase] = max(0.0, now - self.mark - align)
        self.mark, self.align_mark = now, self.align

    def timings(self) -> StepTimings:
        wall = time.perf_counter() - self.started
        align = min(self.align, wall)
        named = sum(self.spent.values())
        return StepTimings(
            generate=self.spent.get("generate", 0.0),
            score=self.spent.get("score", 0.0),
            commit=self.spent.get("commit", 0.0),
            align=align,
            other=max(0.0, wall - named - align),
            per_model=tuple(self.busy.items()),
        )
