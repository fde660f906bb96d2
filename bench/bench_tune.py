"""Benchmark of ``batchfit tune``: repeatability of measured throughput, and the cost of ``tune``.

1. Repeatability: for example models, per size, the coefficient of variation of the medians of
   three runs. Target: under 5% for sizes whose step takes over 20 ms. Two ways of repeating:
   - whole profiles: ``profile_throughput`` three times over all the sizes, one run after
     the other in one process (minutes apart: a shift of the machine's own speed between runs
     shows, which a fixed NumPy workload beside them measures);
   - back to back: each size measured three times in a row (three ``profile_throughput`` calls
     of that size alone, seconds apart: the measurement's own repeatability).
   The knee of each whole profile is recorded too (what the recommendation rests on).
2. Cost: ``batchfit tune`` on the built-in example (the README's ``make demo``), run as a user
   runs it (a subprocess), its wall time split into the memory search and the timing.

Usage:
    python bench/bench_tune.py                 # writes bench/results/tune.json
    python bench/bench_tune.py --markdown bench/results/tune.json
    python bench/bench_tune.py --skip-cost --windows 20 --out PATH   # longer timing per size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "tune.json"
CASES = [
    ("demo_model", "batchfit.examples.models:demo_model", [32, 64, 128, 256]),
    ("transformer", "batchfit.examples.models:transformer", [16, 32, 64, 128]),
]
RUNS = 3


def noise_floor(seconds: float = 0.3, windows: int = 5) -> float:
    """Median rate of a fixed NumPy workload (matmuls/s): the machine's own drift between runs."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((256, 256))
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ a
            n += 1
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def repeatability(windows: int | None = None,
                  window_seconds: float | None = None) -> tuple[list[dict], list[dict]]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import batchfit
    from batchfit.backend.tensorflow.loader import load_model

    rows: list[dict] = []
    floors: list[dict] = []
    # A fixed window count (min = max) when given: each size costs windows x window_seconds.
    timing = ({} if windows is None else {"windows": windows, "max_windows": windows})
    if window_seconds is not None:
        timing["window_seconds"] = window_seconds
    for name, spec, sizes in CASES:
        model = load_model(spec)
        runs = []
        floor = []
        knees, ranges, drifts = [], [], []
        for _ in range(RUNS):
            floor.append(noise_floor())
            r = batchfit.profile_throughput(model, sizes, **timing)
            runs.append({p.batch_size: p for p in r.points})
            knees.append(r.knee)
            ranges.append(r.knee_range)
            drifts.append(r.machine_drift)
        overlap = all(a[0] <= b[1] and b[0] <= a[1] for a in ranges for b in ranges)
        floors.append({"model": name, "matmuls_per_second": floor,
                       "cv_across_runs": statistics.stdev(floor) / statistics.fmean(floor),
                       "knee_per_run": knees, "knee_range_per_run": ranges,
                       "knee_ranges_overlap": overlap, "machine_drift_per_run": drifts})
        print(f"{name:12s} knees {knees} ranges {ranges} overlap {overlap} "
              f"drift {[f'{d:+.1%}' for d in drifts]}", flush=True)
        back_to_back = {b: [batchfit.profile_throughput(model, [b], **timing).points[0]
                            for _ in range(RUNS)] for b in sizes}
        for b in sizes:
            pts = [run[b] for run in runs]
            medians = [p.samples_per_second for p in pts]
            mean = statistics.fmean(medians)
            best = [p.high for p in pts]
            b2b = [p.samples_per_second for p in back_to_back[b]]
            rows.append({
                "model": name, "batch_size": b,
                "back_to_back_samples_per_second": b2b,
                "cv_back_to_back": statistics.stdev(b2b) / statistics.fmean(b2b),
                "samples_per_second": medians,
                "cv_across_runs": statistics.stdev(medians) / mean,
                # the fastest window of each run: interference only ever slows a window down
                "best_window_samples_per_second": best,
                "cv_across_runs_best_window": statistics.stdev(best) / statistics.fmean(best),
                "step_ms": statistics.median(p.step_seconds for p in pts) * 1000,
                "cv_within_run": [p.cv for p in pts],
                "steps_per_window": [p.steps_per_window for p in pts],
                "windows": [len(p.window_seconds) for p in pts],
                "median_error": [p.median_error for p in pts],
            })
            print(f"{name:12s} b={b:4d} step {rows[-1]['step_ms']:7.1f} ms  "
                  f"runs {[round(m) for m in medians]}  cv {rows[-1]['cv_across_runs']:.1%}  "
                  f"back to back {[round(m) for m in b2b]} cv {rows[-1]['cv_back_to_back']:.1%}  "
                  f"windows {rows[-1]['windows']}",
                  flush=True)
        print(f"{name:12s} machine noise floor (fixed NumPy workload) cv "
              f"{floors[-1]['cv_across_runs']:.1%}", flush=True)
    return rows, floors


def tune_cost() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "tune.json"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "batchfit", "tune", "--quiet", "--json",
                               str(js)], capture_output=True, text=True, cwd=ROOT, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:], "wall_seconds": wall}
        data = json.loads(js.read_text())
    mb = data["max_batch"]
    from batchfit.cli._common import DEMO_MEMORY

    return {
        "command": f"batchfit tune (built-in example, emulated {DEMO_MEMORY} device)",
        "wall_seconds": wall,
        "tune_seconds": data["seconds"],
        "memory_search_seconds": mb["seconds"],
        "throughput_seconds": data["throughput"]["seconds"],
        "probes": len(mb["probes"]),
        "oom_count": sum(p["outcome"] in ("oom", "crashed", "timeout") for p in mb["probes"]),
        "max_batch_size": mb["max_batch_size"],
        "recommended": data["recommendation"]["batch_size"],
        "decided_by": data["recommendation"]["decided_by"],
        "sizes_timed": [p["batch_size"] for p in data["throughput"]["points"]],
    }


def pooled_cv(rows: list[dict], min_step_ms: float = 20.0) -> dict[str, tuple[float, int]]:
    """Per model, the root mean square of the across-run CVs of its sizes whose step takes over
    ``min_step_ms``, and how many sizes that is.

    The CV of three runs scatters widely around the true one (with a true 4%, one size in five
    reads over 5%), so the pooled figure is the steadier statement of a model's repeatability.
    """
    by_model: dict[str, list[float]] = {}
    for r in rows:
        if r["step_ms"] > min_step_ms:
            by_model.setdefault(r["model"], []).append(r["cv_across_runs"])
    return {m: ((sum(c * c for c in cvs) / len(cvs)) ** 0.5, len(cvs))
            for m, cvs in by_model.items()}


def markdown(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [("| model | batch | step (ms) | samples/s, 3 whole profiles | CV | "
              "samples/s, 3 runs back to back | CV |"),
             "|---|---|---|---|---|---|---|"]
    for r in data["repeatability"]:
        runs = ", ".join(f"{m:,.0f}" for m in r["samples_per_second"])
        b2b = r.get("back_to_back_samples_per_second")
        b2b_runs = "-" if b2b is None else ", ".join(f"{m:,.0f}" for m in b2b)
        b2b_cv = r.get("cv_back_to_back")
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['step_ms']:.0f} | {runs} | "
                     f"{r['cv_across_runs']:.1%} | {b2b_runs} | "
                     f"{'-' if b2b_cv is None else f'{b2b_cv:.1%}'} |")
    for f in data.get("noise_floor", []):
        knees = f.get("knee_per_run")
        lines.append(f"| (machine: fixed NumPy workload, beside {f['model']}) | | | | "
                     f"{f['cv_across_runs']:.1%} | | |")
        if knees:
            lines.append(f"| ({f['model']}: knee of each whole profile) | | | "
                         f"{', '.join(str(k) for k in knees)} | | | |")
        if f.get("knee_range_per_run"):
            rng = ", ".join(f"{lo}-{hi}" for lo, hi in f["knee_range_per_run"])
            ok = "overlap" if f["knee_ranges_overlap"] else "do NOT overlap"
            drift = ", ".join(f"{d:+.0%}" for d in f["machine_drift_per_run"])
            lines.append(f"| ({f['model']}: knee range of each profile; {ok}; machine drift "
                         f"within each {drift}) | | | {rng} | | | |")
    pooled = pooled_cv(data["repeatability"])
    if pooled:
        lines.append("")
        lines.append("Steps over 20 ms, the whole profiles' CV pooled over sizes (root mean "
                     "square: one CV of three runs is a rough estimate): " + ", ".join(
                         f"{m} {cv:.1%} ({n} sizes)" for m, (cv, n) in pooled.items()) + ".")
    c = data.get("tune_cost", {})
    if "wall_seconds" in c and "error" not in c:
        lines.append("")
        lines.append(f"`batchfit tune` on the built-in example: {c['wall_seconds']:.0f} s wall "
                     f"(memory search {c['memory_search_seconds']:.0f} s with {c['probes']} "
                     f"probes, {c['oom_count']} out-of-memory; timing "
                     f"{c['throughput_seconds']:.0f} s over {len(c['sizes_timed'])} sizes); "
                     f"largest fit {c['max_batch_size']}, recommended {c['recommended']} "
                     f"({c['decided_by']}).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", metavar="JSON", help="print the README table of a saved run")
    ap.add_argument("--skip-cost", action="store_true",
                    help="only the repeatability part (the saved cost of tune is kept)")
    ap.add_argument("--only-cost", action="store_true",
                    help="re-measure only the cost of tune, keeping the saved repeatability")
    ap.add_argument("--windows", type=int, default=None,
                    help="repeatability at a fixed number of timed windows per size (default: "
                         "profile_throughput's own, 5 to 15 as the median's error needs)")
    ap.add_argument("--window-seconds", type=float, default=None,
                    help="wall time of each timed window (default 0.3)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"result file (default {OUT})")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(Path(args.markdown)))
        return
    out = args.out
    result: dict = {"date": time.strftime("%Y-%m-%d"), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    saved_cost = (json.loads(out.read_text()).get("tune_cost")
                  if args.skip_cost and out.exists() else None)
    if args.only_cost and out.exists():
        saved = json.loads(out.read_text())
        result["repeatability"] = saved["repeatability"]
        result["noise_floor"] = saved.get("noise_floor", [])
        result["repeatability_date"] = saved.get("repeatability_date", saved.get("date"))
    else:
        result["repeatability"], result["noise_floor"] = repeatability(
            args.windows, args.window_seconds)
        result["repeatability_settings"] = {
            "windows": args.windows or "default (5, up to 15)",
            "window_seconds": args.window_seconds or 0.3}
    if saved_cost is not None:
        result["tune_cost"] = saved_cost  # --skip-cost keeps the saved measurement
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.skip_cost:
        result["tune_cost"] = tune_cost()
        print(json.dumps(result["tune_cost"], indent=2))
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(out))


if __name__ == "__main__":
    main()
