"""Unit tests of batchfit.core.fit_control against a fake executor (no TensorFlow).

The fake device runs a micro-batch when it is at most ``limit`` examples (per replica) and
raises an out-of-memory error otherwise; the executor below drives the controller exactly as
the TensorFlow backend does (see batchfit.backend.tensorflow.fitting).
"""

from __future__ import annotations

import logging
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchfit.core.fit_control import FitController, agree, split_counts
from batchfit.core.shrink import HalvingShrink, MemoryModelShrink
from batchfit.errors import TrainingOutOfMemoryError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeOOM(Exception):
    """What the fake device raises above its limit."""


class FakeDevice:
    """Runs a micro-batch of at most ``limit`` examples; peak = ``fixed + per * size``."""

    def __init__(self, limit: int, fixed: float = 1000.0, per: float = 10.0) -> None:
        self.limit, self.fixed, self.per = limit, fixed, per
        self.ran: list[int] = []
        self.peak = 0.0

    def run(self, size: int) -> None:
        if size > self.limit:
            raise FakeOOM(f"OOM when allocating a batch of {size}")
        self.ran.append(size)
        self.peak = max(self.peak, self.fixed + self.per * size)


def run_batch(c: FitController, device: FakeDevice, n: int, phase: str = "train") -> int:
    """One batch of ``n`` through the controller; returns the examples whose updates ran."""
    c.see_batch(phase, n)
    done = 0
    while True:
        plan = c.plan(phase, n - done)
        accumulate = c.accumulates(phase, plan.steps)
        measure = c.measuring(phase)
        device.peak = 0.0
        ran = 0
        try:
            for size in plan.sizes:
                device.run(size)
                ran += size
                if not accumulate:
                    done += size
        except FakeOOM as exc:
            c.failed(phase, plan.micro_batch_size)
            c.shrink(phase, plan.micro_batch_size, n, str(exc), 0.0,
                     fixed_bytes=lambda: device.fixed)
            continue
        if measure:
            c.measured(phase, plan.micro_batch_size, device.peak)
        c.advance(phase)
        return done if not accumulate else n


def moves(c: FitController) -> list[tuple[str, int, int, int, str]]:
    return [(a.phase, a.from_micro_batch, a.to_micro_batch, a.accumulation_steps, a.reason)
            for a in c.adjustments]


def test_a_batch_that_fits_runs_whole_and_changes_nothing() -> None:
    c, dev = FitController(HalvingShrink(), batch_size=64), FakeDevice(64)
    assert run_batch(c, dev, 64) == 64
    assert dev.ran == [64] and c.adjustments == [] and c.micro("train") == 64
    assert c.observations("train") == [(64, True, 1000.0 + 640)]   # the first plan is measured
    assert not c.measuring("train")


def test_an_oom_halves_until_it_fits_and_accumulates_the_batch() -> None:
    c, dev = FitController(HalvingShrink(), batch_size=64), FakeDevice(20)
    assert run_batch(c, dev, 64) == 64
    assert moves(c) == [("train", 64, 32, 2, "oom"), ("train", 32, 16, 4, "oom")]
    assert dev.ran == [16, 16, 16, 16]
    assert c.limit("train") == 16 and c.plan("train", 64).sizes == (16,) * 4
    assert [s for s, fits, _ in c.observations("train")] == [64, 32, 16]


def test_nothing_left_raises_with_the_fixed_memory() -> None:
    c, dev = FitController(HalvingShrink(), batch_size=4), FakeDevice(0, fixed=3 * 2**20)
    with pytest.raises(TrainingOutOfMemoryError, match="micro-batch of 1 example") as info:
        run_batch(c, dev, 4)
    assert "3.00 MiB" in str(info.value) and info.value.fixed_bytes == 3 * 2**20
    assert moves(c) == [("train", 4, 2, 2, "oom"), ("train", 2, 1, 4, "oom")]


def test_a_policy_answering_the_failed_size_is_held_below_it() -> None:
    class Stubborn:
        def next_size(self, failed, observations):
            return failed

    c = FitController(Stubborn(), batch_size=8)
    dev = FakeDevice(3)
    assert run_batch(c, dev, 8) == 8
    # 8 fails -> 7 (a plan of 2 x 4); 4 fails -> 3 (a plan of 4 x 2)
    assert [(a.from_micro_batch, a.to_micro_batch) for a in c.adjustments] == [(8, 7), (4, 3)]
    assert dev.ran == [2, 2, 2, 2]


def test_the_memory_model_policy_uses_the_measured_peaks() -> None:
    # Peaks of 1000 + 10 b measured at 8 and 16; 64 fails: the line's budget is that of 64,
    # so with headroom 0.1: 0.9 * 1640 = 1476 -> b = 47.
    c = FitController(MemoryModelShrink(), batch_size=64, micro_batch_size=8)
    dev = FakeDevice(50)
    run_batch(c, dev, 64)
    c.adopt("train", 16)
    run_batch(c, dev, 64)
    c.adopt("train", 64)
    run_batch(c, dev, 64)
    assert c.adjustments[-1].to_micro_batch == 47


def test_batches_of_varying_size_follow_the_largest_until_one_fails() -> None:
    c, dev = FitController(HalvingShrink()), FakeDevice(40)
    for n in (8, 32, 16):
        run_batch(c, dev, n)
    assert c.micro("train") == 32 and not c.limited("train") and c.limit("train") is None
    run_batch(c, dev, 64)       # larger than any before: it fails whole, then is split
    assert moves(c) == [("train", 64, 32, 2, "oom")]
    run_batch(c, dev, 48)       # limited now: split, not followed
    assert c.micro("train") == 32 and dev.ran[-2:] == [24, 24]
    assert c.largest_batch("train") == 64 and c.largest_batch("train", 80) == 80


def test_may_run_whole_only_when_no_larger_batch_or_measurement_is_due() -> None:
    c = FitController(HalvingShrink(), batch_size=32)
    assert not c.may_run_whole("train")           # nothing known, a measurement due
    run_batch(c, FakeDevice(32), 32)
    assert c.may_run_whole("train")
    c.adopt("train", 16)
    assert not c.may_run_whole("train")           # measurement due after a change
    run_batch(c, FakeDevice(32), 16)
    assert not c.may_run_whole("train")           # 16 < the largest batch seen, 32
    assert c.micro_batch("train") == 16


def test_evaluation_shrinks_on_its_own_and_never_changes_the_training_plan() -> None:
    c = FitController(HalvingShrink(), batch_size=64)
    run_batch(c, FakeDevice(64), 64)
    run_batch(c, FakeDevice(10), 30, phase="eval")
    assert moves(c) == [("eval", 30, 15, 2, "oom"), ("eval", 15, 7, 5, "oom")]
    assert c.micro("train") == 64 and c.adjustments[0].batch_size == 30
    assert c.clean_epochs == 0 and c.epoch_end() is None and c.clean_epochs == 1


def test_growing_back_after_clean_epochs() -> None:
    c = FitController(HalvingShrink(), batch_size=64, grow_after_epochs=2)
    dev = FakeDevice(20)
    c.epoch_begin(0)
    run_batch(c, dev, 64)
    assert c.epoch_end() is None and c.clean_epochs == 0     # shrunk this epoch
    c.epoch_begin(1)
    run_batch(c, dev, 64)
    assert c.epoch_end() is None and c.clean_epochs == 1
    c.epoch_begin(2)
    grown = c.epoch_end(lambda: 7)
    assert grown is not None and (grown.from_micro_batch, grown.to_micro_batch) == (16, 32)
    assert grown.reason == "grow" and grown.optimizer_step == 7 and grown.epoch == 2
    assert "sizes that failed before: [32, 64]" in grown.detail
    assert c.measuring("train") and c.clean_epochs == 0


def test_no_growth_without_a_limit_or_past_the_batch() -> None:
    c = FitController(HalvingShrink(), batch_size=64, grow_after_epochs=1)
    run_batch(c, FakeDevice(64), 64)
    assert [c.epoch_end() for _ in range(3)] == [None] * 3      # never limited
    c = FitController(HalvingShrink(), batch_size=64, micro_batch_size=48, grow_after_epochs=1)
    assert c.epoch_end().to_micro_batch == 64
    assert c.epoch_end() is None


def test_without_keeping_the_effective_batch_each_micro_batch_is_final_and_warned_once() -> None:
    c, dev = FitController(HalvingShrink(), batch_size=64, keep_effective_batch=False), \
        FakeDevice(20)
    with pytest.warns(UserWarning, match="effective batch size shrinks"):
        assert run_batch(c, dev, 64) == 64
    assert not c.accumulates("train", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_batch(c, FakeDevice(10), 64)


def test_adjustments_are_logged() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test_fit_control")
    logger.addHandler(Keep())
    c = FitController(HalvingShrink(), batch_size=8, logger=logger)
    run_batch(c, FakeDevice(4), 8)
    assert records == [c.adjustments[0].describe()]
    assert "train micro-batch 8 -> 4 (2 x accumulated into batch 8)" in records[0]


# ------------------------------------------------------------------------ replicas, workers


def test_replicas_split_every_share_into_the_same_number_of_parts() -> None:
    c = FitController(HalvingShrink(), batch_size=64, replicas=2)
    c.see_batch("train", 63)
    assert c.plan_replicas("train", [32, 31]).steps == 1
    c.failed("train", 32)
    adj = c.shrink("train", 32, 64, "OOM", 0.0)
    # the policy works per replica (32 -> 16); the record is global (64 -> 32)
    assert (adj.from_micro_batch, adj.to_micro_batch, adj.accumulation_steps) == (64, 32, 2)
    plan = c.plan_replicas("train", [32, 31])
    assert plan.steps == 2 and plan.pieces == ((16, 16), (16, 15)) and plan.micro == 16
    assert c.plan_replicas("train", [5, 0]).pieces == ((5,), (0,))


def test_out_of_memory_per_replica_says_so() -> None:
    c = FitController(HalvingShrink(), batch_size=2, replicas=2)
    with pytest.raises(TrainingOutOfMemoryError, match="example.s. per replica"):
        c.shrink("train", 1, 2, "OOM", 0.0)
    one = FitController(HalvingShrink(), batch_size=2, replicas=1, distributed=True)
    with pytest.raises(TrainingOutOfMemoryError, match="example.s. per replica"):
        one.shrink("train", 1, 2, "OOM", 0.0)
    with pytest.raises(TrainingOutOfMemoryError, match=r"example\(s\): the model"):
        FitController(HalvingShrink(), batch_size=2).shrink("train", 1, 2, "OOM", 0.0)


def test_agreement_takes_the_smallest_proposal() -> None:
    assert agree([(False, 32), (True, 16), (True, 24)]).micro == 16
    a = agree([(True, 0), (False, 8), (True, 3)])
    assert a.exhausted and a.failed == (0, 2) and a.stuck == (0,)
    assert not agree([(False, 8)]).exhausted


def test_workers_agree_through_one_controller_each() -> None:
    """Two workers, one short of memory: both adopt the smaller proposal, the same plan."""
    policy = HalvingShrink()
    workers = [FitController(policy, batch_size=32), FitController(policy, batch_size=32)]
    limits = [32, 10]
    for _ in range(3):
        plans = [w.plan("train", 32) for w in workers]
        ooms = [p.micro_batch_size > lim for p, lim in zip(plans, limits)]
        if not any(ooms):
            break
        proposals = [(oom, w.propose("train", p.micro_batch_size) if oom else w.micro("train")
                      or 32) for w, p, oom in zip(workers, plans, ooms)]
        agreed = agree(proposals)
        for w in workers:
            w.adopt("train", agreed.micro)
    assert [w.micro("train") for w in workers] == [8, 8]
    assert workers[0].plan("train", 32).sizes == (8, 8, 8, 8)


def test_split_counts_allows_empty_parts() -> None:
    assert split_counts(10, 3) == [4, 3, 3]
    assert split_counts(2, 4) == [1, 1, 0, 0]


def test_summary_reports_the_last_plan_globally() -> None:
    c = FitController(HalvingShrink(), batch_size=64, replicas=2)
    assert c.summary() == c.summary(0)
    c.see_batch("train", 64)
    c.shrink("train", 32, 64, "OOM", 0.0)
    s = c.summary()
    assert (s.micro_batch_size, s.accumulation_steps, s.per_replica_batch_size,
            s.per_replica_micro_batch_size, s.replicas) == (32, 2, 32, 16, 2)
    d = FitController(HalvingShrink())
    assert d.summary(24).micro_batch_size == 24 and d.summary(24).accumulation_steps == 1
    assert FitController(HalvingShrink()).summary().micro_batch_size is None


# ------------------------------------------------------------------------------ invariants


@FAST
@given(n=st.integers(1, 300), limit=st.integers(1, 300), keep=st.booleans(),
       memory_model=st.booleans())
def test_every_batch_ends_within_the_device_and_loses_no_example(
        n: int, limit: int, keep: bool, memory_model: bool) -> None:
    policy = MemoryModelShrink() if memory_model else HalvingShrink()
    c = FitController(policy, batch_size=n, keep_effective_batch=keep)
    dev = FakeDevice(limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_batch(c, dev, n) == n
        found = list(c.adjustments)
        for _ in range(2):      # the size found holds: no more failures
            assert run_batch(c, dev, n) == n
    assert c.adjustments == found
    assert all(size <= limit for size in dev.ran)
    shrinks = [a.to_micro_batch for a in c.adjustments]
    assert shrinks == sorted(shrinks, reverse=True) and len(set(shrinks)) == len(shrinks)
    assert all(a.to_micro_batch < a.from_micro_batch for a in c.adjustments)
    assert c.plan("train", n).micro_batch_size <= limit
    assert (n <= limit) == (c.adjustments == [])
    assert len(c.adjustments) == sum(not fits for _, fits, _ in c.observations("train"))


@FAST
@given(rest=st.lists(st.integers(0, 100), min_size=1, max_size=8).filter(any),
       micro=st.integers(1, 400))
def test_replica_plans_cover_each_share_under_the_micro_batch(rest: list[int], micro: int
                                                              ) -> None:
    c = FitController(HalvingShrink(), replicas=len(rest), micro_batch_size=micro)
    plan = c.plan_replicas("train", rest)
    per = max(1, -(-micro // len(rest)))
    assert [sum(p) for p in plan.pieces] == rest
    assert all(len(p) == plan.steps for p in plan.pieces)
    assert plan.micro == max(max(p) for p in plan.pieces) <= min(per, max(rest))


def test_the_summary_reports_the_plan_that_ran_not_the_cap() -> None:
    # Measured (bench_real fit, a KerasHub BERT under 256 MiB): 70 shrank to a cap of 17, and
    # the even split ran 5 micro-batches of 14; History said 17 x 5 (85, not 70).
    c = FitController(HalvingShrink(), batch_size=70, micro_batch_size=17)
    s = c.summary()
    assert (s.micro_batch_size, s.accumulation_steps) == (14, 5)
    assert s.micro_batch_size * s.accumulation_steps == 70
