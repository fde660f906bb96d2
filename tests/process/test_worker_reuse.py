"""A worker reused across ascending fits; the spare processes started ahead; nothing leaks."""

from __future__ import annotations

import itertools
import sys
import time

import pytest

from batchfit.workers.worker import ModelSource, ProbeWorker, WorkerConfig

SPEC = "tests/models_for_tests.py:seed_wide"  # fits about 240 under 64 MiB

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the fork server and /proc are Linux's")


def _ended(pid: int, timeout: float = 10.0) -> bool:
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
    return ProbeWorker(config, fresh_each_probe=True, reuse_fits=True, **kwargs)


def test_ascending_fits_share_a_process_and_anything_after_a_failure_gets_a_fresh_one() -> None:
    ran: list[tuple[int, int, bool, bool]] = []  # (size, pid, fits, reused)
    with _worker() as w:
        for b in (8, 16, 1000, 32, 64, 48):
            p = w.probe(b)
            ran.append((b, w.pid, p.fits, p.reused))
        fresh = w.probe_fresh(96)
        ran.append((96, w.pid, fresh.fits, fresh.reused))
        pids = {pid for _, pid, _, _ in ran}
        spares = [s[0].pid for s in w._spares]
    sizes = {b: (pid, fits, reused) for b, pid, fits, reused in ran}
    assert [sizes[b][1] for b in (8, 16, 1000, 32, 64, 48, 96)] == [True, True, False, True,
                                                                      True, True, True]
    # 8, 16 and the out-of-memory 1000 ran in the first process (16 and 1000 reused it)...
    assert sizes[8][0] == sizes[16][0] == sizes[1000][0]
    assert [sizes[b][2] for b in (8, 16, 1000)] == [False, True, True]
    # ...which was not reused after its out-of-memory error: 32 got a fresh one, 64 reused it
    assert sizes[32][0] != sizes[8][0] and sizes[64][0] == sizes[32][0] and sizes[64][2]
    # a smaller size than the process ran (48 after 64) and a confirmation get fresh ones
    assert sizes[48][0] not in (sizes[8][0], sizes[32][0]) and not sizes[48][2]
    assert sizes[96][0] != sizes[48][0] and not sizes[96][2]
    assert len(pids) == 4
    assert all(_ended(pid) for pid in [*pids, *spares])  # closed: no process left behind


def test_prefetched_spares_serve_the_fresh_probes_and_are_cleaned_up() -> None:
    with _worker() as w:
        assert w.probe(8).fits
        w.prefetch(2)
        ahead = [s[0].pid for s in w._spares]
        assert len(ahead) == 2
        used = []
        for _ in range(2):
            assert w.probe_fresh(8).fits
            used.append(w.pid)
        assert used == ahead  # the processes started ahead ran the confirmations, in order
        left = [s[0].pid for s in w._spares]
        assert len(left) == 2 and not set(left) & set(ahead)  # topped up again
    assert all(_ended(pid) for pid in [*ahead, *left])


def test_a_search_reuses_only_after_smaller_fits_and_confirms_in_fresh_processes(
        monkeypatch) -> None:
    """Within a search (seed_wide, 64 MiB): a probe runs in a reused process only right after
    a smaller size fitted, and only far from the budget; never after an out-of-memory error or
    a larger size; the answer is confirmed in processes that ran nothing before. (Whether
    reuse moves the limit is measured in bench/bench_real.py's max section; the band between
    fresh processes is wider than 1% here: 208 and 212 fresh, 215 and 182 with reuse, in four
    searches.) The confirmations after the first at a size ran in processes that traced
    their step for it while the one before ran; no search probe did (its size is not known
    ahead)."""
    from batchfit.core.confirm import near_the_edge
    from batchfit.verbs.maxbatch_local import search_max_batch_size
    from batchfit.workers import worker as worker_module

    events: list[dict] = []
    monkeypatch.setattr(worker_module, "EVENTS", events)
    r = search_max_batch_size(SPEC, memory=64 << 20, confirm=2)
    prepared = [e.get("prepared", False) for e in events if e["event"] == "probe"]
    assert len(prepared) == len(r.probes), events
    search = [p for p in r.probes if p.phase == "search"]
    assert any(p.reused for p in search)
    for before, p in itertools.pairwise(search):
        if p.reused:
            assert before.fits and before.batch_size < p.batch_size, (before, p)
    # ...and only where the size was predicted clear of the budget: the refinements near the
    # edge ran in fresh processes, as the user's fit will
    nears = [near_the_edge([(q.batch_size, q.peak_bytes) for q in search[:i]
                            if q.fits and q.peak_bytes is not None], p.batch_size, 64 << 20)
             for i, p in enumerate(search)]
    assert not any(p.reused and near for p, near in zip(search, nears)), (search, nears)
    assert any(near and not p.reused for p, near in zip(search, nears))
    confirms = [p for p in r.probes if p.phase == "confirm"]
    assert len(confirms) >= 2 and not any(p.reused for p in confirms)
    assert r.band.confirmed and r.max_batch_size == r.band.reliable
    ran = list(zip(r.probes, prepared))
    assert not any(ready for p, ready in ran if p.phase == "search")
    assert any(ready for p, ready in ran
               if p.phase == "confirm" and p.batch_size == r.max_batch_size), ran


def test_spares_prepare_the_expected_size_and_never_run_another(monkeypatch) -> None:
    # A process started ahead for a known size (expect) traces its step for it while the
    # current probe runs; the probe at that size then starts from there. A spare prepared for
    # one size is not used for another (the confirmation after a failure steps down): it is
    # stopped and the probe gets a process of its own.
    from batchfit.workers import worker as worker_module

    events: list[dict] = []
    monkeypatch.setattr(worker_module, "EVENTS", events)
    with _worker() as w:
        assert w.probe(8).fits
        w.expect(96)
        first = w.probe_fresh(96)  # the spare started during probe(8), before expect
        second = w.probe_fresh(96)  # the one started during `first`, prepared for 96
        prepared_spare = w._spares[0][0].pid
        third = w.probe_fresh(48)
        third_pid = w.pid
    runs = [e["prepared"] for e in events if e["event"] == "probe"]
    assert runs == [False, False, True, False], events
    assert [e.get("prepare") for e in events if e["event"] == "launch"][2:4] == [96, 96]
    assert first.fits and second.fits and third.fits
    # (whether a prepared process measures what a plain one does is bench/bench_prepare.py's:
    # one pair of fresh processes differs by up to 7% at this size, prepared or not)
    assert third_pid != prepared_spare and _ended(prepared_spare)
