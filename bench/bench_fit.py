"""Benchmark: what batchfit.fit costs when nothing goes wrong, and how fast it recovers.

1. Steady-state overhead, no out-of-memory error: the step function ``batchfit.fit`` installs
   against Keras's own, in one ``fit`` of one model, alternating step by step (random order
   within each pair), so that load from other processes hits both alike. The first epoch
   (tracing) is not timed. Overhead: ratio of the median step times, minus one.
2. Recovery from one out-of-memory error: in a child process under a capped CPU allocator
   (as in tests/fit_child.py), a fit whose first batch runs out of memory, against the same
   fit started at the micro-batch it ends up with. Reported: the time the failed step cost
   (mostly the allocator waiting and retrying before it gives up) and the total difference.

    python bench/bench_fit.py                    # about 3 minutes on 2 cores
    python bench/bench_fit.py --epochs 2 --skip-oom

Results go to bench/results/fit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _models():
    import keras

    def mlp() -> keras.Model:
        keras.utils.set_random_seed(0)
        inp = keras.Input((256,))
        h = keras.layers.Dense(1024, activation="relu")(inp)
        h = keras.layers.Dense(1024, activation="relu")(h)
        out = keras.layers.Dense(10)(h)
        m = keras.Model(inp, out)
        m.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), metrics=["accuracy"])
        return m

    def cnn() -> keras.Model:
        keras.utils.set_random_seed(0)
        inp = keras.Input((32, 32, 3))
        h = keras.layers.Conv2D(32, 3, activation="relu", padding="same")(inp)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Conv2D(64, 3, strides=2, activation="relu", padding="same")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dropout(0.2)(h)
        out = keras.layers.Dense(10)(h)
        m = keras.Model(inp, out)
        m.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), metrics=["accuracy"])
        return m

    return {"mlp": (mlp, (256,)), "cnn": (cnn, (32, 32, 3))}


def overhead(name: str, batch_size: int, steps: int, epochs: int, seed: int = 0) -> dict:
    """Per-step time of batchfit's step against Keras's own, alternating step by step.

    One model, one ``fit`` call: a callback swaps ``model.train_function`` before every step
    between Keras's compiled function (traced before batchfit's hooks were installed) and
    batchfit's (what :func:`batchfit.fit` installs), in a random order within each pair of
    steps. Load from other processes then hits both alike, which whole-run comparisons on
    this shared machine did not achieve (pairs of runs differed by up to 2x).
    """
    import keras
    import numpy as np

    from batchfit.backend.tensorflow.fitting import FitExecutor
    from batchfit.core.fit_control import FitController
    from batchfit.core.shrink import MemoryModelShrink
    from batchfit.verbs.fit import LOGGER

    build, shape = _models()[name]
    rng = np.random.default_rng(seed)
    n = batch_size * steps
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, 10, size=(n,))
    model = build()
    model.fit(x[: 2 * batch_size], y[: 2 * batch_size], batch_size=batch_size, epochs=1,
              verbose=0)  # traces Keras's own step function (without batchfit's hooks)
    keras_fn = model.train_function
    control = FitController(MemoryModelShrink(), batch_size=batch_size, logger=LOGGER)
    run = FitExecutor(model, control, logger=LOGGER)
    run.install()
    ours = model.train_function
    order = np.random.default_rng(seed + 1)

    class Alternate(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: dict[str, list[float]] = {"keras": [], "batchfit": []}
            self.cpu: dict[str, list[float]] = {"keras": [], "batchfit": []}
            self.epoch = 0
            self.pair: list[str] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if not self.pair:
                self.pair = list(order.permutation(["keras", "batchfit"]))
            self.which = self.pair.pop()
            model.train_function = ours if self.which == "batchfit" else keras_fn
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, batch, logs=None):
            dt, dc = time.perf_counter() - self._t, time.process_time() - self._c
            if self.epoch > 0:  # the first epoch traces batchfit's function
                self.times[self.which].append(dt)
                self.cpu[self.which].append(dc)

    timer = Alternate()
    try:
        model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[timer],
                  shuffle=False)
    finally:
        run.uninstall()
    k, b = np.array(timer.times["keras"]), np.array(timer.times["batchfit"])
    kc, bc = np.array(timer.cpu["keras"]), np.array(timer.cpu["batchfit"])
    row = {
        "model": name, "batch_size": batch_size, "steps_per_epoch": steps,
        "timed_steps_each": int(min(len(k), len(b))),
        "keras_step_ms_median": round(1000 * float(np.median(k)), 3),
        "batchfit_step_ms_median": round(1000 * float(np.median(b)), 3),
        "overhead_median": round(float(np.median(b) / np.median(k) - 1), 4),
        "overhead_mean": round(float(b.mean() / k.mean() - 1), 4),
        "extra_ms_per_step_median": round(1000 * float(np.median(b) - np.median(k)), 3),
        "cpu_overhead_mean": round(float(bc.mean() / kc.mean() - 1), 4),
    }
    print(f"{name:4s} b={batch_size:4d} keras {row['keras_step_ms_median']:8.2f} ms/step  "
          f"batchfit {row['batchfit_step_ms_median']:8.2f} ms/step  overhead median "
          f"{row['overhead_median']:+.2%}  mean {row['overhead_mean']:+.2%}  cpu "
          f"{row['cpu_overhead_mean']:+.2%}  "
          f"({row['timed_steps_each']} steps each)", flush=True)
    return row


CHILD = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import batchfit
import fit_child
x, y = fit_child.data(256, 256, 1)
out = {}
m = fit_child.make_model()
t = time.perf_counter()
h = batchfit.fit(m, x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
out["with_oom_s"] = time.perf_counter() - t
out["adjustments"] = [a.to_dict() for a in h.adjustments]
m = fit_child.make_model()
t = time.perf_counter()
batchfit.fit(m, x, y, batch_size=64, micro_batch_size=h.micro_batch_size, epochs=2,
             shuffle=False, verbose=0)
out["without_oom_s"] = time.perf_counter() - t
print(json.dumps(out))
'''


def recovery(cap_mb: int) -> dict:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPU_ALLOCATOR_USE_BFC="true",
               TF_CPU_BFC_MEM_LIMIT_IN_MB=str(cap_mb), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "src"), str(ROOT / "tests")],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (adj,) = out["adjustments"]
    row = {
        "model": "tests/fit_child.py (pairwise scores, 256-long sequences)",
        "cap_mib": cap_mb, "batch_size": 64,
        "adjustment": f"{adj['from_micro_batch']} -> {adj['to_micro_batch']} x "
                      f"{adj['accumulation_steps']}",
        "failed_step_seconds": round(adj["seconds"], 2),
        "fit_with_oom_seconds": round(out["with_oom_s"], 2),
        "fit_started_small_seconds": round(out["without_oom_s"], 2),
        "recovery_cost_seconds": round(out["with_oom_s"] - out["without_oom_s"], 2),
    }
    print(f"recovery: {row['adjustment']}: failed step {row['failed_step_seconds']} s, "
          f"fit {row['fit_with_oom_seconds']} s vs {row['fit_started_small_seconds']} s "
          f"started small", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--skip-oom", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fit.json"))
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch traces and is not timed)")
    import tensorflow as tf

    t0 = time.perf_counter()
    cases = [overhead("mlp", 256, 80, args.epochs),
             overhead("cnn", 64, 60, args.epochs),
             overhead("mlp", 16, 300, args.epochs)]
    result = {
        "benchmark": "batchfit.fit", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "tensorflow": tf.__version__, "python": platform.python_version()},
        "note": ("shared 2-core machine with other jobs running: Keras's and batchfit's step "
                 "functions alternate step by step in one fit (random order in each pair); "
                 "the first epoch (tracing) is not timed"),
        "overhead": cases,
    }
    if not args.skip_oom:
        result["recovery"] = recovery(34)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
