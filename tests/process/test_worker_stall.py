"""The stall watch counts a worker's quiet time only inside compiled steps.

A probe process can sit still for seconds outside its steps without waiting on memory: deleting a
``tf.data`` iterator (``fit``'s epoch iterator, at the end of each epoch) joins its autotuning
thread, which wakes only at its next optimization period. Measured before the fix: ResNet50
(64x64) probes under 768 MiB that fitted (peaks ~480 MiB) sat still 1-5 s there, were reported
out of memory, and ``max`` answered 3 where 34 trains. How long that deletion waits depends on
the autotuner's timing, so this test puts a pause it controls at the same kind of place: a model
whose ``reset_metrics`` (called between steps, never inside one) sleeps longer than the watch's
second. The allocator really is capped, and a size far over the budget must still be stopped
within seconds, not after TensorFlow's 10 s wait.
"""

from __future__ import annotations

import sys
import time

import pytest

from batchfit.workers.worker import ModelSource, ProbeWorker, WorkerConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the stall watch reads /proc")

PAUSE_SECONDS = 1.5  # longer than the watch's 1 s; each probe pauses 3 times


def pausing_model():
    """A small MLP (64x32 inputs, two 256-wide layers, Adam) whose ``reset_metrics`` sleeps."""
    import keras

    class PausingSequential(keras.Sequential):
        def reset_metrics(self) -> None:
            time.sleep(PAUSE_SECONDS)  # still, outside any step, as an iterator's deletion is
            super().reset_metrics()

    m = PausingSequential([keras.Input((64, 32)), keras.layers.Dense(256, activation="relu"),
                           keras.layers.Dense(256, activation="relu"), keras.layers.Flatten(),
                           keras.layers.Dense(1)])
    m.compile("adam", "mse")
    return m


def test_quiet_outside_steps_is_not_out_of_memory_and_a_real_wait_still_stops_fast(
        monkeypatch) -> None:
    from batchfit.workers import worker as worker_module

    events: list[dict] = []
    monkeypatch.setattr(worker_module, "EVENTS", events)
    config = WorkerConfig(source=ModelSource.from_model(f"{__file__}:pausing_model"),
                          budget_bytes=64 << 20)
    # Before the fix the warm-up itself (which resets metrics between its steps) was taken for
    # a model whose state fills the budget (NothingFitsError), or the probe for an OOM.
    with ProbeWorker(config, fresh_each_probe=True, prestart=False) as w:
        assert w.stall_seconds == 1.0
        fits = w.probe(8)
        assert fits.fits and fits.outcome == "fits", fits
        assert fits.seconds >= 2 * PAUSE_SECONDS  # it did sit still (twice before its answer)
        oom = w.probe(4096)  # its inputs alone (100 MiB) exceed the budget
        assert oom.outcome == "oom" and "without running" in oom.detail, oom
        # one pause, the batch's synthesis, then 1 s of quiet; TensorFlow alone waits 10 s
        assert oom.seconds < 8.0, oom
    # where the time went, as benchmarks read it: each process's start with the child's own
    # build and warm-up (the first process's warm-up paused too; the second skips it), each
    # probe's round trip
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2, events
    assert starts[0]["warm_up_s"] >= PAUSE_SECONDS > starts[1]["warm_up_s"], events
    probes = [e for e in events if e["event"] == "probe"]
    assert [(e["batch_size"], e["outcome"]) for e in probes] == [(8, "fits"), (4096, "oom")]
    assert probes[0]["seconds"] >= probes[0]["probe_s"] >= 2 * PAUSE_SECONDS, events
