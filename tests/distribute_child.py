"""Child process for tests/test_distribute.py: MirroredStrategy over two logical CPU devices.

Two logical CPU devices must be configured before TensorFlow initializes its devices, so the
scenarios run here, in a fresh process: ``python tests/distribute_child.py SCENARIO...``. The
``fit_*`` scenarios want a capped allocator (``TF_CPU_BFC_MEM_LIMIT_IN_MB``, oneDNN off, set
by the parent) for real out-of-memory errors. Prints one JSON object: scenario -> results.
Not collected by pytest (no ``test_`` prefix). ``small_mlp`` is also a model spec
(``tests/distribute_child.py:small_mlp``) that the memory search's workers import.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import child_support
import keras
import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
FEATURES = 8
REPLICAS = 2


def small_mlp() -> keras.Model:
    """A small MLP, compiled (the spec the memory search's workers build on one device)."""
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(1)])
    m.compile("sgd", "mse")
    return m


def pairwise_model() -> keras.Model:
    """Memory quadratic in the sequence length (see ``child_support.pairwise_model``)."""
    return child_support.pairwise_model(features=FEATURES, metrics=["mae"])


def data(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, length, FEATURES)).astype("float32"),
            rng.normal(size=(n, 1)).astype("float32"))


def _strategy() -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])


def scenario_search() -> dict:
    """find_max_batch_size and tune under MirroredStrategy: global == per replica x 2."""
    import batchfit

    strategy = _strategy()
    with strategy.scope():
        model = small_mlp()
    # A model object built under the strategy: detected (no distribute=), and probed per
    # replica on one device in a worker process.
    r = batchfit.find_max_batch_size(model, memory="256MiB", upper=48, fresh=False)
    spec = f"{HERE / 'distribute_child.py'}:small_mlp"
    t = batchfit.tune(spec, memory="256MiB", distribute="mirrored", upper=4,
                      window_seconds=0.05, windows=2)
    return {"max": r.to_dict(), "tune": t.to_dict(), "tune_replicas": t.replicas,
            "tune_per_replica": t.per_replica_batch_size, "tune_batch": t.batch_size}


class QuarterShrink:
    """A shrink policy (batchfit's interface) that quarters the failed per-replica size.

    Measured peaks of pairwise_model on sequences of 256 (no cap): one device at 32 examples
    19-29 MiB; MirroredStrategy, global 16 (8 per replica) 7.9-9.2 MiB. Under the 14 MiB cap
    of the test, 32 per replica cannot fit even if the replicas' steps happened not to
    overlap, and 8 per replica fits even when they do. Halving would land on 16 per replica,
    which fits or not depending on whether the two replicas' peaks overlap (on a 2-core
    machine under load they sometimes do not), so the test uses this policy to be exact.
    """

    def next_size(self, failed: int, observations=()) -> int | None:
        return None if failed <= 1 else max(1, failed // 4)


def _fit(batch: int, oom_expected: bool) -> dict:
    import batchfit

    strategy = _strategy()
    x, y = data(2 * batch, 256, 1)
    with strategy.scope():
        m = pairwise_model()
    w0 = [w.tolist() for w in m.get_weights()]
    t0 = time.perf_counter()
    h = batchfit.fit(m, x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0,
                     shrink_policy=QuarterShrink())
    return {
        "seconds": time.perf_counter() - t0, "w0": w0,
        "weights": [w.tolist() for w in m.get_weights()],
        "epochs": len(h.history["loss"]), "loss": h.history["loss"],
        "adjustments": [a.to_dict() for a in h.adjustments],
        "micro": h.micro_batch_size, "accumulation": h.accumulation_steps,
        "replicas": h.replicas, "per_replica_micro": h.per_replica_micro_batch_size,
        "per_replica_batch": h.per_replica_batch_size,
        "iterations": int(m.optimizer.iterations.numpy()),
        "accumulation_after": m.optimizer.gradient_accumulation_steps,
    }


def scenario_fit_oom() -> dict:
    """Global batch 64 (32 per replica) overflows the cap at its first step; 16 fits."""
    return _fit(64, True)


def scenario_fit_small() -> dict:
    """Global batch 16: no out-of-memory error (the no-OOM path under the strategy)."""
    return _fit(16, False)


def gated_cnn(size: int = 32) -> keras.Model:
    """A CNN of custom gated convolutions (``Conv2D(x) * sigmoid(Conv2D(x))``), Adam."""

    class GatedConv(keras.layers.Layer):
        def __init__(self, filters: int, **kwargs) -> None:
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(filters, 3, padding="same")
            self.gate = keras.layers.Conv2D(filters, 3, padding="same")

        def call(self, x):
            return self.conv(x) * keras.ops.sigmoid(self.gate(x))

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((size, size, 3)), GatedConv(32), GatedConv(32),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def scenario_fit_gated() -> dict:
    """Issue 20's case, smaller: gated CNN, Adam, one batch of 256 images of 32x32x3 over two
    replicas under a 96 MiB cap. 256 runs out of memory, and so does 128 x 2, an accumulating
    step: zeroing batchfit's own accumulators after it raised "'function' object has no
    attribute 'assign'" (they are tf.Variables, whose ``value`` is a method)."""
    import batchfit

    strategy = _strategy()
    with strategy.scope():
        m = gated_cnn()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 256)
    h = batchfit.fit(m, x, y, batch_size=256, epochs=1, shuffle=False, verbose=0)
    return {"adjustments": [a.to_dict() for a in h.adjustments], "loss": h.history["loss"],
            "iterations": int(m.optimizer.iterations.numpy()),
            "finite": bool(all(np.isfinite(w).all() for w in m.get_weights()))}


def scenario_mw_keras() -> dict:
    """fit_multiworker on Keras's engine (fit works under MirroredStrategy): per-replica sizes."""
    from batchfit.verbs.multiworker_fit import fit_multiworker

    strategy = _strategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    out = {}
    for micro in (None, 8):
        with strategy.scope():
            m = small_mlp()
        h = fit_multiworker(m, x, y, batch_size=32, micro_batch_size=micro, strategy=strategy,
                            shuffle=False, verbose=0)
        out[str(micro)] = {k: getattr(h, k) for k in (
            "engine", "per_replica_batch_size", "micro_batch_size", "accumulation_steps",
            "optimizer_steps")}
    return out


SCENARIOS = {"search": scenario_search, "fit_oom": scenario_fit_oom,
             "fit_small": scenario_fit_small, "mw_keras": scenario_mw_keras,
             "fit_gated": scenario_fit_gated}

if __name__ == "__main__":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)
    print(json.dumps(child_support.run_scenarios(SCENARIOS, sys.argv[1:])))
