"""Measurement: how long an XLA step's probe sits quiet inside a step, fitting or not.

Why ``batchfit.verbs.maxbatch_xla.XLA_STALL_SECONDS``. Runs ``find_max_batch_size(...,
jit=True)`` (what ``batchfit max --jit`` runs) with the stall watch of every XLA-step worker
set to watch without ever stopping a probe, and records, from the worker's events
(``batchfit.workers.worker.EVENTS``), each probe's outcome and the longest stretch the worker
process sat quiet (no CPU used, no thread running) inside a compiled step.

    python bench/bench_xla_quiet.py --cases cnn:128MiB transformer:64MiB demo_model:96MiB
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def run(case: str) -> dict:
    import batchfit
    import batchfit.verbs.maxbatch_local as local
    import batchfit.workers.worker as worker_module

    settle = local.settle_worker

    def watch_only(worker, info, *, jit):
        settle(worker, info, jit=jit)
        if worker is not None and info.get("step_jit") and worker.stall_seconds is not None:
            worker.stall_seconds = 1e9  # watch, never stop

    local.settle_worker = watch_only
    name, memory = case.split(":")
    worker_module.EVENTS = []
    t0 = time.perf_counter()
    try:
        r = batchfit.find_max_batch_size(f"batchfit.examples.models:{name}", memory=memory,
                                         jit=True)
    finally:
        local.settle_worker = settle
    probes = [e for e in worker_module.EVENTS if e["event"] == "probe"]
    return {"case": case, "answer": r.max_batch_size, "seconds": round(time.perf_counter() - t0, 1),
            "probes": [{k: e.get(k) for k in ("batch_size", "outcome", "seconds",
                                              "longest_quiet_s", "reused")} for e in probes]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["cnn:128MiB", "transformer:64MiB"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "xla_quiet.json"))
    args = ap.parse_args()
    out = {"command": " ".join(["python", "bench/bench_xla_quiet.py", *sys.argv[1:]]),
           "runs": []}
    for case in args.cases:
        out["runs"].append(run(case))
        print(json.dumps(out["runs"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
