"""What the first worker's report changes for an XLA step's later probes (no TensorFlow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from batchfit.verbs.maxbatch_xla import XLA_STALL_SECONDS, settle_worker


def _worker(stall: float | None) -> SimpleNamespace:
    config = SimpleNamespace(compile_sizes=())
    return SimpleNamespace(stall_seconds=stall, reuse_fits=True, config=config)


def test_an_xla_step_is_watched_longer_and_runs_every_size_fresh() -> None:
    w = _worker(1.0)
    settle_worker(w, {"step_jit": True}, jit=True)
    assert w.stall_seconds == XLA_STALL_SECONDS > 1.0 and w.reuse_fits is False


@pytest.mark.parametrize("stall", [None, 1.0])
def test_a_step_that_is_not_xla_keeps_its_watch_and_reuse(stall: float | None) -> None:
    w = _worker(stall)
    settle_worker(w, {"step_jit": False}, jit=False)
    assert w.stall_seconds == stall and w.reuse_fits is True


def test_a_worker_that_does_not_watch_is_not_made_to() -> None:
    w = _worker(None)  # a GPU, or BATCHFIT_STALL_WATCH=0
    settle_worker(w, {"step_jit": True}, jit=True)
    assert w.stall_seconds is None
