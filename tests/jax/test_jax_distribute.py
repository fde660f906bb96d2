"""``distribute=`` on JAX: keras.distribution.DataParallel over two CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set before JAX starts: so in a child
process). max probes one replica and reports replicas; the per-replica answer is the
single-device one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 2 and r["replicas"] == 2 and r["given"] == 2
    assert r["distribute"] == "data_parallel" and r["dp"] == r["one"] > 0
    assert any("2 replica(s)" in n for n in r["notes"])
    assert "pass memory=" in r["memory_note"]


def test_an_unknown_distribution_is_bad_input() -> None:
    from batchfit.backend import get_backend
    from batchfit.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="data_parallel"):
        get_backend().resolve_distribute("parameter_server")


def test_tune_under_a_distribution_says_it_is_not_on_jax_yet() -> None:
    import jax
    import keras

    import batchfit
    from batchfit.errors import MissingBackendError
    from batchfit.examples import portable

    model = portable.seed_mlp()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    try:
        with pytest.raises(MissingBackendError, match="tune under a keras.distribution"):
            batchfit.profile_throughput(model, [4], window_seconds=0.01, windows=2,
                                        max_windows=2)
    finally:
        keras.distribution.set_distribution(None)
