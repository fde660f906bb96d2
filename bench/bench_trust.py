"""Benchmark: does the answer of ``batchfit max`` hold when the user trains?

Independently of the search's own probes: for each case it runs ``find_max_batch_size`` (what
``batchfit max`` runs) R times, then, for each run, the user's own ``model.fit`` (6 epochs of 4
batches, each with a validation pass of 1 batch, ``verbose=0``; ``--fit-epochs`` and
``--fit-batches``; 1 epoch of 4 before session 13) in fresh processes, k times at the answer
(``max_batch_size``) and k times at ``safe_batch_size``, and records how many of the k trained. The fresh process is set up as a probe worker is (the backend's
``worker_environment`` before TensorFlow is imported, ``configure_worker`` after: the capped
allocator holding its budget as one region, one op at a time, a fixed address-space layout and
hash seed): ``--settings worker``. ``--settings default`` caps the allocator only, with
TensorFlow's default CPU behaviour otherwise (what the README's emulation told users before);
``both`` runs each. A binsearch search (batchfit's, no confirmation) right after each guided
one, under the same load, gives that run's wall-time ratio; the case's ratio is their median.

Cost per search, confirmations included: probes (the search's, the confirmations' and, from
session 14, the safe size's under TensorFlow's default settings: ``safe_probes``),
out-of-memory errors, step-downs, seconds, and of those the seconds until the first probe began
(``startup_seconds``: the fork server and the first worker building and tracing the model, the
same for every policy; ``time_ratio_after_startup`` compares what follows). Results go to
bench/results/trust.json; ``--markdown`` prints the docs table.

    python bench/bench_trust.py                              # all cases, R=5, k=3 (hours)
    python bench/bench_trust.py --cases cnn:512MiB --runs 2  # one case, two searches
    python bench/bench_trust.py --markdown bench/results/trust.json
    python bench/bench_trust.py --cases transformer:128MiB --fits 222 226 --k 3 --out f.json

Cases are ``model:memory`` with the models of bench_max.py plus two ``keras.applications``
architectures built offline (``mobilenetv2``: MobileNetV2 at 96x96, ``resnet50``: ResNet50 at
64x64, both 10 classes, Adam).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {
    "cnn": "batchfit.examples.models:cnn",
    "transformer": "batchfit.examples.models:transformer",
    "lstm": "batchfit.examples.models:lstm",
    "demo": "batchfit.examples.models:demo_model",
    "mobilenetv2": f"{Path(__file__).resolve()}:mobilenetv2",
    "resnet50": f"{Path(__file__).resolve()}:resnet50",
}
DEFAULT_CASES = ["cnn:128MiB", "cnn:256MiB", "transformer:64MiB", "transformer:128MiB",
                 "lstm:16MiB", "lstm:32MiB", "mobilenetv2:512MiB", "resnet50:512MiB"]
#: batches per epoch of the user's fit (--fit-batches). More batches exercise the steps a long
#: epoch is made of (Keras's data pipeline fetching beside the step; batchfit.core.settle.
#: PROBE_STEPS), but the fit is on whole arrays, and the whole array sits in the capped allocator
#: (on a GPU it stays in host memory): 16 batches of the CNN at 140 are 26 MiB of a 128 MiB cap.
#: trust_s15.json ran with 16 and 2 epochs; the default stays 6 epochs of 4 (sessions 13-14)
FIT_BATCHES = 4
#: epochs of the user's fit (6 x 4 = 24 steps): a step's peak creeps up for ~15 steps before it
#: settles (batchfit.core.settle), so a 1-epoch fit of 4 batches passed sizes that training
#: for longer does not (set with --fit-epochs; runs before session 13 used 1)
FIT_EPOCHS = 6
FIT_TIMEOUT = 600.0


def mobilenetv2():
    import keras

    m = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=10)
    m.compile("adam", "sparse_categorical_crossentropy")
    return m


def resnet50():
    import keras

    m = keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10)
    m.compile("adam", "sparse_categorical_crossentropy")
    return m


# ------------------------------------------------------------------------- the user's fit


def _fixed_layout() -> None:
    """Re-exec once with address-space randomization off, as a probe worker does."""
    if not sys.platform.startswith("linux") or os.environ.get("BATCHFIT_FIXED_LAYOUT"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        current = libc.personality(0xFFFFFFFF)
        if current != -1 and libc.personality(current | 0x0040000) != -1:
            os.environ["BATCHFIT_FIXED_LAYOUT"] = "1"
            os.execv(sys.executable, [sys.executable, *sys.argv])


def _where_callback(where: dict):
    """A Keras callback keeping ``where`` at the phase, epoch and batch (1-based) fit is in."""
    import keras

    class Where(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            where.update(phase="training", epoch=epoch + 1, batch=0)

        def on_train_batch_begin(self, batch, logs=None):
            where["batch"] = batch + 1

        def on_test_begin(self, logs=None):
            where.update(phase="validation", batch=None)

    return Where()


def child(spec: str, batch: int, budget: int, settings: str, epochs: int) -> None:
    """In a fresh process: the user's fit at ``batch``; prints one JSON line."""
    if settings == "worker":
        _fixed_layout()
    from batchfit.backend import get_backend

    backend = get_backend()
    if settings == "worker":
        backend.configure_worker("CPU:0", budget)
    out: dict = {"batch": batch}
    where: dict = {"phase": "before fit"}
    try:
        model = backend.load_model(spec)
        batch_fn, _ = backend.make_batch_fn(model, None, None, 0)
        x, y = batch_fn(int(os.environ.get("BENCH_FIT_BATCHES", FIT_BATCHES)) * batch)
        xv, yv = batch_fn(batch)
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=epochs, validation_data=(xv, yv), verbose=0,
                  callbacks=[_where_callback(where)])
        out.update(fits=True, seconds=round(time.perf_counter() - t0, 2))
    except Exception as exc:  # noqa: BLE001 - recorded
        out.update(fits=False, oom=backend.is_oom_error(exc), where=where,
                   detail=f"{type(exc).__name__}: {str(exc)[:200]}")
    print("RESULT " + json.dumps(out), flush=True)


def user_fit(spec: str, batch: int, budget: int, settings: str, epochs: int) -> dict:
    """The user's fit at ``batch`` in a fresh process under ``settings``."""
    from batchfit.backend import get_backend

    env = dict(os.environ)
    if settings == "worker":
        env.update(get_backend().worker_environment("CPU:0", budget))
    else:
        env.update({"TF_CPU_ALLOCATOR_USE_BFC": "true",
                    "TF_CPU_BFC_MEM_LIMIT_IN_MB": str(budget >> 20),
                    "TF_ENABLE_ONEDNN_OPTS": "0", "CUDA_VISIBLE_DEVICES": "-1"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, str(batch),
           str(budget), settings, str(epochs)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=FIT_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"batch": batch, "fits": False, "detail": "timed out (stalled on memory?)",
                "wall": round(time.perf_counter() - t0, 1)}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"batch": batch, "fits": False, "wall": round(time.perf_counter() - t0, 1),
                "detail": f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"}
    return {**json.loads(line[7:]), "wall": round(time.perf_counter() - t0, 1)}


def fit_k(spec: str, batch: int, budget: int, settings: str, k: int, epochs: int) -> dict:
    runs = [user_fit(spec, batch, budget, settings, epochs) for _ in range(k)]
    return {"batch": batch, "fitted": sum(r["fits"] for r in runs), "of": k, "runs": runs}


def trains(spec: str, batch: int, budget: int, k: int, epochs: int, log: dict) -> bool:
    """Whether the user's fit (worker settings) trains at ``batch`` k times of k; stops at the
    first failure. ``log[batch]``: the runs."""
    runs: list[dict] = []
    for _ in range(k):
        runs.append(user_fit(spec, batch, budget, "worker", epochs))
        if not runs[-1]["fits"]:
            break
    log[batch] = {"fitted": sum(r["fits"] for r in runs), "tried": len(runs)}
    return all(r["fits"] for r in runs) and len(runs) == k


def fit_bisection(spec: str, budget: int, k: int, epochs: int, lo: int, hi: int) -> dict:
    """The largest size at which the user's own fit trains k of k, by bisection of fit runs.

    ``lo`` should train and ``hi`` should not; each is checked first (``lo`` halves until it
    trains, ``hi`` grows by a quarter until it fails, a few times at most). Bisection stops at
    1% of the size. Near the edge which sizes train is not monotone (the Transformer under 64
    MiB ran out of memory at 114 and trained at 120 in one session): the result is one path
    through the band, as a user bisecting by hand would find.
    """
    log: dict = {}
    for _ in range(4):
        if trains(spec, lo, budget, k, epochs, log):
            break
        hi, lo = lo, max(1, lo // 2)
    for _ in range(4):
        if not trains(spec, hi, budget, k, epochs, log):
            break
        lo, hi = hi, hi + max(1, hi // 4)
    while hi - lo > max(1, lo // 100):
        mid = (lo + hi) // 2
        if trains(spec, mid, budget, k, epochs, log):
            lo = mid
        else:
            hi = mid
    return {"largest_trained": lo, "smallest_failed": hi, "k": k,
            "sizes": {str(b): v for b, v in sorted(log.items())}}


# ------------------------------------------------------------------------------- a case


def search(spec: str, memory: str, policy: str, confirm: int) -> dict:
    """One ``find_max_batch_size`` (what ``batchfit max`` runs), with where its time went:
    ``startup_seconds`` until the first probe began (the fork server, the first worker
    building and tracing the model: the same for every policy), then the search's probes and
    the confirmations'."""
    from batchfit.verbs.maxbatch import find_max_batch_size
    from batchfit.workers.server import close_fork_server

    # Every search starts as `batchfit max` does, without a fork server kept from the search
    # before it (one kept warm would give the second search of a pair a head start).
    close_fork_server()
    t0 = time.perf_counter()
    first: list[float] = []
    trace: list[dict] = []

    def on_probe(p) -> None:
        now = time.perf_counter() - t0
        if not first:
            first.append(now - p.seconds)
        trace.append({"batch": p.batch_size, "outcome": p.outcome, "phase": p.phase,
                      "reused": p.reused, "seconds": round(p.seconds, 2), "at": round(now, 1),
                      "peak_mib": None if p.peak_bytes is None else round(p.peak_bytes / 2**20, 1),
                      **({"typical_mib": round(p.typical_peak_bytes / 2**20, 1)}
                         if getattr(p, "typical_peak_bytes", None) else {}),
                      **({"detail": p.detail[:90]} if not p.fits else {})})

    r = find_max_batch_size(spec, memory=memory, search=policy, confirm=confirm,
                            on_probe=on_probe)
    band = r.band
    searched = [p for p in r.probes if p.phase == "search"]
    confirms = [p for p in r.probes if p.phase == "confirm"]
    safes = [p for p in r.probes if p.phase == "safe"]
    startup = first[0] if first else None
    return {"search": policy, "confirm": confirm, "max_batch_size": r.max_batch_size,
            "safe_batch_size": r.safe_batch_size, "probes": len(r.probes),
            "ooms": r.oom_count, "seconds": round(r.seconds, 1),
            "startup_seconds": None if startup is None else round(startup, 1),
            "after_startup_seconds": None if startup is None else round(r.seconds - startup, 1),
            "search_probes": len(searched), "confirm_probes": len(confirms),
            "confirm_failures": sum(not p.fits for p in confirms),
            "safe_probes": len(safes), "safe_failures": sum(not p.fits for p in safes),
            "search_tolerance": r.search_tolerance, "trace": trace,
            "band": None if band is None else band.to_dict(),
            "margin_bytes": None if band is None else band.margin_bytes}


def run_case(case: str, runs: int, k: int, confirm: int, settings: list[str],
             out: Path, data: dict, epochs: int, bisect: bool = False,
             max_default: bool = True) -> dict:
    from batchfit.core.sizes import parse_size

    name, memory = case.split(":")
    spec, budget = MODELS[name], parse_size(memory)
    row: dict = {"case": case, "model": name, "memory": memory, "runs": []}
    data["cases"].append(row)
    row["binsearch_runs"] = []
    for i in range(runs):
        found = search(spec, memory, "guided", confirm)
        print(f"{case} run {i + 1}: max {found['max_batch_size']} safe "
              f"{found['safe_batch_size']} ({found['probes']} probes, {found['ooms']} OOM, "
              f"{found['seconds']} s)", flush=True)
        # binsearch right after, under the same load: the wall-time ratio is per pair
        base = search(spec, memory, "binsearch", 0)
        found["binsearch_seconds"] = base["seconds"]
        found["time_ratio_vs_binsearch"] = round(found["seconds"] / max(1e-9, base["seconds"]),
                                                 2)
        row["binsearch_runs"].append(base)
        print(f"  binsearch: {base['max_batch_size']} ({base['probes']} probes, "
              f"{base['ooms']} OOM, {base['seconds']} s): ratio "
              f"{found['time_ratio_vs_binsearch']}", flush=True)
        for s in settings:
            if s == "worker" or max_default:  # (the targets ask the answer of the emulation)
                found[f"fit_max_{s}"] = fit_k(spec, found["max_batch_size"], budget, s, k,
                                              epochs)
            found[f"fit_safe_{s}"] = fit_k(spec, found["safe_batch_size"], budget, s, k, epochs)
            at_max = found.get(f"fit_max_{s}", {}).get("fitted", "-")
            print(f"  {s}: max trained {at_max}/{k}, safe "
                  f"{found[f'fit_safe_{s}']['fitted']}/{k}", flush=True)
        row["runs"].append(found)
        out.write_text(json.dumps(data, indent=2) + "\n")
    row["binsearch"] = row["binsearch_runs"][0]
    row["time_ratio_vs_binsearch"] = round(statistics.median(
        r["time_ratio_vs_binsearch"] for r in row["runs"]), 2)
    row["time_ratio_after_startup"] = round(statistics.median(
        r["after_startup_seconds"] / max(1e-9, b["after_startup_seconds"])
        for r, b in zip(row["runs"], row["binsearch_runs"])
        if r["after_startup_seconds"] is not None and b["after_startup_seconds"] is not None), 2)
    answers = [r["max_batch_size"] for r in row["runs"]]
    widths = [r["band"]["never"] - r["band"]["reliable"] for r in row["runs"]
              if r["band"] and r["band"].get("never") is not None]
    row["answers"] = answers
    row["answer_spread"] = max(answers) - min(answers)
    row["widest_band"] = max(widths, default=None)
    row["runs_agree_within_band"] = bool(widths) and row["answer_spread"] <= max(widths)
    if bisect:
        first = row["runs"][0]
        never = (first.get("band") or {}).get("never")
        hi = never if never and never > first["max_batch_size"] else (
            first["max_batch_size"] + max(1, first["max_batch_size"] // 4))
        truth = fit_bisection(spec, budget, k, epochs, first["safe_batch_size"], hi)
        row["fit_bisection"] = truth
        row["answer_vs_bisection"] = [round(a / max(1, truth["largest_trained"]), 3)
                                      for a in answers]
        print(f"  fit bisection: largest trained {k}/{k}: {truth['largest_trained']}, answers "
              f"{row['answer_vs_bisection']} of it", flush=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return row


# ------------------------------------------------------------------------------ the table


def markdown(data: dict) -> str:
    settings = data.get("settings", ["worker"])
    head = ("| case | run | max | safe (margin) | " + " | ".join(
        f"fit@max {s} | fit@safe {s}" for s in settings)
        + " | probes (search + confirm [+ safe]) | OOMs | step-downs | s (startup) | binsearch s "
          "(probes, OOMs) | ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in data["cases"]:
        bins = row.get("binsearch_runs") or [row.get("binsearch", {})] * len(row["runs"])
        for i, (r, b) in enumerate(zip(row["runs"], bins), 1):
            margin = r.get("margin_bytes")
            m = f" ({margin / (1 << 20):.1f} MiB)" if margin else ""
            fits = " | ".join(
                (f"{r[f'fit_max_{s}']['fitted']}/{r[f'fit_max_{s}']['of']}"
                 if f"fit_max_{s}" in r else "-") + " | "
                f"{r[f'fit_safe_{s}']['fitted']}/{r[f'fit_safe_{s}']['of']}" for s in settings
                if f"fit_safe_{s}" in r)
            split = (f" ({r['search_probes']} + {r['confirm_probes']}"
                     + (f" + {r['safe_probes']}" if "safe_probes" in r else "") + ")"
                     if "search_probes" in r else "")
            start = f" ({r['startup_seconds']})" if r.get("startup_seconds") is not None else ""
            downs = (r.get("band") or {}).get("step_downs", "-")
            ratio = r.get("time_ratio_vs_binsearch", row.get("time_ratio_vs_binsearch", "-"))
            lines.append(f"| {row['case']} | {i} | {r['max_batch_size']} | "
                         f"{r['safe_batch_size']}{m} | {fits} | {r['probes']}{split} | "
                         f"{r['ooms']} | {downs} | {r['seconds']}{start} | "
                         f"{b.get('seconds', '-')} ({b.get('probes', '-')}, "
                         f"{b.get('ooms', '-')}) | {ratio} |")
    for row in data["cases"]:
        t = row.get("fit_bisection")
        if t:
            lines.append(f"\n{row['case']}: the user's fit trained {t['k']}/{t['k']} up to "
                         f"{t['largest_trained']} ({t['smallest_failed']} did not); answers "
                         f"{', '.join(str(x) for x in row['answer_vs_bisection'])} of it "
                         f"(sizes tried: {t['sizes']})")
    return "\n".join(lines)


def fits_only(case: str, sizes: list[int], k: int, epochs: int, out: Path) -> None:
    """The user's fit k times at each size (worker settings): JSON with where each failed."""
    from batchfit.core.sizes import parse_size

    name, memory = case.split(":")
    spec, budget = MODELS[name], parse_size(memory)
    data = {"benchmark": "trust_fits", "command": " ".join(sys.argv), "case": case,
            "fit": f"{epochs} epoch(s) of {os.environ['BENCH_FIT_BATCHES']} batches, each + 1 "
                   f"validation batch, fresh process, worker settings", "sizes": []}
    for b in sizes:
        row = fit_k(spec, b, budget, "worker", k, epochs)
        data["sizes"].append(row)
        where = [r.get("where") for r in row["runs"] if not r["fits"]]
        print(f"{case} {b}: trained {row['fitted']}/{k}; failed at {where}", flush=True)
        out.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    ap.add_argument("--runs", type=int, default=5, help="searches per case (R, default 5)")
    ap.add_argument("--k", type=int, default=3, help="user fits per size (default 3)")
    ap.add_argument("--confirm", type=int, default=3, help="the search's confirm= (default 3)")
    ap.add_argument("--settings", choices=["worker", "default", "both"], default="both")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trust.json"))
    ap.add_argument("--label", default="", help="a note saved with the results")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a saved run")
    ap.add_argument("--fit-epochs", type=int, default=FIT_EPOCHS,
                    help=f"epochs of the user's fit (default {FIT_EPOCHS})")
    ap.add_argument("--bisect", action="store_true",
                    help="then bisect the user's fit (worker settings, k of k) for the largest "
                         "size that trains, from the first run's safe size")
    ap.add_argument("--no-max-default", action="store_true",
                    help="under TensorFlow's default settings fit only the safe size (the "
                         "targets ask the answer of the emulation, the safe size of both)")
    ap.add_argument("--fit-batches", type=int, default=FIT_BATCHES,
                    help=f"batches per epoch of the user's fit (default {FIT_BATCHES})")
    ap.add_argument("--fits", nargs="+", type=int, metavar="SIZE",
                    help="no search: the user's fit k times at each size of the first case "
                         "(worker settings), with where each one ran out of memory")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    os.environ["BENCH_FIT_BATCHES"] = str(args.fit_batches)  # the fits' processes read it
    if args.fits:
        fits_only(args.cases[0], args.fits, args.k, args.fit_epochs, Path(args.out))
        return
    settings = ["worker", "default"] if args.settings == "both" else [args.settings]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": "trust", "label": args.label, "command": " ".join(sys.argv),
            "stall_watch": os.environ.get("BATCHFIT_STALL_WATCH", "1") != "0",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform()},
            "runs": args.runs, "k": args.k, "confirm": args.confirm, "settings": settings,
            "fit": f"{args.fit_epochs} epoch(s) of {args.fit_batches} batches, each + 1 validation "
                   f"batch, fresh process",
            "cases": []}
    t0 = time.perf_counter()
    for case in args.cases:
        run_case(case, args.runs, args.k, args.confirm, settings, out, data, args.fit_epochs,
                 args.bisect, max_default=not args.no_max_default)
    data["seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(data))


if __name__ == "__main__":
    main()
