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


def test_model_object_is_probed_and_left_untouched() -> None:
    from batchfit.examples.models import seed_sequence

    model = seed_sequence()
    before = [np.array(v.numpy(), copy=True) for v in model.variables]
    r = batchfit.find_max_batch_size(model, memory="48MiB", upper=4096)
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
