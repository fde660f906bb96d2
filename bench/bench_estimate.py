"""Benchmark: ``batchfit estimate``'s prediction against the real step's allocator peak.

For each model, ``estimate_memory`` compiles the training step at three sizes in a fresh
process (compile seconds and the process's peak RSS recorded); then, each in its own fresh
process, the SAME model compiled with ``jit_compile=True`` trains two ``train_on_batch`` steps
at four sizes (the three compiled and 4x the largest, predicted by the line) under TensorFlow's
capped BFC allocator as batchfit's probe workers configure it (``TF_CPU_ALLOCATOR_USE_BFC``,
one thread, the budget reserved as one region, the optimizer built before the steps; the cap is set well above the prediction so it
does not bind), and the allocator's peak is read (``get_memory_info('CPU:0')['peak']``). The
executor path (``jit_compile=False``) is measured at the largest compiled size for comparison.
Results go to bench/results/estimate.json.

    python bench/bench_estimate.py                       # every model (long on 2 cores)
    python bench/bench_estimate.py --models cnn,transformer --sizes 16,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
HERE = Path(__file__).resolve()

MODELS = {
    "demo_model": "batchfit.examples.models:demo_model",
    "cnn": "batchfit.examples.models:cnn",
    "transformer": "batchfit.examples.models:transformer",
    "lstm": "batchfit.examples.models:lstm",
    "seed_mlp": "batchfit.examples.models:seed_mlp",
    "seed_sequence": "batchfit.examples.models:seed_sequence",
    "mobilenetv2": f"{HERE}:mobilenetv2",
    "resnet50": f"{HERE}:resnet50",
}
#: Compiled sizes per model (the fourth measured size is 4x the largest).
SIZES = {"resnet50": (4, 8, 16), "mobilenetv2": (8, 16, 32)}
DEFAULT_SIZES = (16, 32, 64)
MiB = 1 << 20


def mobilenetv2():
    import keras

    m = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=10)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def resnet50():
    import keras

    m = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


# -- children (fresh processes) ----------------------------------------------------------------
def child_estimate(spec: str, sizes: str) -> dict:
    import resource

    import batchfit

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    r = batchfit.estimate_memory(spec, sizes)
    return {"seconds": time.perf_counter() - start,
            "compile_seconds": [m.compile_seconds for m in r.sizes],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mib": rss0 / 1024,
            "totals": {m.batch_size: m.total_bytes for m in r.sizes},
            "sizes": [m.to_dict() for m in r.sizes],
            "fixed_bytes": r.fit.fixed_bytes, "per_sample_bytes": r.fit.per_sample_bytes,
            "r_squared": r.fit.r_squared, "max_residual": r.fit.max_residual_fraction,
            "model_name": r.model_name}


def child_measure(spec: str, b: int, jit: bool, cap_mib: int) -> dict:
    from batchfit.backend.tensorflow import TensorFlowBackend

    be = TensorFlowBackend()
    os.environ.update(be.worker_environment("CPU:0", cap_mib * MiB))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    be.configure_worker("CPU:0", cap_mib * MiB)
    from batchfit.backend.tensorflow.loader import load_model
    from batchfit.backend.tensorflow.probe import model_variables
    from batchfit.backend.tensorflow.synth import synthesize_batch

    model = load_model(spec)
    model.jit_compile = jit
    model_variables(model)  # the optimizer built before the steps, as batchfit's probes do
    x, y = synthesize_batch(model, b)
    # The batch in TensorFlow's allocator, one allocation per tensor, as a GPU's copy: a NumPy
    # array converted with tf.constant is aliased without a copy when its data happens to be
    # 64-byte aligned (outside the allocator's count) and copied otherwise, which moved the
    # batch between holes from one size to the next. The step's memory does not depend on
    # the values: the batch is zeros of the synthesized shapes and dtypes.
    xt, yt = (tf.nest.map_structure(lambda a: tf.zeros(a.shape, tf.as_dtype(a.dtype)), v)
              for v in (x, y))
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    peaks, seconds = [], []
    for _ in range(2):
        tf.config.experimental.reset_memory_stats("CPU:0")
        start = time.perf_counter()
        model.train_on_batch(xt, yt)
        seconds.append(time.perf_counter() - start)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"])
    return {"peak": max(peaks), "peaks": peaks, "before_step": before,
            "step_seconds": seconds[-1], "jit": jit}


def _run_child(args: list[str], timeout: float = 900) -> dict:
    out = subprocess.run([sys.executable, str(HERE), "--child", *args], check=False,
                         capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONHASHSEED": "0"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


# -- the benchmark -----------------------------------------------------------------------------
def bench_model(name: str, sizes: tuple[int, ...], executor: bool) -> dict:
    spec = MODELS[name]
    est = _run_child(["estimate", spec, ",".join(map(str, sizes))])
    if "error" in est:
        print(f"{name}: estimate failed: {est['error']}", flush=True)
        return {"model": name, "error": est["error"]}
    rows = []
    for b in (*sizes, 4 * max(sizes)):
        compiled = str(b) in est["totals"]
        predicted = est["totals"][str(b)] if compiled else \
            est["fixed_bytes"] + est["per_sample_bytes"] * b
        cap = int(2 * predicted / MiB) + 128
        got = _run_child(["measure", spec, str(b), "1", str(cap)])
        row = {"batch": b, "compiled": compiled, "predicted": int(predicted), "cap_mib": cap,
               **got}
        if "peak" in got:
            row["error_fraction"] = (predicted - got["peak"]) / got["peak"]
        rows.append(row)
        print(f"{name:12s} b={b:5d} {'compiled' if compiled else 'line    '} predicted "
              f"{predicted / MiB:9.2f} MiB  measured "
              f"{got.get('peak', float('nan')) / MiB:9.2f} MiB  "
              f"err {row.get('error_fraction', float('nan')):+.2%}", flush=True)
    out = {"model": name, "spec": spec, "compiled_sizes": list(sizes), "estimate": est,
           "rows": rows}
    if executor:
        b = max(sizes)
        cap = int(4 * est["totals"][str(b)] / MiB) + 256
        got = _run_child(["measure", spec, str(b), "0", str(cap)])
        out["executor"] = {"batch": b, "xla_predicted": est["totals"][str(b)], **got}
        if "peak" in got:
            out["executor"]["executor_over_xla"] = got["peak"] / est["totals"][str(b)] - 1
            print(f"{name:12s} executor peak at {b}: {got['peak'] / MiB:.2f} MiB "
                  f"({out['executor']['executor_over_xla']:+.1%} vs XLA)", flush=True)
    return out


def summarize(results: list[dict]) -> dict:
    errs = [abs(r["error_fraction"]) for m in results for r in m.get("rows", [])
            if "error_fraction" in r]
    return {"measurements": len(errs),
            "median_abs_error": statistics.median(errs) if errs else None,
            "worst_abs_error": max(errs) if errs else None}


def markdown(path: str) -> str:
    """The docs/benchmarks.md tables from a saved run."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    lines = ["| model | batch | from | predicted MiB | measured MiB | error |",
             "|---|---|---|---|---|---|"]
    cost = [("| model | compiled sizes | compile s (each) | peak RSS of the compile MiB | "
             "executor peak vs XLA |"), "|---|---|---|---|---|"]
    for m in doc["models"]:
        if "error" in m:
            lines.append(f"| {m['model']} | - | - | - | - | failed: {m['error'][:60]} |")
            continue
        for r in m["rows"]:
            got = f"{r['peak'] / MiB:.2f}" if "peak" in r else "failed"
            err = f"{r['error_fraction']:+.2%}" if "error_fraction" in r else "-"
            lines.append(f"| {m['model']} | {r['batch']} | "
                         f"{'compiled' if r['compiled'] else 'line'} | "
                         f"{r['predicted'] / MiB:.2f} | {got} | {err} |")
        est, ex = m["estimate"], m.get("executor", {})
        vs = f"{ex['executor_over_xla']:+.0%} (batch {ex['batch']})" \
            if "executor_over_xla" in ex else "-"
        cost.append(f"| {m['model']} | {', '.join(map(str, m['compiled_sizes']))} | "
                    f"{', '.join(f'{c:.1f}' for c in est['compile_seconds'])} | "
                    f"{est['peak_rss_mib']:.0f} | {vs} |")
    parts = [("| model | variables MiB | in use before the step, beyond variables and batch KiB "
              "| the peak beyond XLA's rounded sizes, measured KiB | modelled (allocator "
              "layout) KiB |"), "|---|---|---|---|---|"]
    for m in doc["models"]:
        if "error" in m:
            continue
        sizes = {s["batch_size"]: s for s in m["estimate"]["sizes"]}
        rows = [(r, sizes[r["batch"]]) for r in m["rows"] if r["batch"] in sizes
                and "before_step" in r]
        if not rows:
            continue
        state = (rows[0][1]["weights"] + rows[0][1]["optimizer_state"]
                 + rows[0][1]["other_state"])
        frag = [(r["before_step"] - state - s["inputs"]) / 1024 for r, s in rows]
        counted = [s["weights"] + s["optimizer_state"] + s["other_state"] + s["inputs"]
                   + s["temporaries"] + s["outputs"] + s["rounding"] for _, s in rows]
        beyond = [(r["peak"] - c) / 1024 for (r, _), c in zip(rows, counted)]
        model = [s.get("allocator_overhead", 0) / 1024 for _, s in rows]
        parts.append(f"| {m['model']} | {state / MiB:.2f} | {_span(frag)} | {_span(beyond)} | "
                     f"{_span(model)} |")
    s = doc["summary"]
    tail = (f"\n{s['measurements']} measurements: median |error| "
            f"{s['median_abs_error']:.2%}, worst {s['worst_abs_error']:.2%}.")
    return "\n\n".join(["\n".join(lines), "\n".join(cost), "\n".join(parts)]) + "\n" + tail


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f} .. {hi:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sizes", default=None, help="compiled sizes for every model")
    p.add_argument("--no-executor", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "estimate.json"))
    p.add_argument("--markdown", metavar="JSON", help="print the tables of a saved run")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    if args.child:
        kind, *rest = args.child
        if kind == "estimate":
            print(json.dumps(child_estimate(rest[0], rest[1])))
        else:
            print(json.dumps(child_measure(rest[0], int(rest[1]), rest[2] == "1",
                                           int(rest[3]))))
        return
    start = time.perf_counter()
    results = []
    for name in args.models.split(","):
        sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else \
            SIZES.get(name, DEFAULT_SIZES)
        results.append(bench_model(name, sizes, not args.no_executor))
    from batchfit.backend import get_backend

    doc = {"command": "python " + " ".join([f"bench/{HERE.name}", *sys.argv[1:]]),
           "summary": summarize(results), "seconds": round(time.perf_counter() - start, 1),
           "environment": get_backend().environment_info(), "models": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
