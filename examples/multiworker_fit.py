"""Find the batch size every worker can train with, then train on all of them without OOM.

Multi-worker training with ``tf.distribute.MultiWorkerMirroredStrategy``: run this script once
per worker, with the same arguments except ``--worker``. Two workers on one machine, each
with its own emulated device (TensorFlow's CPU allocator capped, so "does not fit" is a real
``ResourceExhaustedError``; oneDNN off, as a capped allocator needs), the second smaller::

    export TF_CPU_ALLOCATOR_USE_BFC=true TF_ENABLE_ONEDNN_OPTS=0 TF_CPP_MIN_LOG_LEVEL=2
    TF_CPU_BFC_MEM_LIMIT_IN_MB=128 python examples/multiworker_fit.py --worker 0 \\
        --ports 23456,23457 &
    TF_CPU_BFC_MEM_LIMIT_IN_MB=16 python examples/multiworker_fit.py --worker 1 \\
        --ports 23456,23457
    wait

Across machines, set ``TF_CONFIG`` on each host instead of ``--worker/--ports`` (see the
TensorFlow guide "Multi-worker training with Keras"), and ``--memory`` to each device's size
if it should not be read from the device (a GPU's total memory, or the CPU cap above).

What it does, on every worker:

1. ``find_max_batch_size_multiworker``: each worker finds its own largest per-replica batch
   (probes in separate processes, under its own budget), then all agree on the smallest one;
2. ``fit_multiworker``: trains at the agreed global batch (``--batch`` overrides it, e.g. a
   size too large for the small worker, to watch an out-of-memory error shrink the
   micro-batch of every worker together while the global batch stays the same).

Keras 3's own ``model.fit`` fails under this strategy (keras-team/keras issue 20585);
``fit_multiworker`` checks that with a one-step probe and uses batchfit's own training step
while it does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURES, CLASSES, EXAMPLES = 128, 10, 16384


def build_model():
    """The model every worker trains (and the probes rebuild): a compiled keras.Model."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((FEATURES,))
    h = keras.layers.Dense(512, activation="relu")(inp)
    h = keras.layers.Dense(512, activation="relu")(h)
    out = keras.layers.Dense(CLASSES)(h)
    model = keras.Model(inp, out, name="multiworker_example")
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def make_data():
    """The same synthetic, learnable data on every worker (each trains on its share)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, CLASSES)).astype("float32")
    return x, np.argmax(x @ w, axis=1).astype("int32")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=int, help="this worker's index (with --ports)")
    ap.add_argument("--ports", help="comma-separated ports of all workers on 127.0.0.1")
    ap.add_argument("--memory", help="this worker's device budget, e.g. 64MiB (default: the "
                                     "CPU allocator cap, or the device's memory)")
    ap.add_argument("--batch", type=int, help="global batch size (default: the agreed safe one)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--upper", type=int, default=1024, help="largest per-replica batch to try")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds any collective may wait for the other workers")
    ap.add_argument("--json", help="write this worker's results here")
    args = ap.parse_args(argv)

    if args.ports is not None:
        if args.worker is None:
            ap.error("--ports needs --worker")
        ports = args.ports.split(",")
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": args.worker}})
    elif "TF_CONFIG" not in os.environ:
        ap.error("pass --worker and --ports, or set TF_CONFIG")

    from batchfit import find_max_batch_size_multiworker, fit_multiworker, make_strategy

    strategy = make_strategy(timeout_seconds=args.timeout)   # first, before other TF work
    found = find_max_batch_size_multiworker(f"{os.path.abspath(__file__)}:build_model", strategy,
                                            args.memory, upper=args.upper)
    print(f"worker {found.worker_index}: own largest per-replica batch "
          f"{found.worker_max_batch_sizes[found.worker_index]}; all workers "
          f"{found.worker_max_batch_sizes}; agreed per-replica {found.per_replica_batch_size} "
          f"(safe {found.safe_per_replica_batch_size}), global {found.global_batch_size} "
          f"(safe {found.safe_global_batch_size})", flush=True)

    batch = args.batch or found.safe_global_batch_size
    with strategy.scope():
        model = build_model()
    x, y = make_data()
    history = fit_multiworker(model, x, y, batch_size=batch, epochs=args.epochs,
                              strategy=strategy, timeout=args.timeout)
    for adj in history.adjustments:
        print(f"worker {history.worker_index}: {adj.describe()}", flush=True)
    print(f"worker {history.worker_index}: {history.optimizer_steps} optimizer steps at global "
          f"batch {history.batch_size} (micro-batch {history.micro_batch_size} x "
          f"{history.accumulation_steps} per replica), loss {history.history['loss']}, "
          f"engine {history.engine}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"search": found.to_dict(), "fit": history.to_dict()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
