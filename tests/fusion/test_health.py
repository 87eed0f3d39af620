"""Deadlines, ejection and return of source models (fusion/health.py, fusion/members.py),
against the scripted engine: a model is late by its own usual time, not its peers'."""

from __future__ import annotations

import asyncio
import time

import pytest

from fusion.engine import EngineError, RequestRejected
from fusion.health import CallTimes, FaultPolicy, MemberHealth
from fusion.loop import Fuser, FusionError
from fusion.types import FusionOutcome, FusionParams, Prompt

CHAT = Prompt(messages=({"role": "user", "content": "Say it."},))
SCRIPT = "The cat sat on the mat and looked at the dog."
FAST = FaultPolicy(
    deadline_floor_seconds=0.2,
    deadline_factor=5.0,
    warmup_calls=3,
    eject_seconds=0.3,
    max_eject_seconds=1.0,
    probe_timeout_seconds=0.5,
)


class Events(list[tuple[str, str]]):
    def __call__(self, event: str, name: str) -> None:
        self.append((event, name))


async def answer(fuser: Fuser, **params: object) -> tuple[FusionOutcome, float]:
    outcome = FusionOutcome()
    started = time.perf_counter()
    async for _ in fuser.run(CHAT, FusionParams(**params), outcome):  # type: ignore[arg-type]
        pass
    return outcome, time.perf_counter() - started


class Hangs:
    """An engine whose model work (generate, score, commit: not open, which may wait in
    line for room) hangs while ``hung`` is set, like a paused process."""

    def __init__(self, inner) -> None:
        self.inner, self.hung = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def _wait(self) -> None:
        if self.hung:
            await asyncio.sleep(60)

    async def generate(self, *args, **kw):
        await self._wait()
        return await self.inner.generate(*args, **kw)

    async def score(self, *args, **kw):
        await self._wait()
        return await self.inner.score(*args, **kw)

    async def commit(self, *args, **kw):
        await self._wait()
        return await self.inner.commit(*args, **kw)


def trio(make_model, delays=(0.0, 0.0, 0.0)):
    import dataclasses

    names = ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")
    models = [make_model(n, SCRIPT, delay=d) for n, d in zip(names, delays)]
    return [dataclasses.replace(m, engine=Hangs(m.engine)) for m in models]


async def test_a_hung_model_costs_its_own_deadline_then_is_ejected_and_skipped(make_model):
    models = trio(make_model, delays=(0.0, 0.01, 0.0))
    events = Events()
    fuser = Fuser(models, faults=FAST, listener=events)
    await answer(fuser)  # learns each model's usual times
    models[1].engine.hung = True  # (its step timeout is the default: none)
    outcome, took = await answer(fuser)
    assert outcome.text == SCRIPT
    assert "deadline" in (outcome.usage["gemma3-270m"].dropped or "")
    assert took < 2.0  # the floor (0.2 s), not the hang
    assert events[:2] == [("dropped_late", "gemma3-270m"), ("ejected", "gemma3-270m")]
    assert fuser.members.report()["gemma3-270m"]["state"] == "ejected"
    # the next request leaves it out at once: no call waits for it
    outcome, took = await answer(fuser)
    assert outcome.usage["gemma3-270m"].dropped.startswith("ejected since")
    assert took < 1.0
    await fuser.close()


async def test_an_ejected_model_returns_after_its_probe_answers(make_model):
    models = trio(make_model)
    events = Events()
    fuser = Fuser(models, faults=FAST, listener=events)
    await answer(fuser)
    models[2].engine.hung = True
    await answer(fuser)
    await asyncio.sleep(FAST.eject_seconds + 0.2)  # one probe, which times out: longer out
    assert fuser.members.report()["qwen2.5-0.5b"]["state"] == "ejected"
    models[2].engine.hung = False
    for _ in range(40):
        if fuser.members.report()["qwen2.5-0.5b"]["state"] == "up":
            break
        await asyncio.sleep(0.05)
    assert events[-1] == ("returned", "qwen2.5-0.5b")
    assert [e for e, n in events].count("ejected") == 1  # logged and counted once
    outcome, _ = await answer(fuser)
    assert outcome.usage["qwen2.5-0.5b"].dropped is None
    assert outcome.usage["qwen2.5-0.5b"].generated_tokens > 0
    await fuser.close()


async def test_a_model_slower_than_its_peers_but_as_usual_is_never_dropped(make_model):
    """A deadline relative to the peers would eject a healthy slow member: here one takes
    30 times as long as the others (past the floor), every step, and stays."""
    models = trio(make_model, delays=(0.0, 0.0, 0.03))
    policy = FaultPolicy(deadline_floor_seconds=0.01, deadline_factor=3.0, warmup_calls=2)
    events = Events()
    fuser = Fuser(models, faults=policy, listener=events)
    for _ in range(3):
        outcome, _ = await answer(fuser)
        assert not [u.dropped for u in outcome.usage.values() if u.dropped]
    assert events == []


async def test_load_that_slows_every_model_alike_drops_none(make_model):
    """Every model 8 times slower than it was (a burst of load on a shared machine):
    past each one's own deadline, but its peers were as late, so nobody is dropped."""
    models = trio(make_model, delays=(0.01, 0.01, 0.01))
    policy = FaultPolicy(deadline_floor_seconds=0.01, deadline_factor=3.0, warmup_calls=2)
    events = Events()
    fuser = Fuser(models, faults=policy, listener=events)
    await answer(fuser)
    for m in models:
        m.engine.inner.delay = 0.08
    outcome, _ = await answer(fuser)
    assert not [u.dropped for u in outcome.usage.values() if u.dropped]
    assert events == []


async def test_the_same_model_slowed_alone_is_dropped(make_model):
    """The counterpart of the test above: one model 8 times slower, its peers as usual."""
    models = trio(make_model, delays=(0.01, 0.01, 0.01))
    policy = FaultPolicy(deadline_floor_seconds=0.01, deadline_factor=3.0, warmup_calls=2)
    fuser = Fuser(models, faults=policy)
    await answer(fuser)
    models[0].engine.inner.delay = 0.08
    outcome, _ = await answer(fuser)
    assert "deadline" in (outcome.usage["smollm2-135m"].dropped or "")
    await fuser.close()


class FailsEveryOtherCall:
    """An engine whose every other generate or score fails, like a flapping server."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _flap(self) -> None:
        self.calls += 1
        if self.calls % 2 == 0:
            raise EngineError("HTTP 500 on purpose")

    async def generate(self, *args, **kw):
        self._flap()
        return await self.inner.generate(*args, **kw)

    async def score(self, *args, **kw):
        self._flap()
        return await self.inner.score(*args, **kw)


async def test_a_model_failing_every_other_call_is_ejected_longer_and_no_request_fails(
    make_model,
):
    import dataclasses

    models = trio(make_model)
    flapping = FailsEveryOtherCall(models[1].engine)
    models[1] = dataclasses.replace(models[1], engine=flapping)
    policy = FaultPolicy(eject_seconds=0.05, max_eject_seconds=0.4, probe_timeout_seconds=0.5)
    events = Events()
    fuser = Fuser(models, faults=policy, listener=events)
    backoffs = []
    for _ in range(12):
        outcome, _ = await answer(fuser)
        assert outcome.text == SCRIPT  # never fails
        backoffs.append(fuser.members.health["gemma3-270m"].backoff)
        await asyncio.sleep(0.05)
    assert ("ejected", "gemma3-270m") in events
    assert max(backoffs) > policy.eject_seconds  # it came back, failed again: out longer
    await fuser.close()


async def test_a_model_alone_past_its_deadline_is_an_error_not_a_hang(make_model):
    [model] = trio(make_model)[2:]
    fuser = Fuser([model], faults=FAST)
    await answer(fuser)
    model.engine.hung = True
    started = time.perf_counter()
    with pytest.raises(FusionError, match="deadline"):
        await answer(fuser)
    assert time.perf_counter() - started < 2.0
    with pytest.raises(FusionError, match="ejected since"):  # at once, while ejected
        await answer(fuser)
    await fuser.close()


def test_usual_time_is_a_high_percentile_per_unit_after_warmup():
    times = CallTimes(window=10)
    times.observe("score", 10, 1.0)
    assert times.usual("score", 10, warmup=2) is None
    for _ in range(8):
        times.observe("score", 10, 1.0)
    times.observe("score", 1, 5.0)  # one outlier of ten: above the 90th percentile's rank
    assert times.usual("score", 20, warmup=2) == pytest.approx(2.0)
    assert times.usual("generate", 20, warmup=2) is None  # kinds are separate


def test_ejections_double_while_flapping_and_start_afresh_once_forgiven():
    policy = FaultPolicy(eject_seconds=1.0, max_eject_seconds=3.0, forgive_seconds=0.05)
    h = MemberHealth(policy)
    assert h.fault("x") and h.backoff == 1.0
    # more requests report the same fault: one ejection, not a longer one
    assert not h.fault("x again") and h.backoff == 1.0 and h.report()["error"] == "x again"
    h.probe_failed("y")
    assert h.backoff == 2.0 and h.report()["error"] == "y"  # the probe failed: longer
    h.restore()
    started_before = time.monotonic() - 1.0
    assert not h.fault("late call of before", since=started_before)  # not a new fault
    assert h.state == "up"
    assert h.fault("z") and h.backoff == 3.0  # failed again soon after return: capped
    assert h.report()["error"] == "z"
    h.restore()
    time.sleep(0.06)
    assert h.fault("w") and h.backoff == 1.0


class Refuses:
    """An engine that refuses the input of its next ``n`` generates, as a remote
    answers 400."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n = inner, n

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, *args, **kw):
        if self.n > 0:
            self.n -= 1
            raise RequestRejected("HTTP 400: this prompt, not the model")
        return await self.inner.generate(*args, **kw)


async def test_a_refused_request_drops_the_model_from_it_alone_and_ejects_nothing(make_model):
    import dataclasses

    models = trio(make_model)
    models[0] = dataclasses.replace(models[0], engine=Refuses(models[0].engine, 1))
    events = Events()
    fuser = Fuser(models, faults=FAST, listener=events)
    outcome, _ = await answer(fuser)
    assert "HTTP 400" in (outcome.usage["smollm2-135m"].dropped or "")
    assert events == [("dropped_failed", "smollm2-135m")]  # counted, not ejected
    assert fuser.members.report()["smollm2-135m"] == {"state": "up"}
    outcome, _ = await answer(fuser)  # the next request has it
    assert outcome.usage["smollm2-135m"].dropped is None
    await fuser.close()


async def test_two_hung_models_are_dropped_at_their_deadlines_once_the_third_answers(make_model):
    models = trio(make_model)
    fuser = Fuser(models, faults=FAST)
    await answer(fuser)
    models[0].engine.hung = models[1].engine.hung = True
    outcome, took = await answer(fuser)
    assert outcome.text == SCRIPT
    for name in ("smollm2-135m", "gemma3-270m"):
        assert "deadline" in (outcome.usage[name].dropped or "")
    assert took < 2.0  # not the hang (60 s)
    await fuser.close()


async def test_calls_that_do_no_work_teach_no_usual_time(make_model):
    """Under the gate a confident leader writes alone: the others are not asked, and
    their instant non-answers must not make their usual time zero."""
    from fusion.types import SelectionPolicy

    models = trio(make_model)
    fuser = Fuser(models, faults=FAST)
    gate = SelectionPolicy("gate", leader="qwen2.5-0.5b")
    for _ in range(4):
        outcome, _ = await answer(fuser, selection=gate)
        assert outcome.usage["smollm2-135m"].generated_tokens == 0  # never asked
    times = fuser.members.times
    assert times["smollm2-135m"].usual("generate", 1, warmup=1) is None
    assert times["smollm2-135m"].usual("first", 1, warmup=1) is None
    assert times["qwen2.5-0.5b"].usual("generate", 1, warmup=1) is not None
    await fuser.close()


async def test_a_model_that_refuses_every_request_is_ejected_after_three(make_model):
    import dataclasses

    models = trio(make_model)
    models[0] = dataclasses.replace(models[0], engine=Refuses(models[0].engine, 99))
    events = Events()
    fuser = Fuser(models, faults=FAST, listener=events)
    for _ in range(3):
        outcome, _ = await answer(fuser)
        assert "HTTP 400" in (outcome.usage["smollm2-135m"].dropped or "")
    assert events == [("dropped_failed", "smollm2-135m")] * 3 + [("ejected", "smollm2-135m")]
    await fuser.close()


async def test_under_the_gate_two_hung_members_are_dropped_once_the_leader_has_proposed(
    make_model,
):
    """The leader proposes first and the others after it: in that second call the
    leader does no work, and still counts as a peer that has finished."""
    from fusion.types import SelectionPolicy

    models = trio(make_model)
    unsure = SelectionPolicy("gate", leader="qwen2.5-0.5b", gate_threshold=0.99)
    fuser = Fuser(models, faults=FAST)
    await answer(fuser, selection=unsure)
    await answer(fuser, selection=unsure)
    models[0].engine.hung = models[1].engine.hung = True
    outcome, took = await answer(fuser, selection=unsure)
    assert outcome.text == SCRIPT
    for name in ("smollm2-135m", "gemma3-270m"):
        assert "deadline" in (outcome.usage[name].dropped or "")
    assert took < 2.0  # not the hang (60 s)
    await fuser.close()


async def test_cool_rerank_left_with_one_member_writes_its_answer_once(make_model):
    """Its partner ejected, Cool+R has nothing to rerank: it answers as cool, segment by
    segment, instead of writing the same member's answer a second time to choose it."""
    models = trio(make_model)[1:]  # a pair: gemma3-270m and qwen2.5-0.5b
    fuser = Fuser(models, faults=FAST)
    await answer(fuser, method="cool_rerank")  # learns the usual times
    models[0].engine.hung = True
    await answer(fuser, method="cool_rerank")  # gemma3-270m late: ejected
    assert fuser.members.report()["gemma3-270m"]["state"] == "ejected"
    segments = []
    outcome = FusionOutcome()
    params = FusionParams(method="cool_rerank")
    async for seg in fuser.run(CHAT, params, outcome):
        segments.append(seg)
    alone, _ = await answer(fuser, method="cool")
    assert outcome.text == alone.text == SCRIPT
    assert len(segments) > 1  # cool's segments, not one reranked answer
    assert all("fusion" not in c.proposers for s in segments for c in s.candidates)
    used = outcome.usage["qwen2.5-0.5b"].generated_tokens
    assert used == alone.usage["qwen2.5-0.5b"].generated_tokens  # once, not twice
    await fuser.close()
