"""find_max_batch_size with real TensorFlow: worker isolation, crashes, limits, clear errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import batchfit
from batchfit.errors import InvalidInputError, NothingFitsError, ProbeFailedError

MODELS = "tests/models_for_tests.py"


@pytest.mark.parametrize("kwargs, words", [
    ({"strategy": "fastest"}, "strategy"),
    ({"granularity": 0}, "granularity"),
    ({"granularity": 2.5}, "granularity"),
    ({"headroom": 1.0}, "headroom"),
    ({"memory": "lots"}, "lots"),
    ({"memory": -5}, "-5"),
    ({"memory": 0}, "0"),
    ({"steps": 0}, "steps"),
    ({"isolate": "thread"}, "isolate"),
    ({"upper": 0}, "upper"),
])
def test_bad_arguments_raise_clear_errors_before_any_probe(kwargs, words) -> None:
    with pytest.raises(InvalidInputError, match=words):
        batchfit.find_max_batch_size(f"{MODELS}:seed_wide", **kwargs)


def test_not_a_model_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="keras.Model"):
        batchfit.find_max_batch_size(42)


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


def test_model_object_is_probed_and_left_untouched() -> None:
    from batchfit.examples.models import seed_sequence

    model = seed_sequence()
    before = [np.array(v.numpy(), copy=True) for v in model.variables]
    r = batchfit.find_max_batch_size(model, memory="48MiB", upper=4096)
    assert r.max_batch_size > 0
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))
    assert not model.optimizer.built or int(model.optimizer.iterations.numpy()) == 0


def test_in_process_search_checks_measured_peaks_against_the_budget() -> None:
    from models_for_tests import seed_wide

    r = batchfit.find_max_batch_size(seed_wide(), memory="32MiB", isolate="none")
    assert r.isolation == "in-process"
    assert any("not enforced" in n for n in r.notes)
    fits = [p for p in r.probes if p.fits]
    assert all(p.peak_bytes < 32 << 20 for p in fits)
    over = [p for p in r.probes if p.outcome in ("over_budget", "at_limit")]
    assert over and min(p.batch_size for p in over) > r.max_batch_size


def test_model_that_cannot_train_at_all_gets_its_own_error() -> None:
    inp = keras.Input((64, 32))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(inp)))
    model.compile("sgd", "mse")
    with pytest.raises(ProbeFailedError, match="reason other than memory"):
        batchfit.find_max_batch_size(  # data with the wrong feature count
            model, memory="64MiB", isolate="none",
            data=(np.zeros((4, 3), "float32"), np.zeros((4, 1), "float32")))


def test_nothing_fits_states_the_fixed_cost_against_the_budget() -> None:
    from batchfit.workers.server import fork_server_status

    with pytest.raises(NothingFitsError) as info:
        batchfit.find_max_batch_size(f"{MODELS}:huge_model", memory="56MiB")
    assert info.value.budget_bytes == 56 << 20
    assert "MiB" in str(info.value)
    assert fork_server_status().users == 0  # the failed search let go of its server
