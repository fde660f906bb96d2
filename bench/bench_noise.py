"""Benchmark: the gradient noise scale rises as training progresses (McCandlish et al. 2018).

Task: scikit-learn's bundled handwritten digits (``load_digits``: 1797 8x8 images, 10 classes,
shipped inside the package, no download). Model: an MLP (64-128-10) trained with plain SGD at
batch 32. At chosen epochs, ``batchfit.estimate_noise_scale`` measures ``B_simple`` on the
training set (pairs of batches 16 and 512; the model is left untouched), and a
``NoiseScaleMonitor`` tracks it during training. Results go to bench/results/noise.json and the
plot to bench/results/noise.png.

    pip install -e ".[cpu,plot,bench]"
    python bench/bench_noise.py               # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import itertools

import keras
import numpy as np

import batchfit
from batchfit.backend import get_backend

CHECKPOINTS = (0, 1, 2, 4, 8, 16, 32, 64)
BATCH, LR, SMALL, BIG, PAIRS, SEED = 32, 0.05, 16, 512, 48, 0
MONITOR_BIG, EVERY, WINDOW = 128, 8, 24  # one pair per 8 steps, pooled over the last 24


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this benchmark needs scikit-learn: pip install -e '.[bench]'")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(x))
    x, y = x[order], y[order].astype("int32")
    return x[:1500], y[:1500], x[1500:], y[1500:]


def build() -> keras.Model:
    keras.utils.set_random_seed(SEED)
    m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")], name="digits_mlp")
    m.compile(keras.optimizers.SGD(LR), "sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/noise.json"))
    ap.add_argument("--plot", default=str(ROOT / "bench/results/noise.png"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    x, y, xt, yt = digits()
    model = build()
    monitor = batchfit.NoiseScaleMonitor((x, y), small=SMALL, big=MONITOR_BIG, every=EVERY,
                                         window=WINDOW, seed=SEED)
    points = []
    epoch = 0
    for target in CHECKPOINTS:
        if target > epoch:
            model.fit(x, y, batch_size=BATCH, epochs=target, initial_epoch=epoch,
                      callbacks=[monitor], verbose=0)
            epoch = target
        loss, acc = model.evaluate(x, y, batch_size=256, verbose=0)
        _, test_acc = model.evaluate(xt, yt, batch_size=256, verbose=0)
        r = batchfit.estimate_noise_scale(model, (x, y), small=SMALL, big=BIG, steps=PAIRS,
                                          seed=SEED + target)
        points.append({"epoch": target, "train_loss": loss, "train_accuracy": acc,
                       "test_accuracy": test_acc, "b_simple": r.b_simple, "low": r.low,
                       "high": r.high, "gradient_sq_norm": r.gradient_sq_norm,
                       "trace_sigma": r.trace_sigma, "seconds": round(r.seconds, 2)})
        print(f"epoch {target:>3}  loss {loss:.3f}  test acc {test_acc:.3f}  "
              f"B_simple {r.b_simple:8.1f}  [{r.low:.1f}, {r.high:.1f}]  "
              f"|G|^2 {r.gradient_sq_norm:.3g}  tr {r.trace_sigma:.3g}  ({r.seconds:.1f} s)",
              flush=True)
    rising = all(b["b_simple"] >= a["b_simple"] for a, b in itertools.pairwise(points))
    result = {
        "task": "sklearn load_digits, 1500 train / 297 test, MLP 64-128-10, SGD lr 0.05, "
                f"batch {BATCH}",
        "estimator": {"small": SMALL, "big": BIG, "pairs": PAIRS, "confidence": 0.95},
        "checkpoints": points,
        "monitor": {"small": SMALL, "big": MONITOR_BIG, "every": EVERY, "window": WINDOW,
                    "per_epoch": monitor.records},
        "monotone_rise": rising,
        "rise_factor": points[-1]["b_simple"] / points[0]["b_simple"],
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": get_backend().environment_info(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"B_simple rose x{result['rise_factor']:.1f} from epoch 0 to {CHECKPOINTS[-1]} "
          f"(monotone: {rising}); wrote {args.out} in {result['seconds']} s")
    plot(result, args.plot)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pts = result["checkpoints"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ep = [p["epoch"] for p in pts]
    b = np.array([p["b_simple"] for p in pts])
    lo = np.array([p["low"] for p in pts])
    hi = np.array([p["high"] for p in pts])
    xs = [max(e, 0.5) for e in ep]  # epoch 0 on a log axis
    ax.errorbar(xs, b, yerr=[b - lo, hi - b], marker="o", capsize=3, color="tab:green",
                label="B_simple (estimate_noise_scale, 95% interval)")
    mon = result["monitor"]["per_epoch"]
    ax.plot([r["epoch"] + 1 for r in mon], [r["noise_scale"] for r in mon], color="tab:green",
            alpha=0.35, lw=1, label=f"NoiseScaleMonitor (last {WINDOW} pairs, at epoch end)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (epoch 0 drawn at 0.5)")
    ax.set_ylabel("gradient noise scale (examples)")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["train_loss"] for p in pts], color="tab:gray", ls="--", marker=".",
             label="training loss")
    ax2.set_ylabel("training loss")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
    ax.set_title("digits MLP: the noise scale rises as training progresses")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
