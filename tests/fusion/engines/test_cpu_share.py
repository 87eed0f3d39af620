"""The CPUs a process's llama.cpp runtimes share (``CpuShare``): its arithmetic. The
real runtimes taking their share: test_llamacpp_engine.py."""

from __future__ import annotations

import pytest

from fusion.engines.llamacpp_runtime import CpuShare, process_cpus


def test_a_model_alone_at_work_takes_every_cpu_up_to_its_max_threads():
    share = CpuShare(8)
    assert share.threads(1, 8) == 8  # nothing else at work (the caller counts once begun)
    share.begin(1)
    assert share.threads(1, 8) == 8  # itself alone
    assert share.threads(1, 3) == 3  # its max_threads
    share.begin(1)  # a second job of the same runtime: still one runtime at work
    assert share.threads(1, 8) == 8
    share.begin(2)
    assert share.threads(1, 8) == 1  # side by side: each its own threads
    assert share.threads(3, 8) == 3
    share.end(2)
    assert share.threads(1, 8) == 8
    share.end(1)
    share.end(1)
    assert share.at_work() == 0
    share.begin(3)
    share.forget(3)  # a runtime closed with jobs left
    assert share.at_work() == 0


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000", 1)],
)
def test_a_cgroup_cpu_quota_caps_the_process_cpus(tmp_path, cpu_max, cpus):
    """``docker --cpus=1.5`` on a many-core host: the quota, rounded up, not the host's
    cores (the affinity mask still caps it)."""
    f = tmp_path / "cpu.max"
    f.write_text(cpu_max)
    affinity = process_cpus(tmp_path / "absent")
    assert process_cpus(f) == (affinity if cpus is None else min(affinity, cpus))


def test_a_wide_decode_runs_alone_and_a_narrow_one_waits_for_it():
    """Spinning OpenMP barriers must not share the CPUs: no wide decode while a narrow
    one runs, and a narrow one that starts during a wide one waits for its end."""
    import threading

    share = CpuShare(2)
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def narrow_blocker() -> None:
        inside.set()
        release.wait(5)
        order.append("narrow ends")

    t = threading.Thread(target=share.run_narrow, args=(narrow_blocker,))
    t.start()
    assert inside.wait(5)
    assert not share.try_wide()  # a narrow decode is running
    release.set()
    t.join(5)

    assert share.try_wide()
    started = threading.Event()
    finish = threading.Event()

    def wide() -> str:
        started.set()
        finish.wait(5)
        order.append("wide ends")
        return threading.current_thread().name

    caller = threading.Thread(target=lambda: order.append(share.run_wide(wide)))
    caller.start()
    assert started.wait(5)
    assert not share.try_wide()  # one wide decode at a time
    waiter = threading.Thread(target=share.run_narrow, args=(lambda: order.append("narrow"),))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # waits for the wide decode
    finish.set()
    caller.join(5)
    waiter.join(5)
    assert order == ["narrow ends", "wide ends", "llamacpp-wide", "narrow"] or order == [
        "narrow ends",
        "wide ends",
        "narrow",
        "llamacpp-wide",
    ]
    assert share.try_wide()  # free again


def test_an_error_on_the_wide_thread_is_raised_to_the_caller_and_frees_it():
    share = CpuShare(2)
    assert share.try_wide()

    def boom() -> None:
        raise RuntimeError("decode failed")

    with pytest.raises(RuntimeError, match="decode failed"):
        share.run_wide(boom)
    assert share.try_wide()
