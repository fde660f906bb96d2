"""``distribute=`` on JAX: keras.distribution.DataParallel over two CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set before JAX starts: so in a child
process). max probes one replica and reports replicas; the per-replica answer is the
single-device one."""

from __future__ import annotations

import pytest
from jax_children import run_on_two_devices

pytestmark = pytest.mark.slow

CHILD = """
import json, os
import batchfit, jax, keras
spec = "batchfit.examples.models:seed_sequence"
one = batchfit.find_max_batch_size(spec, memory="2MiB", granularity=32, isolate="none")
dp = batchfit.find_max_batch_size(spec, memory="2MiB", granularity=32, isolate="none",
                                  distribute="data_parallel")
given = keras.distribution.DataParallel(devices=jax.devices())
from batchfit.backend import get_backend
b = get_backend()
print(json.dumps({"devices": len(jax.devices()), "one": one.max_batch_size,
                  "dp": dp.max_batch_size, "replicas": dp.replicas,
                  "distribute": dp.distribute, "notes": dp.notes,
                  "given": b.num_replicas(b.resolve_distribute(given)),
                  "memory_note": b.smallest_device_memory(given)[1]}))
"""


def test_data_parallel_probes_one_replica_and_counts_two() -> None:
    r = run_on_two_devices(CHILD)
    assert r["devices"] == 2 and r["replicas"] == 2 and r["given"] == 2
    assert r["distribute"] == "data_parallel" and r["dp"] == r["one"] > 0
    assert any("2 replica(s)" in n for n in r["notes"])
    assert "pass memory=" in r["memory_note"]


def test_an_unknown_distribution_is_bad_input() -> None:
    from batchfit.backend import get_backend
    from batchfit.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="data_parallel"):
        get_backend().resolve_distribute("parameter_server")


TUNE_CHILD = """
import json, jax, keras, numpy as np, batchfit
from jax.sharding import PartitionSpec
from batchfit.backend.jax.step import StepRunner
from batchfit.examples import models
dp = keras.distribution.DataParallel(devices=jax.devices())
timing = dict(window_seconds=0.02, windows=2, max_windows=2)
t = batchfit.tune("batchfit.examples.models:seed_mlp", memory="64MiB", isolate="none",
                  distribute="data_parallel", batch_sizes=[8, 32], **timing)
with dp.scope():                      # a model object built under the distribution
    m = models.seed_mlp()
p = batchfit.profile_throughput(m, [8, 32], warmup_steps=1, **timing)
from batchfit.backend import get_backend
runner = StepRunner(m, get_backend().make_batch_fn(m, None, None, 0)[0], dp)
x, _ = runner.batch(8)
fn = runner.compiled(8, runner.batch(8))
print(json.dumps({
    "tune": {"replicas": t.replicas, "batch": t.batch_size, "per": t.per_replica_batch_size,
             "distribute": t.distribute, "notes": t.notes, "max_replicas": t.max_batch.replicas,
             "timed": [q.batch_size for q in t.throughput.measured()]},
    "profile": {"ok": [q.batch_size for q in p.points if q.outcome == "ok"],
                "notes": p.notes, "first": [q.first_step_seconds for q in p.points]},
    "batch_spec": str(x.sharding.spec), "batch_devices": len(x.sharding.device_set),
    "state_devices": len(runner.fresh_state()[0][0].sharding.device_set),
    "compiled_input": str(fn.input_shardings[0][1][0])}))
"""


def test_tune_under_data_parallel_times_the_global_step_sharded_over_the_devices() -> None:
    r = run_on_two_devices(TUNE_CHILD)
    tune = r["tune"]
    # Global sizes, each replica's share reported, memory searched per replica:
    assert tune["replicas"] == 2 and tune["max_replicas"] == 2
    assert tune["distribute"] == "data_parallel" and tune["timed"] == [8, 32]
    assert tune["per"] * 2 == tune["batch"] and tune["batch"] in (8, 32)
    assert any("2 replicas" in n for n in tune["notes"])
    # A model built in the distribution's scope carries it: timed as Keras's fit runs it,
    assert r["profile"]["ok"] == [8, 32] and all(f > 0 for f in r["profile"]["first"])
    assert any("2 replicas" in n for n in r["profile"]["notes"])
    # ... each global batch sharded along its batch axis, the state on both devices.
    assert r["batch_spec"] == "P('batch',)" and r["batch_devices"] == 2
    assert r["state_devices"] == 2 and "batch" in r["compiled_input"]
