"""find_max_batch_size with its probes in worker processes: crashes, refusals, the model
object left untouched, nothing fitting (moved from tests/integration/test_maxbatch.py)."""

from __future__ import annotations

import numpy as np
import pytest

import batchfit
from batchfit.errors import NothingFitsError

MODELS = "tests/models_for_tests.py"


def test_worker_crash_is_reported_and_the_search_goes_on() -> None:
    seen = []
    r = batchfit.find_max_batch_size(f"{MODELS}:killer_model", memory="256MiB", upper=96,
                                     on_probe=seen.append)
    crashed = [p for p in r.probes if p.outcome == "crashed"]
    assert crashed, [p.outcome for p in r.probes]
    assert all(p.batch_size > 48 for p in crashed)
    assert "SIGKILL" in crashed[0].detail
    assert r.max_batch_size == 48 and r.bracketed
    assert any("killed the worker" in n for n in r.notes)
    assert seen == r.probes


def test_a_layer_that_refuses_large_batches_sets_the_limit() -> None:
    r = batchfit.find_max_batch_size("batchfit.examples.models:seed_memory_aware",
                                     memory="256MiB", upper=200)
    assert r.max_batch_size == 64
    refused = [p for p in r.probes if p.outcome == "refused"]
    assert refused and all(p.batch_size > 64 for p in refused)
    assert "exceeds maximum allowed 64" in refused[0].detail
    assert r.oom_count == 0
    # confirmed in 3 fresh processes (a sharp limit: no step down); a search fit at 64 in a
    # process that had run nothing counts as one of them (shared confirmations)
    confirm = [p.batch_size for p in r.probes if p.phase == "confirm"]
    fresh = [p for p in r.probes if (p.phase == "confirm" or not p.reused) and p.batch_size == 64]
    assert set(confirm) == {64} and len(confirm) <= 3 and sum(p.fits for p in fresh) >= 3
    assert r.band.confirmed and r.band.reliable == 64 and r.band.sometimes == []


def test_model_object_is_probed_and_left_untouched() -> None:
    from batchfit.examples.models import seed_sequence

    model = seed_sequence()
    before = [np.array(v.numpy(), copy=True) for v in model.variables]
    seen: list = []
    try:
        r = batchfit.find_max_batch_size(model, memory="48MiB", upper=4096, on_probe=seen.append)
    except NothingFitsError as exc:  # once in a clean-clone CI run (session 18): say what ran
        ran = [(p.batch_size, p.outcome, p.phase, p.reused, round(p.seconds, 1), p.detail)
               for p in seen]
        pytest.fail(f"{exc}\nprobes: {ran}")
    assert r.max_batch_size > 0
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))
    assert not model.optimizer.built or int(model.optimizer.iterations.numpy()) == 0


def test_nothing_fits_states_the_fixed_cost_against_the_budget() -> None:
    from batchfit.workers.server import fork_server_status

    with pytest.raises(NothingFitsError) as info:
        batchfit.find_max_batch_size(f"{MODELS}:huge_model", memory="56MiB")
    assert info.value.budget_bytes == 56 << 20
    assert "MiB" in str(info.value)
    assert fork_server_status().users == 0  # the failed search let go of its server


def test_confirmation_in_fresh_processes_steps_down_when_the_answer_does_not_hold(
        tmp_path, monkeypatch) -> None:
    # The search's processes accept up to 64; from the moment 64 has fitted, every new process
    # accepts only up to 56 (the marker file): the search's answer fails its confirmation.
    marker = tmp_path / "marker"
    monkeypatch.setenv("BATCHFIT_TEST_MARKER", str(marker))

    def on_probe(p) -> None:
        if p.phase == "search" and p.batch_size == 64 and p.fits:
            marker.touch()

    r = batchfit.find_max_batch_size(f"{MODELS}:marker_limited", memory="256MiB", upper=200,
                                     on_probe=on_probe)
    search = [p for p in r.probes if p.phase == "search"]
    confirm = [p for p in r.probes if p.phase == "confirm"]
    assert max(p.batch_size for p in search if p.fits) == 64
    assert confirm[0].batch_size == 64 and confirm[0].outcome == "refused"
    band = r.band
    assert band is not None and band.confirmed and band.step_downs >= 1
    assert 64 in band.sometimes
    assert 0 < r.max_batch_size == band.reliable <= 56
    # the answer fitted in 3 fresh processes after the step down (a search probe that ran in a
    # process that had run nothing counts as one), and every time it was tried
    fresh = [p for p in r.probes if p.phase == "confirm" or (p.phase == "search"
                                                            and not p.reused)]
    assert sum(p.fits for p in fresh if p.batch_size == r.max_batch_size) == 3
    assert all(p.fits for p in r.probes if p.batch_size == r.max_batch_size)
    assert 0 < r.safe_batch_size <= r.max_batch_size
    assert any("did not hold" in n for n in r.notes)


def test_confirm_zero_skips_confirmation() -> None:
    r = batchfit.find_max_batch_size("batchfit.examples.models:seed_memory_aware",
                                     memory="256MiB", upper=200, confirm=0)
    assert r.max_batch_size == 64 and all(p.phase == "search" for p in r.probes)
    assert r.band is not None and r.band.confirmations == 0 and not r.band.confirmed
    assert r.band.safe_checks == 0  # nor the safe size's check under the default settings


def test_the_safe_size_steps_down_where_the_default_settings_need_more_room() -> None:
    # 64 fits under the workers' settings, only 40 under TensorFlow's defaults (the layer reads
    # the process's inter-op threads): max_batch_size stays the workers' answer, and the safe
    # size, probed in fresh processes under the defaults, steps down until it fits there 3/3.
    r = batchfit.find_max_batch_size(f"{MODELS}:settings_limited", memory="256MiB", upper=200)
    assert r.max_batch_size == 64 and r.band.confirmed
    safe = [p for p in r.probes if p.phase == "safe"]
    assert safe and not safe[0].fits and safe[0].batch_size > 40
    assert "limit 40" in safe[0].detail and not any(p.reused for p in safe)
    assert 0 < r.safe_batch_size <= 40
    assert sum(p.fits for p in safe if p.batch_size == r.safe_batch_size) == 3
    assert all(p.fits == (p.batch_size <= 40) for p in safe)
    assert r.band.safe_checks == 3 and r.band.safe_confirmed
    assert "default CPU settings" in r.band.safe_settings
    assert any("stepped down to" in n and "safe_batch_size" in n for n in r.notes)
