"""``batchfit.fit`` under ``keras.distribution.DataParallel`` on two CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set before JAX starts: so in a child
process). The out-of-memory is **injected** per device by a real layer
(``tests/jax_fit_models.py:OutOfMemoryAbove`` with the mesh: every device's shard checked,
a real ``JaxRuntimeError`` while the step runs); JAX on CPU cannot run out of memory."""

from __future__ import annotations

import numpy as np
import pytest
from jax_children import run_on_two_devices

pytestmark = pytest.mark.slow

CHILD = """
import json, jax, keras, numpy as np, batchfit
from batchfit.core.shrink import HalvingShrink
from jax_fit_models import data, model
x, y = data(64)
dp = keras.distribution.DataParallel(devices=jax.devices())
mesh = dp.device_mesh.backend_mesh
def weights(m):
    return [np.array(v.value).tolist() for v in m.trainable_variables]
def fit(m, **kw):
    h = batchfit.fit(m, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                     shrink_policy=HalvingShrink(), **kw)
    return {"adjustments": [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments],
            "micro": h.micro_batch_size, "steps": h.accumulation_steps,
            "replicas": h.replicas, "per_batch": h.per_replica_batch_size,
            "per_micro": h.per_replica_micro_batch_size, "loss": h.history["loss"],
            "iterations": int(np.array(m.optimizer.iterations.value)), "weights": weights(m)}
ref = model()
batchfit.fit(ref, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
runs = {"plain": {"weights": weights(ref)},
        "named": fit(model(limit=4, mesh=mesh), distribute="data_parallel"),
        "given": fit(model(limit=4, mesh=mesh), distribute=dp)}
# 63 examples: the last batch of 31 is not divided by the devices and runs replicated
x63, y63 = data(63)
uneven, single = model(), model()
batchfit.fit(uneven, x63, y63, batch_size=32, shuffle=False, verbose=0, distribute=dp)
batchfit.fit(single, x63, y63, batch_size=32, shuffle=False, verbose=0)
runs["uneven"] = {"weights": weights(uneven), "single": weights(single)}
keras.distribution.set_distribution(dp)
m = model(limit=4, mesh=mesh)   # built under the distribution: its variables replicated
runs["global"] = fit(m)
runs["global"]["evaluate"] = float(m.evaluate(x[:16], y[:16], batch_size=8, verbose=0))
print(json.dumps({"devices": len(jax.devices()), "runs": runs}))
"""


def test_fit_under_data_parallel_shrinks_per_replica_and_keeps_the_global_batch() -> None:
    r = run_on_two_devices(CHILD)
    assert r["devices"] == 2
    plain = r["runs"]["plain"]["weights"]
    for how in ("named", "given", "global"):
        run = r["runs"][how]
        # 16 per replica fails, then 8 (the injected limit is 4 per device); sizes are global
        assert run["adjustments"] == [[32, 16], [16, 8]], how
        assert run["replicas"] == 2 and run["per_batch"] == 16 and run["per_micro"] == 4, how
        assert run["micro"] == 8 and run["steps"] == 4, how
        # One update per global batch of 32 (2 epochs of 64), none lost to the failures ...
        assert run["iterations"] == 4, how
        assert all(np.isfinite(run["loss"])), how
        # ... and the weights of plain single-device training at 32: a lost or half-applied
        # state, or an effective batch not kept, would change them.
        for got, want in zip(run["weights"], plain):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg=how)
    assert np.isfinite(r["runs"]["global"]["evaluate"])
    for got, want in zip(r["runs"]["uneven"]["weights"], r["runs"]["uneven"]["single"]):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg="uneven")
