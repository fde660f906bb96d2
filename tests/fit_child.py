"""Child process for tests/test_fit.py: real out-of-memory errors under a capped CPU allocator.

Run as ``python tests/fit_child.py SCENARIO...`` with ``TF_CPU_BFC_MEM_LIMIT_IN_MB`` (and
``TF_ENABLE_ONEDNN_OPTS=0``, ``TF_CPU_ALLOCATOR_USE_BFC=true``) set by the parent. Prints one
JSON object: scenario name -> results. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from child_support import pairwise_model, run_scenarios

import batchfit

FEATURES = 8


def make_model(accumulation: int | None = None) -> keras.Model:
    return pairwise_model(features=FEATURES, counter=True, accumulation=accumulation)


def data(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, length, FEATURES)).astype("float32"),
            rng.normal(size=(n, 1)).astype("float32"))


def mixed_dataset(batch: int, lengths: list[int], seed: int) -> tf.data.Dataset:
    """One batch per entry of ``lengths``: short sequences first, long ones later."""
    batches = [data(batch, t, seed + i) for i, t in enumerate(lengths)]

    def gen():
        yield from batches

    spec = (tf.TensorSpec((None, None, FEATURES), tf.float32), tf.TensorSpec((None, 1), tf.float32))
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    return ds.apply(tf.data.experimental.assert_cardinality(len(lengths)))


def weights(m: keras.Model) -> list:
    return [w.tolist() for w in m.get_weights()]


def scenario_first_batch() -> dict:
    """OOM at the very first batch size: finish, and match the accumulation reference."""
    x, y = data(128, 256, 1)
    m = make_model()
    w0 = m.get_weights()
    t0 = time.perf_counter()
    h = batchfit.fit(m, x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    seconds = time.perf_counter() - t0
    adj = h.adjustments
    k = h.accumulation_steps
    ref = make_model(accumulation=k if k > 1 else None)
    ref.set_weights(w0)
    ref.fit(x, y, batch_size=64 // k, epochs=2, shuffle=False, verbose=0)
    return {
        "seconds": seconds, "epochs": len(h.history["loss"]), "loss": h.history["loss"],
        "adjustments": [a.to_dict() for a in adj], "accumulation": k,
        "micro": h.micro_batch_size, "iterations": int(m.optimizer.iterations.numpy()),
        "accumulation_after": m.optimizer.gradient_accumulation_steps,
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(m.get_weights(),
                                                                    ref.get_weights())),
        "seen": float(m.get_layer("counter").seen.numpy()),
    }


def scenario_mid_epoch() -> dict:
    """Short batches fit at 64, long ones do not: the OOM comes at step 3 of epoch 1."""
    lengths = [16, 16, 16, 256, 256, 16]
    m = make_model()
    w0 = m.get_weights()
    val = mixed_dataset(64, [320, 320], 100)
    batches: list[int] = []
    count = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batches.append(batch))
    h = batchfit.fit(m, mixed_dataset(64, lengths, 10), epochs=2, verbose=0, shuffle=False,
                     validation_data=val, callbacks=[count])
    return {
        "w0": [w.tolist() for w in w0], "weights": weights(m),
        "epochs": len(h.history["loss"]), "loss": h.history["loss"],
        "val_loss": h.history.get("val_loss"),
        "adjustments": [a.to_dict() for a in h.adjustments],
        "iterations": int(m.optimizer.iterations.numpy()),
        "seen": float(m.get_layer("counter").seen.numpy()),
        "callback_batches": batches,
    }


def scenario_batch_one() -> dict:
    """Not even one example fits: the clear error, with the fixed memory."""
    x, y = data(4, 4096, 2)
    m = make_model()
    try:
        batchfit.fit(m, x, y, batch_size=1, epochs=1, verbose=0)
    except batchfit.TrainingOutOfMemoryError as exc:
        return {"raised": type(exc).__name__, "message": str(exc),
                "fixed_bytes": exc.fixed_bytes,
                "is_nothing_fits": isinstance(exc, batchfit.NothingFitsError)}
    return {"raised": None}


def scenario_profile_oom() -> dict:
    """profile_throughput past the limit: 64 sequences of 256 run out of memory (real), the
    larger size is skipped, the smaller ones are measured, the model is left as it was."""
    x, y = data(128, 256, 3)
    m = make_model()
    before = weights(m)
    r = batchfit.profile_throughput(m, [8, 32, 64, 128], data=(x, y), window_seconds=0.1,
                                    windows=3, max_windows=3)
    after = weights(m)
    m.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # and it still trains
    return {"points": [p.to_dict() for p in r.points], "knee": r.knee,
            "weights_unchanged": before == after}


SCENARIOS = {"first_batch": scenario_first_batch, "mid_epoch": scenario_mid_epoch,
             "batch_one": scenario_batch_one, "profile_oom": scenario_profile_oom}

if __name__ == "__main__":
    print(json.dumps(run_scenarios(SCENARIOS, sys.argv[1:])))
