"""Measurement: the allocator's peak in every step of the user's own ``fit``, near the limit.

Why ``batchfit.core.settle.limit_outcome`` looks at the typical step and not only the largest
peak. For each size, in a fresh process set up as a probe worker is (the capped allocator holding
its budget as one region, one op at a time, a fixed layout and hash seed: ``bench_trust``'s
``worker`` settings), the user's ``model.fit`` runs ``--epochs`` epochs of 4 batches with a
validation batch, and a callback resets and reads the allocator's peak around every training
step. One JSON line per run goes to ``--out``: the per-step peaks (bytes), whether ``fit``
trained, and a summary (the median, 10th and 90th percentile and largest step peak as shares of
the budget) is printed.

    python bench/bench_step_peaks.py --case cnn:256MiB --sizes 340 360 375 380 385 395
    python bench/bench_step_peaks.py --case lstm:16MiB --sizes 280 287 293 --epochs 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def child(spec: str, batch: int, budget: int, epochs: int) -> None:
    """In a fresh process: the user's fit, the peak of every training step; one JSON line."""
    import bench_trust

    bench_trust._fixed_layout()
    from batchfit.backend import get_backend

    backend = get_backend()
    backend.configure_worker("CPU:0", budget)
    import keras
    import tensorflow as tf

    model = backend.load_model(spec)
    batch_fn, _ = backend.make_batch_fn(model, None, None, 0)
    x, y = batch_fn(4 * batch)
    xv, yv = batch_fn(batch)
    peaks: list[int] = []

    class StepPeaks(keras.callbacks.Callback):
        def on_train_batch_begin(self, step, logs=None):
            tf.config.experimental.reset_memory_stats("CPU:0")

        def on_train_batch_end(self, step, logs=None):
            peaks.append(int(tf.config.experimental.get_memory_info("CPU:0")["peak"]))

    t0 = time.perf_counter()
    try:
        model.fit(x, y, batch_size=batch, epochs=epochs, validation_data=(xv, yv), verbose=0,
                  callbacks=[StepPeaks()])
        trained: bool | str = True
    except Exception as exc:  # noqa: BLE001 - recorded
        trained = type(exc).__name__
    print("RESULT " + json.dumps({"batch": batch, "trained": trained, "steps": len(peaks),
                                  "seconds": round(time.perf_counter() - t0, 1),
                                  "peaks": peaks}), flush=True)


def run(case: str, batch: int, epochs: int) -> dict:
    import bench_trust

    from batchfit.backend import get_backend
    from batchfit.core.sizes import parse_size

    name, memory = case.split(":")
    budget = int(parse_size(memory))
    env = dict(os.environ)
    env.update(get_backend().worker_environment("CPU:0", budget))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])
    proc = subprocess.run([sys.executable, __file__, "--child", bench_trust.MODELS[name],
                           str(batch), str(budget), str(epochs)], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"case": case, "batch": batch, "trained": f"exit {proc.returncode}",
                "detail": proc.stderr[-300:]}
    return {"case": case, "budget": budget, "epochs": epochs, **json.loads(line[7:])}


def summary(r: dict) -> str:
    import numpy as np

    p = np.array(r.get("peaks") or [0]) / r.get("budget", 1)
    q10, q50, q90, top = np.quantile(p, [0.1, 0.5, 0.9, 1.0])
    return (f"{r['case']} {r['batch']}: trained={r['trained']} steps={r.get('steps')} "
            f"median {q50:.3f} q10 {q10:.3f} q90 {q90:.3f} max {top:.3f} of the budget")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, help="model:memory, as bench_trust's")
    ap.add_argument("--sizes", type=int, nargs="+", required=True)
    ap.add_argument("--epochs", type=int, default=40, help="epochs of 4 batches (default 40)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_peaks.jsonl"))
    args = ap.parse_args()
    for b in args.sizes:
        r = {**run(args.case, b, args.epochs), "command": " ".join(sys.argv)}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(summary(r), flush=True)


if __name__ == "__main__":
    main()
