"""The CPUs a process's llama.cpp runtimes share (``CpuShare``): who decodes wide, who
waits, and what the process may use. The real runtimes taking their share:
test_llamacpp_engine.py."""

from __future__ import annotations

import threading

import pytest

from fusion.engines.llamacpp_runtime import CpuShare, process_cpus

WAIT = 60  # seconds; every event below is set explicitly, this only bounds a failure


def threads_of(share: CpuShare, key: int, own: int = 1, most: int = 8) -> tuple[int, str]:
    """The thread count ``key``'s decode gets now, and the thread it runs on."""
    return share.decode(key, own, most, lambda n: (n, threading.current_thread().name))


def test_a_model_alone_at_work_decodes_wide_up_to_its_max_threads():
    share = CpuShare(8)
    share.begin(1)
    assert threads_of(share, 1) == (8, "llamacpp-wide")
    assert threads_of(share, 1, most=3) == (3, "llamacpp-wide")  # its max_threads
    assert threads_of(share, 1, most=1)[0] == 1  # max_threads = threads: never borrows
    share.begin(1)  # a second job of the same runtime: still alone
    assert threads_of(share, 1)[0] == 8
    share.begin(2)
    assert threads_of(share, 1) == (1, threading.current_thread().name)  # side by side
    assert threads_of(share, 2, own=3)[0] == 3
    share.end(2)
    assert threads_of(share, 1)[0] == 8
    share.end(1)
    share.end(1)
    assert share.at_work() == 0
    share.begin(3)
    share.forget(3)  # a runtime closed (or its loop died) with jobs left
    assert share.at_work() == 0


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 1), ("50000 100000", 1)],
)
def test_a_cgroup_cpu_quota_caps_the_process_cpus(tmp_path, cpu_max, cpus):
    """``docker --cpus=1.5`` on a many-core host: the quota rounded down, not the host's
    cores (the affinity mask still caps it)."""
    f = tmp_path / "cpu.max"
    f.write_text(cpu_max)
    affinity = process_cpus(tmp_path / "absent")
    assert process_cpus(f) == (affinity if cpus is None else min(affinity, cpus))


def test_a_wide_decode_runs_alone_and_a_narrow_one_waits_for_it():
    """Spinning OpenMP barriers must not share the CPUs: no wide decode while a narrow
    one runs, and a narrow one that starts during a wide one waits for its end."""
    share = CpuShare(2)
    share.begin(1)
    inside, release = threading.Event(), threading.Event()

    def narrow_blocker(n: int) -> int:
        inside.set()
        release.wait(WAIT)
        return n

    t = threading.Thread(target=share.decode, args=(2, 1, 2, narrow_blocker))
    t.start()
    assert inside.wait(WAIT)
    assert threads_of(share, 1, most=2)[0] == 1  # alone at work, but a decode runs
    release.set()
    t.join(WAIT)

    started, finish = threading.Event(), threading.Event()
    order: list[str] = []

    def wide(n: int) -> int:
        started.set()
        finish.wait(WAIT)
        order.append(f"wide {n}")
        return n

    caller = threading.Thread(target=share.decode, args=(1, 1, 2, wide))
    caller.start()
    assert started.wait(WAIT)
    waiter = threading.Thread(
        target=lambda: order.append(f"narrow {share.decode(2, 1, 2, lambda n: n)}")
    )
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # waits for the wide decode
    finish.set()
    caller.join(WAIT)
    waiter.join(WAIT)
    assert order == ["wide 2", "narrow 1"]
    assert threads_of(share, 1, most=2)[0] == 2  # the wide thread is free again


def test_a_narrow_decode_stops_waiting_for_a_wide_one_that_never_ends(monkeypatch):
    """A stuck wide decode must not stop every model: past NARROW_WAIT the others decode
    beside it."""
    share = CpuShare(2)
    monkeypatch.setattr(share, "NARROW_WAIT", 0.2)
    share.begin(1)
    started, finish = threading.Event(), threading.Event()

    def stuck(n: int) -> int:
        started.set()
        finish.wait(WAIT)
        return n

    caller = threading.Thread(target=share.decode, args=(1, 1, 2, stuck))
    caller.start()
    assert started.wait(WAIT)
    assert share.decode(2, 1, 2, lambda n: n) == 1  # returned although the wide one runs
    finish.set()
    caller.join(WAIT)


def test_an_error_on_the_wide_thread_is_raised_to_the_caller_and_frees_it():
    share = CpuShare(2)

    def boom(n: int) -> None:
        raise RuntimeError(f"decode failed at {n} threads")

    with pytest.raises(RuntimeError, match="decode failed at 2 threads"):
        share.decode(1, 1, 2, boom)
    assert threads_of(share, 1, most=2) == (2, "llamacpp-wide")
