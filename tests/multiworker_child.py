"""One worker of tests/test_multiworker.py: MultiWorkerMirroredStrategy on 127.0.0.1.

Run as ``python tests/multiworker_child.py INDEX PORT0,PORT1 OUT.json [SCENARIO...]`` with
``TF_CPU_BFC_MEM_LIMIT_IN_MB`` (and ``TF_ENABLE_ONEDNN_OPTS=0``,
``TF_CPU_ALLOCATOR_USE_BFC=true``) set by the parent, each worker its own cap. Writes one JSON
object: scenario name -> results (or ``{"error": ...}``). Not collected by pytest (no
``test_`` prefix). Also the model module the probe processes load
(``tests/multiworker_child.py:make_model``).
"""

from __future__ import annotations

import json
import os
import sys
import time

STARTED = time.perf_counter()

from child_support import run_scenarios  # imports nothing of TensorFlow

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURES = 8
LENGTH = 256          # memory quadratic in the length: (batch, 256, 256) scores
N_EXAMPLES = 256
GLOBAL_BATCH = 128    # 64 per replica: over a 34 MiB cap, under a 160 MiB one
EPOCHS = 2
TIMEOUT_S = 120.0     # every collective of the strategy


def make_model():
    """A compiled model whose memory per example is large (pairwise scores), weights tiny."""
    from child_support import pairwise_model

    return pairwise_model(LENGTH, features=FEATURES)


def data():
    import numpy as np

    rng = np.random.default_rng(7)
    return (rng.normal(size=(N_EXAMPLES, LENGTH, FEATURES)).astype("float32"),
            rng.normal(size=(N_EXAMPLES, 1)).astype("float32"))


def scenario_search(strategy) -> dict:
    import batchfit
    from batchfit.verbs.multiworker import find_max_batch_size_multiworker

    spec = f"{os.path.abspath(__file__)}:make_model"
    settings = {"granularity": 4, "steps": 2, "fresh": False, "upper": 96}
    out = find_max_batch_size_multiworker(spec, strategy, **settings).to_dict()
    # The public entry point with distribute=<this strategy> takes the same road.
    d = batchfit.find_max_batch_size(spec, distribute=strategy, **settings)
    out["dispatched"] = {"max_batch_size": d.max_batch_size, "replicas": d.replicas,
                         "global_max_batch_size": d.global_max_batch_size,
                         "distribute": d.distribute, "notes": d.notes}
    return out


def scenario_fit(strategy) -> dict:
    from batchfit.verbs.multiworker_fit import fit_multiworker

    with strategy.scope():
        model = make_model()
    w0 = [w.tolist() for w in model.get_weights()]
    x, y = data()
    h = fit_multiworker(model, x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, strategy=strategy,
                        shuffle=False, timeout=TIMEOUT_S, verbose=0)
    out = h.to_dict()
    out.update(w0=w0, weights=[w.tolist() for w in model.get_weights()],
               iterations=int(model.optimizer.iterations.numpy()))
    return out


def scenario_upstream(strategy) -> dict:
    from batchfit.verbs.multiworker import upstream_fit_failure, upstream_fit_works

    t0 = time.perf_counter()
    works = upstream_fit_works(strategy)
    return {"works": works, "failure": upstream_fit_failure(strategy),
            "seconds": time.perf_counter() - t0}


def scenario_die(strategy) -> dict:
    """Worker 1 dies before training; worker 0 must fail fast, not wait for it forever."""
    import keras
    import numpy as np

    from batchfit.verbs.multiworker import worker_position
    from batchfit.verbs.multiworker_fit import fit_multiworker

    if worker_position(strategy)[0] == 1:
        sys.stderr.flush()
        os._exit(3)
    t0 = time.perf_counter()
    try:   # building the model under the scope is already collective (initial values)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            inp = keras.Input((6,))
            model = keras.Model(inp, keras.layers.Dense(1)(inp))
            model.compile(keras.optimizers.SGD(0.1), "mse")
        x = np.ones((32, 6), "float32")
        fit_multiworker(model, x, x[:, :1], batch_size=8, strategy=strategy, timeout=20.0,
                        verbose=0)
    except Exception as exc:  # noqa: BLE001 - the expected outcome, reported as data
        return {"raised": type(exc).__name__, "detail": str(exc)[:300],
                "seconds": time.perf_counter() - t0}
    return {"raised": None, "seconds": time.perf_counter() - t0}


SCENARIOS = {"upstream": scenario_upstream, "search": scenario_search, "fit": scenario_fit,
             "die": scenario_die}


def main() -> None:
    index, ports, out_path = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index}})
    from batchfit.verbs.multiworker import make_strategy

    strategy = make_strategy(timeout_seconds=TIMEOUT_S)
    print(f"[worker {index}] strategy ready {time.perf_counter() - STARTED:.1f}s after start",
          file=sys.stderr, flush=True)
    out: dict = {"cap_mb": os.environ.get("TF_CPU_BFC_MEM_LIMIT_IN_MB")}

    def save(results: dict) -> None:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh)

    run_scenarios(SCENARIOS, sys.argv[4:], args=(strategy,), label=f"[worker {index}]",
                  out=out, after_each=save)

if __name__ == "__main__":
    main()
