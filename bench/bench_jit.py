"""Benchmark: ``max`` on XLA-compiled (``jit_compile=True``) models, guided with the compile-time
prediction against Lightning's binsearch, in the same run, against an exhaustive bisection in
fresh processes; and whether the XLA step's limit is a number or a band.

For each ``model:budget`` case: the exhaustive bisection (every probe a fresh process, the step
XLA-compiled), then ``max --jit`` guided (the prediction leads) and binsearch, each as a user
runs it (the answer confirmed in 3 fresh processes; search and confirmation probes counted
apart), then the truth and the size above it probed ``--repeats`` times more in fresh
processes. Results go to bench/results/max_jit.json; ``--markdown`` prints the table.

    python bench/bench_jit.py                                   # demo:96MiB cnn:128MiB
    python bench/bench_jit.py --cases demo:96MiB --repeats 3
    python bench/bench_jit.py --markdown bench/results/max_jit.json
    python bench/bench_jit.py --phases cnn:128MiB     # what one XLA process spends, by phase
    python bench/bench_jit.py --cache-ab --cases cnn:128MiB --repeats 2   # the compile cache

``--cache-ab`` runs each search (guided, binsearch) with the processes' shared compile cache
on and off (``BATCHFIT_COMPILE_CACHE``), alternating, ``--repeats`` times each, without the
truth; results go to bench/results/jit_cache.json unless ``--out`` says otherwise. With
``KERAS_BACKEND=jax`` it runs on JAX (``--out bench/results/jit_cache_jax.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from batchfit.verbs.maxbatch import find_max_batch_size
from batchfit.verbs.verify import exhaustive_max, fit_rates

MODELS = {
    "cnn": "batchfit.examples.models:cnn",
    "transformer": "batchfit.examples.models:transformer",
    "demo": "batchfit.examples.models:demo_model",
}
DEFAULT_CASES = ["demo:96MiB", "cnn:128MiB"]
FAILED = ("oom", "crashed", "timeout")


def _search(spec: str, memory: str, search: str, jit: bool = True) -> dict:
    r = find_max_batch_size(spec, memory=memory, search=search, jit=jit)
    found = [p for p in r.probes if p.phase != "confirm"]
    conf = [p for p in r.probes if p.phase == "confirm"]
    return {"max_batch_size": r.max_batch_size, "search_probes": len(found),
            "search_ooms": sum(p.outcome in FAILED for p in found),
            "search_failures": sum(not p.fits for p in found),
            "confirm_probes": len(conf), "confirm_ooms": sum(p.outcome in FAILED for p in conf),
            "seconds": round(r.seconds, 1), "xla_step": r.xla_step,
            "search_probe_seconds": round(sum(p.seconds for p in found), 1),
            "confirm_probe_seconds": round(sum(p.seconds for p in conf), 1),
            "xla_prediction": r.xla_prediction, "notes": r.notes,
            "sequence": [(p.batch_size, p.phase, p.outcome, p.peak_bytes) for p in r.probes]}


def run_case(case: str, repeats: int) -> dict:
    name, memory = case.split(":")
    spec = MODELS[name]
    row: dict = {"case": case, "model": name, "memory": memory, "searches": {}}
    best, probes, secs = exhaustive_max(spec, memory, jit=True)
    row["true_max"] = best
    row["truth"] = {"probes": len(probes), "ooms": sum(p.outcome in FAILED for p in probes),
                    "seconds": round(secs, 1),
                    "sequence": [(p.batch_size, p.outcome, p.peak_bytes) for p in probes]}
    print(f"{case:14s} truth     max={best:5d} probes={len(probes):3d} {secs:6.1f}s", flush=True)
    for search in ("guided", "binsearch"):
        s = row["searches"][search] = _search(spec, memory, search)
        print(f"{case:14s} {search:9s} max={s['max_batch_size']:5d} "
              f"search={s['search_probes']:2d} ({s['search_ooms']} oom) "
              f"confirm={s['confirm_probes']} {s['seconds']:6.1f}s predicted="
              f"{s['xla_prediction']}", flush=True)
    rates = fit_rates(spec, memory, [best, best + 1], repeats=repeats, jit=True)
    row["band"] = {str(b): [p.outcome for p in ps] for b, ps in rates.items()}
    print(f"{case:14s} band      {row['band']}", flush=True)
    return row


def cache_ab(case: str, repeats: int) -> dict:
    """Each search with the compile cache on and off, alternating (a fresh fork server each).
    On JAX (``KERAS_BACKEND=jax``: every step is XLA-compiled) the searches run without
    ``jit=True``, which is TensorFlow's switch."""
    from batchfit.backend import backend_name
    from batchfit.workers.server import close_fork_server

    jit = backend_name() == "tensorflow"

    name, memory = case.split(":")
    row: dict = {"case": case, "runs": []}
    for i in range(repeats):
        for search in ("guided", "binsearch"):
            for cache in ("1", "0") if i % 2 == 0 else ("0", "1"):
                close_fork_server()
                os.environ["BATCHFIT_COMPILE_CACHE"] = cache
                s = _search(MODELS[name], memory, search, jit=jit)
                s.pop("notes")
                row["runs"].append({"search": search, "cache": cache == "1", **s})
                print(f"{case:14s} {search:9s} cache={cache} max={s['max_batch_size']:5d} "
                      f"search={s['search_probes']:2d} confirm={s['confirm_probes']} "
                      f"{s['seconds']:6.1f}s", flush=True)
    os.environ.pop("BATCHFIT_COMPILE_CACHE", None)
    return row


def cache_markdown(data: dict) -> str:
    """Median wall time of each search with the cache on and off, and guided's ratio."""
    import statistics

    head = ("| case | search | answers (cache on / off) | wall s, cache on | wall s, cache off "
            "| on / off |")
    lines = [head, "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        med: dict = {}
        for search in ("guided", "binsearch"):
            runs = {c: [r for r in row["runs"] if r["search"] == search and r["cache"] == c]
                    for c in (True, False)}
            med[search] = {c: statistics.median(r["seconds"] for r in rs)
                           for c, rs in runs.items()}
            answers = " / ".join(",".join(str(r["max_batch_size"]) for r in runs[c])
                                 for c in (True, False))
            lines.append(f"| {row['case']} | {search} | {answers} | {med[search][True]:.1f} "
                         f"| {med[search][False]:.1f} "
                         f"| {med[search][True] / med[search][False]:.2f} |")
        lines.append(f"| {row['case']} | guided / binsearch | | "
                     f"{med['guided'][True] / med['binsearch'][True]:.2f} | "
                     f"{med['guided'][False] / med['binsearch'][False]:.2f} | |")
    return "\n".join(lines)


def phases(case: str, answer: int) -> dict:
    """Seconds of each phase a ``max --jit`` process goes through, in this process (run it
    fresh): TensorFlow's import under the worker's capped allocator, the model's build, the
    first worker's three compilations (16, 64 and the answer), and a step at batch 1 (the
    warm-up), then the first and second step at the answer and the first at the size above:
    a new batch size is a new XLA compilation."""
    name, memory = case.split(":")
    from batchfit.backend.tensorflow import TensorFlowBackend
    from batchfit.core.sizes import parse_size

    budget = parse_size(memory)
    t0 = time.perf_counter()
    be = TensorFlowBackend()
    os.environ.update(be.worker_environment("CPU:0", budget))
    import tensorflow  # noqa: F401

    out = {"import_tensorflow": time.perf_counter() - t0}
    be.configure_worker("CPU:0", budget)
    from batchfit.backend.tensorflow import compiled
    from batchfit.backend.tensorflow.loader import load_model
    from batchfit.backend.tensorflow.synth import synthesize_batch

    t = time.perf_counter()
    model = load_model(MODELS[name])
    out["build_model"] = time.perf_counter() - t
    for b in (16, 64, answer):
        t = time.perf_counter()
        compiled.compiled_step_memory(model, b)
        out[f"compile_{b}"] = time.perf_counter() - t
    model.jit_compile = True
    for label, b in (("step_1", 1), ("first_step_answer", answer),
                     ("second_step_answer", answer), ("first_step_answer_plus_1", answer + 1)):
        x, y = synthesize_batch(model, b)
        t = time.perf_counter()
        model.train_on_batch(x, y)
        out[label] = time.perf_counter() - t
    return {k: round(v, 2) for k, v in out.items()}


def markdown(path: str) -> str:
    data = json.loads(Path(path).read_text())
    head = ("| case | truth (probes, s) | XLA prediction | search | answer | search probes "
            "(OOM) | confirm probes (OOM) | wall s | x binsearch | fits at truth / truth+1 |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        b = row["searches"]["binsearch"]["seconds"]
        t = row["true_max"]
        band = row["band"]
        rate = " / ".join(f"{sum(o == 'fits' for o in band[k])} of {len(band[k])}"
                          for k in (str(t), str(t + 1)))
        for name, s in row["searches"].items():
            lines.append(
                f"| {row['case']} | {t} ({row['truth']['probes']}, {row['truth']['seconds']}) "
                f"| {s['xla_prediction'] if s['xla_prediction'] is not None else '-'} | {name} "
                f"| {s['max_batch_size']} | {s['search_probes']} ({s['search_ooms']}) "
                f"| {s['confirm_probes']} ({s['confirm_ooms']}) | {s['seconds']} "
                f"| {s['seconds'] / b:.2f} | {rate} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/max_jit.json"))
    ap.add_argument("--markdown", metavar="JSON")
    ap.add_argument("--phases", metavar="CASE", help="time one process's phases (model:budget)")
    ap.add_argument("--answer", type=int, default=32, help="with --phases: the answer's size")
    ap.add_argument("--cache-ab", action="store_true",
                    help="each search with the shared compile cache on and off, no truth")
    args = ap.parse_args()
    if args.phases:
        print(json.dumps(phases(args.phases, args.answer)))
        return
    if args.markdown:
        data = json.loads(Path(args.markdown).read_text())
        print(cache_markdown(data) if data.get("cache_ab") else markdown(args.markdown))
        return
    t0 = time.time()
    if args.cache_ab and args.out == ap.get_default("out"):
        args.out = str(ROOT / "bench/results/jit_cache.json")
    rows = [cache_ab(c, args.repeats) if args.cache_ab else run_case(c, args.repeats)
            for c in args.cases]
    import tensorflow as tf

    out = {"cases": args.cases, "repeats": args.repeats, "rows": rows, "cache_ab": args.cache_ab,
           "seconds": round(time.time() - t0, 1),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "tensorflow": tf.__version__},
           "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
           "command": "python bench/bench_jit.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
