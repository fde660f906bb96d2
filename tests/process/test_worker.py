"""Probe workers: fresh processes forked from a server that imported TensorFlow once, or by exec."""

from __future__ import annotations

import os
import sys
import time

import pytest

from batchfit.workers import server as server_module
from batchfit.workers.server import fork_server_status
from batchfit.workers.worker import ModelSource, ProbeWorker, WorkerConfig

SPEC = "tests/models_for_tests.py:seed_wide"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the fork server and /proc are Linux's")


def _parent(pid: int) -> int:
    from batchfit.workers.stall import stat_fields

    return int(stat_fields(f"/proc/{pid}/stat")[1])  # state, then the parent's pid


def _ended(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie) within ``timeout`` seconds."""
    from batchfit.workers.stall import stat_fields

    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat_fields(f"/proc/{pid}/stat")[0] in ("Z", "X"):
                return True
        except (OSError, IndexError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _worker(**kwargs) -> ProbeWorker:
    config = WorkerConfig(source=ModelSource.from_model(SPEC), budget_bytes=64 << 20)
    return ProbeWorker(config, fresh_each_probe=True, **kwargs)


def test_fresh_workers_are_forked_from_one_server_and_measure_under_the_cap() -> None:
    with _worker() as w:
        assert w.fork_server
        pids = []
        for b in (8, 16, 4096):
            if not w.running:
                w.start()
            pid = w.info["pid"]
            assert _parent(pid) == w.server_pid != os.getpid()
            pids.append(pid)
            probe = w.probe(b)
            assert probe.fits == (b < 4096), probe
        assert len(set(pids)) == 3  # a new process for every probe
        assert w.probe(4096).outcome in ("oom", "at_limit")  # the cap holds in every child


def test_the_server_is_kept_for_the_next_search_with_the_same_environment(monkeypatch) -> None:
    with _worker(prestart=False) as w:
        assert w.probe(8).fits
        server = w.server_pid
    kept = fork_server_status()
    # closing the search keeps its server for the next one...
    assert kept.pid == server and kept.usable
    with _worker(prestart=False) as w:
        assert w.server_pid == server and _parent(w.info["pid"]) == server
        assert w.probe(300).outcome in ("oom", "at_limit")  # over 64 MiB (fits about 240)
    # ...until a search with another environment (here another budget) needs one: its own
    # server, whose children are capped at its budget, and the old one is closed
    monkeypatch.setattr(server_module, "SERVER_IDLE_SECONDS", 0.2)
    config = WorkerConfig(source=ModelSource.from_model(SPEC), budget_bytes=128 << 20)
    with ProbeWorker(config, fresh_each_probe=True, prestart=False) as w:
        assert w.server_pid != server and _parent(w.info["pid"]) == w.server_pid
        assert _ended(server, 10)
        assert w.probe(300).fits
        bigger = w.server_pid
    # ...or it has been idle SERVER_IDLE_SECONDS: then it closes itself
    assert _ended(bigger, 20) and not fork_server_status().usable


def test_without_the_server_each_worker_is_our_own_child() -> None:
    with _worker(fork_server=False) as w:
        assert _parent(w.info["pid"]) == os.getpid()
        assert w.probe(8).fits
        assert w.server_pid is None


def test_a_dead_server_falls_back_to_exec_and_nothing_is_lost() -> None:
    import signal

    with _worker(prestart=False) as w:
        os.kill(w.server_pid, signal.SIGKILL)
        assert _ended(w.server_pid, 10)
        first = w.probe(8)  # the worker it had forked still answers
        assert first.fits, first
        w.start()  # the next one cannot be forked: it is started by exec
        assert not w.fork_server
        assert _parent(w.info["pid"]) == os.getpid()
        second = w.probe(16)
        assert second.fits, second


def test_a_worker_killed_under_the_server_is_reported_as_crashed() -> None:
    import signal

    with _worker(prestart=False) as w:
        os.kill(w.info["pid"], signal.SIGSEGV)
        probe = w.probe(8)
        assert probe.outcome == "crashed" and "SIGSEGV" in probe.detail, probe
        assert w.probe(8).fits  # the next probe gets a new worker from the same server
        assert w.fork_server


def test_a_probe_waiting_on_the_capped_allocator_ends_as_oom_within_seconds() -> None:
    # Far over the budget: TensorFlow's allocator would wait 10 s before raising.
    with _worker(prestart=False) as w:
        probe = w.probe(20000)
        assert probe.outcome == "oom" and not probe.fits, probe
        assert probe.seconds < 8.0, probe
        assert "waited" in probe.detail and "without running" in probe.detail, probe
        assert w.probe(8).fits  # a fresh worker answers the next probe


def test_without_the_stall_watch_the_allocator_waits_its_10_s(monkeypatch) -> None:
    monkeypatch.setenv("BATCHFIT_STALL_WATCH", "0")
    with _worker(prestart=False) as w:
        assert w.stall_seconds is None
        probe = w.probe(4096)
        assert not probe.fits and probe.seconds >= 9.0, probe


def test_a_model_whose_first_step_waits_on_memory_is_stopped_at_start() -> None:
    """The stall watch covers the warm-up steps too (not the model's building, which may wait
    on I/O): Adam's state of huge_model fills 86% of 56 MiB, its first step waits for memory."""
    from batchfit.errors import NothingFitsError

    config = WorkerConfig(source=ModelSource.from_model("tests/models_for_tests.py:huge_model"),
                          budget_bytes=56 << 20)
    with pytest.raises(NothingFitsError) as info, ProbeWorker(config, fresh_each_probe=True,
                                                              prestart=False):
        pass
    # the failed start released the process's fork server (it would stay "in use" otherwise)
    assert fork_server_status().users == 0
    msg = str(info.value)
    # stopped by the watch (the allocator's own error, 10 s later, reads differently)
    assert "sat waiting for memory" in msg and "86% of the budget" in msg, msg
    weights_and_slots = 3 * (2048 * 2048 + 2048) * 4             # Adam: two slots per weight
    assert weights_and_slots <= info.value.fixed_bytes < weights_and_slots + 64  # + scalars


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize("activity, quiet", [
    ("sleep", True),   # no CPU, no thread running: how a wait on the allocator looks
    ("spin", False),   # a long op burning CPU is not a stall
])
def test_quiet_clock_on_a_real_process_tells_a_wait_from_work(activity, quiet) -> None:
    import subprocess

    from batchfit.workers.stall import QuietClock, sample_process

    code = ("import time\nend = time.time() + 3\nwhile time.time() < end: pass"
            if activity == "spin" else "import time; time.sleep(3)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)  # past the interpreter's start-up
        clock = QuietClock()
        longest = 0.0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            sample = sample_process(proc.pid)
            assert sample is not None
            longest = max(longest, clock.update(time.monotonic(), *sample))
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert (longest >= 1.0) == quiet, longest


def test_quiet_clock_rejects_bad_settings() -> None:
    from batchfit.workers.stall import QuietClock

    with pytest.raises(ValueError, match="cpu_fraction"):
        QuietClock(cpu_fraction=1.5)
