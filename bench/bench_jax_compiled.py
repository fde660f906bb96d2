"""Compile-time memory of the example models' training step on JAX, by kind and batch size.

For each model, the step (``jax.jit(model.train_step, donate_argnums=0)``) is lowered for
shapes and compiled at each size, nothing run; the raw ``memory_analysis()`` figures and the
``CompiledStepMemory`` batchfit derives from them go to bench/results/jax_compiled.json, with
the per-example growth of the temporaries between consecutive sizes (how linear it is).

    KERAS_BACKEND=jax python bench/bench_jax_compiled.py            # cnn, transformer, demo
    KERAS_BACKEND=jax python bench/bench_jax_compiled.py --sizes 8 16 --models cnn
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {"cnn": "batchfit.examples.models:cnn",
          "transformer": "batchfit.examples.models:transformer",
          "demo": "batchfit.examples.models:demo_model"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "jax_compiled.json"))
    args = parser.parse_args()
    import jax
    import keras

    from batchfit.backend import get_backend
    from batchfit.backend.jax.compiled import memory_analysis

    backend = get_backend("jax")
    report = {"jax": jax.__version__, "keras": keras.__version__,
              "device": str(jax.devices()[0]), "models": {}}
    for name in args.models:
        model = backend.load_model(MODELS[name])
        rows = []
        for b in args.sizes:
            t0 = time.perf_counter()
            m = backend.compiled_step_memory(model, b)
            rows.append({"batch_size": b, "raw": memory_analysis(model, b),
                         "weights": m.weights, "optimizer_state": m.optimizer_state,
                         "other_state": m.other_state, "inputs": m.inputs,
                         "temporaries": m.temporaries, "outputs": m.outputs,
                         "total": m.total_bytes, "compile_seconds": round(m.compile_seconds, 2),
                         "seconds": round(time.perf_counter() - t0, 2)})
        growth = [round((r2["temporaries"] - r1["temporaries"]) / (r2["batch_size"]
                                                                  - r1["batch_size"]))
                  for r1, r2 in itertools.pairwise(rows)]
        report["models"][name] = {"sizes": rows, "temporaries_per_example": growth}
        print(name, [r["total"] for r in rows], growth, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
