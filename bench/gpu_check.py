"""The first run of batchfit on a real GPU: Keras on JAX, one command, one JSON.

The accelerator machines this project can borrow have JAX with its CUDA plugin but no
TensorFlow and no Keras; Keras (pure Python) travels as wheels (docs/jax.md gives the launch
line). This script sets ``KERAS_BACKEND=jax`` before anything imports Keras and, for three
example models (``batchfit.examples.models``: their ``keras.ops`` versions on JAX):

- ``max`` with the guided and the binsearch policies under two budgets, every probe in a
  fresh worker process whose XLA pool is preallocated at the budget
  (``XLA_PYTHON_CLIENT_MEM_FRACTION``), real ``RESOURCE_EXHAUSTED`` errors, peaks from
  ``memory_stats()``;
- the truth: an exhaustive bisection in fresh processes (``verify.exhaustive_max``) at the
  first budget, and at the second a bracket (fresh probes at the guided answer and one
  granule above);
- the compile-time prediction (``compiled_step_memory``) against the measured peak of the
  guided answer's probe;
- ``tune``'s curve with the GPU's utilization and memory (NVML).

Sections past ``--time-limit`` seconds are skipped and listed in the JSON (``skipped``), so
the run ends inside one device call (under 8 minutes on an H100 is the aim; not yet run
there). ``--dry-run`` runs the same code on the CPU with one small model, one budget and short
windows (the CPU probes are compile-time memory: JAX on CPU has no allocator cap); the test
suite runs it (``tests/jax/test_jax_gpu_check.py``) so the script cannot rot.

    KERAS_BACKEND=jax python bench/gpu_check.py --out $OUT/gpu_check.json     # on the GPU
    KERAS_BACKEND=jax python bench/gpu_check.py --dry-run --out /tmp/dry.json  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"  # before anything imports Keras (it reads it once)
# This process must not take 75% of the GPU when JAX starts: the probe workers each
# preallocate a pool of the budget on the same device (JaxBackend sets the same default).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {
    "cnn": "batchfit.examples.models:cnn",
    "transformer": "batchfit.examples.models:transformer",
    "demo": "batchfit.examples.models:demo_model",
    "seed_sequence": "batchfit.examples.models:seed_sequence",
}
GPU_PLAN = {"models": ["cnn", "transformer", "demo"], "budgets": ["1GiB", "4GiB"],
            "granularity": 8, "tune_sizes": [32, 64, 128, 256, 512, 1024, 2048],
            "window_seconds": 0.2, "windows": 5, "device": "GPU:0"}
DRY_PLAN = {"models": ["seed_sequence"], "budgets": ["2MiB"], "granularity": 32,
            "tune_sizes": [8, 32], "window_seconds": 0.02, "windows": 2, "device": "CPU:0"}


class Clock:
    """Elapsed time against the limit; sections that would start past it are skipped."""

    def __init__(self, limit: float) -> None:
        self.start, self.limit = time.perf_counter(), limit
        self.skipped: list[str] = []

    def allows(self, section: str) -> bool:
        if time.perf_counter() - self.start < self.limit:
            return True
        self.skipped.append(section)
        return False


def _probes(probes: list[Any]) -> list[dict[str, Any]]:
    return [{"b": p.batch_size, "outcome": p.outcome, "peak": p.peak_bytes,
             "seconds": round(p.seconds, 2)} for p in probes]


def run_max(spec: str, memory: str, plan: dict[str, Any], clock: Clock,
            truth: str) -> dict[str, Any]:
    """The two policies, the truth (``"exhaustive"`` or ``"bracket"``) and the prediction."""
    from batchfit import find_max_batch_size
    from batchfit.core.sizes import parse_size
    from batchfit.verbs.verify import exhaustive_max, fresh_probe

    row: dict[str, Any] = {"memory": memory, "budget_bytes": parse_size(memory)}
    g, device = plan["granularity"], plan["device"]
    for search in ("guided", "binsearch"):
        if not clock.allows(f"{spec} {memory} max {search}"):
            continue
        r = find_max_batch_size(spec, memory=memory, search=search, granularity=g,
                                isolate="process", device=device)
        row[search] = {"max": r.max_batch_size, "safe": r.safe_batch_size,
                       "probes": _probes(r.probes), "seconds": round(r.seconds, 1),
                       "ooms": sum(p.outcome == "oom" for p in r.probes)}
        row.setdefault("environment", r.environment)
    guided = row.get("guided", {}).get("max")
    if truth == "exhaustive" and clock.allows(f"{spec} {memory} exhaustive"):
        best, probes, seconds = exhaustive_max(spec, memory, granularity=g, device=device)
        row["truth"] = {"kind": "exhaustive", "max": best, "probes": _probes(probes),
                        "seconds": round(seconds, 1)}
    elif guided and clock.allows(f"{spec} {memory} bracket"):
        at, above = (fresh_probe(spec, b, memory, device=device) for b in (guided, guided + g))
        row["truth"] = {"kind": "bracket", "fits_at_answer": at.fits,
                        "fits_one_granule_above": above.fits, "probes": _probes([at, above])}
    if guided and clock.allows(f"{spec} {memory} prediction"):
        row["prediction"] = predict(spec, guided, row["guided"]["probes"])
    return row


def predict(spec: str, b: int, probes: list[dict[str, Any]]) -> dict[str, Any]:
    """The compiled step's predicted bytes at ``b`` against the probe's measured peak."""
    from batchfit.backend import get_backend

    backend = get_backend()
    model = backend.load_model(spec)
    m = backend.compiled_step_memory(model, b)
    measured = next((p["peak"] for p in probes if p["b"] == b), None)
    return {"batch_size": b, "predicted_bytes": m.total_bytes, "measured_peak": measured,
            "ratio": None if not measured else round(m.total_bytes / measured, 3),
            "temporaries": m.temporaries, "state": m.state_bytes,
            "compile_seconds": round(m.compile_seconds, 2)}


def run_tune(spec: str, plan: dict[str, Any]) -> dict[str, Any]:
    from batchfit import profile_throughput

    r = profile_throughput(spec, plan["tune_sizes"], window_seconds=plan["window_seconds"],
                           windows=plan["windows"], max_windows=plan["windows"],
                           device=plan["device"])
    return {"compile_seconds": round(r.trace_seconds, 2), "points": [
        {"b": p.batch_size, "outcome": p.outcome, "samples_per_second": p.samples_per_second,
         "compile_seconds": p.first_step_seconds, "gpu_utilization": p.gpu_utilization,
         "gpu_memory_bytes": p.gpu_memory_bytes} for p in r.points]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: one small model, one budget, short windows")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds after which the remaining sections are skipped")
    args = parser.parse_args(argv)
    import jax
    import keras

    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if not args.dry_run and jax.default_backend() != "gpu":
        print(f"no GPU for JAX here ({jax.devices()}); use --dry-run", file=sys.stderr)
        return 2
    clock = Clock(args.time_limit)
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "plan": plan, "jax": jax.__version__,
        "keras": keras.__version__, "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(), "models": {}}
    for name in plan["models"]:
        spec = MODELS[name]
        entry: dict[str, Any] = {"spec": spec, "max": []}
        for i, memory in enumerate(plan["budgets"]):
            entry["max"].append(run_max(spec, memory, plan, clock,
                                        "exhaustive" if i == 0 else "bracket"))
        if clock.allows(f"{spec} tune"):
            entry["tune"] = run_tune(spec, plan)
        report["models"][name] = entry
    report["skipped"] = clock.skipped
    report["seconds"] = round(time.perf_counter() - clock.start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out} ({report['seconds']} s, skipped: {len(clock.skipped)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
