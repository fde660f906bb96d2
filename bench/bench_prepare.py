"""Measurement: does a probe prepared ahead (its step traced in a spare) measure what a plain
fresh probe measures?

Why :meth:`batchfit.workers.worker.ProbeWorker.expect` may be used for confirmations. For each
case, a worker runs one size in fresh processes, alternating a process that prepared the size
while the previous probe ran (``ProbeRunner.prepare``) and one that did not, and records each
probe's outcome, peak, seconds and whether it ran prepared (from the worker's events,
``batchfit.workers.worker.EVENTS``).

    python bench/bench_prepare.py --cases seed_wide:64MiB:150 transformer:64MiB:108 \\
        cnn:128MiB:150 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {
    "seed_wide": str(ROOT / "tests" / "models_for_tests.py") + ":seed_wide",
    "cnn": "batchfit.examples.models:cnn",
    "transformer": "batchfit.examples.models:transformer",
    "lstm": "batchfit.examples.models:lstm",
}


def run(case: str, repeats: int) -> dict:
    """``repeats`` plain and ``repeats`` prepared fresh probes of one size, interleaved."""
    import batchfit.workers.worker as worker_module
    from batchfit.core.sizes import parse_size
    from batchfit.workers.worker import ModelSource, ProbeWorker, WorkerConfig

    name, memory, size = case.split(":")
    b = int(size)
    events: list[dict] = []
    worker_module.EVENTS = events
    config = WorkerConfig(source=ModelSource.from_model(MODELS[name]),
                          budget_bytes=parse_size(memory))
    probes: list[dict] = []
    t0 = time.perf_counter()
    with ProbeWorker(config, fresh_each_probe=True, reuse_fits=True) as w:
        w.probe(8)  # the first process warms up; its spare is started unprepared
        for i in range(2 * repeats + 1):
            w.expect(b if i % 2 == 0 else None)  # the next probe's process: prepared or not
            p = w.probe_fresh(b)
            ev = [e for e in events if e["event"] == "probe"][-1]
            probes.append({"prepared": bool(ev.get("prepared")), "outcome": p.outcome,
                           "peak_bytes": p.peak_bytes, "seconds": round(p.seconds, 2),
                           "round_trip_s": ev["seconds"]})
    worker_module.EVENTS = None
    out: dict = {"case": case, "probes": probes, "seconds": round(time.perf_counter() - t0, 1)}
    for key, ready in (("plain", False), ("prepared", True)):
        rows = [p for p in probes if p["prepared"] is ready]
        peaks = [p["peak_bytes"] for p in rows if p["peak_bytes"]]
        out[key] = {"n": len(rows), "outcomes": [p["outcome"] for p in rows],
                    "peak_mb": [round(x / 1e6, 2) for x in peaks],
                    "median_peak_mb": round(statistics.median(peaks) / 1e6, 2) if peaks else None,
                    "median_round_trip_s": round(statistics.median(
                        p["round_trip_s"] for p in rows), 2) if rows else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+",
                    default=["seed_wide:64MiB:150", "transformer:64MiB:108", "cnn:128MiB:150"])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prepare.json"))
    args = ap.parse_args()
    data = {"benchmark": "prepare", "command": " ".join(sys.argv), "cases": []}
    for case in args.cases:
        row = run(case, args.repeats)
        data["cases"].append(row)
        print(f"{case}: plain {row['plain']}\n  prepared {row['prepared']}", flush=True)
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
