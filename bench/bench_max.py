"""Benchmark: guided vs Lightning's binsearch and power, against the true maximum.

For each (model, budget) case it runs an exhaustive bisection in fresh processes (the ground
truth), then the three strategies side by side (each as a user would; the process's fork server,
kept between searches, is warm for all of them alike), and records
probes, out-of-memory errors, wall time and the answer. Results go to bench/results/max.json;
``--markdown`` prints the README table.

    python bench/bench_max.py                      # all cases (about 10 min on 2 cores)
    python bench/bench_max.py --cases cnn:128MiB   # one case
    python bench/bench_max.py --markdown bench/results/max.json
    python bench/bench_max.py --band cnn:128MiB 200,210,219,230 --repeats 3
                                                   # how often each size fits (fresh processes)
    python bench/bench_max.py --markdown bench/results/max_band.json
    python bench/bench_max.py --rounds 3 --strategies guided guided@0.05 binsearch \
        --out bench/results/max_rounds.json       # the truth and each answer, three times over
    python bench/bench_max.py --markdown bench/results/max_rounds.json

A strategy ``guided@T`` is guided with ``search_tolerance=T`` (plain ``guided`` uses the
library's default, 0.02).
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

from batchfit.core.search import POLICY_NAMES
from batchfit.verbs.maxbatch import find_max_batch_size
from batchfit.verbs.verify import exhaustive_max, fit_rates

MODELS = {
    "cnn": "batchfit.examples.models:cnn",
    "transformer": "batchfit.examples.models:transformer",
    "lstm": "batchfit.examples.models:lstm",
    "demo": "batchfit.examples.models:demo_model",
}
DEFAULT_CASES = ["cnn:128MiB", "cnn:256MiB", "transformer:64MiB", "transformer:128MiB",
                 "lstm:16MiB", "lstm:32MiB"]
# The search policies (the option keeps its name, --strategies, and the JSON its key,
# "strategies", so earlier results stay comparable).
STRATEGIES = list(POLICY_NAMES)


def run_case(case: str, strategies: list[str], truth: bool) -> dict:
    name, memory = case.split(":")
    spec = MODELS[name]
    row: dict = {"case": case, "model": name, "memory": memory, "strategies": {}}
    # The truth first: the process's fork server (kept between searches) is then started and
    # warm for every strategy alike; only the first search of a process pays its start.
    if truth:
        best, probes, secs = exhaustive_max(spec, memory)
        row["true_max"] = best
        row["truth"] = {"probes": len(probes), "ooms": sum(not p.fits for p in probes),
                        "seconds": round(secs, 1),
                        "sequence": [(p.batch_size, p.outcome, p.peak_bytes) for p in probes]}
        print(f"{case:20s} truth     max={best:6d} probes={len(probes):3d} {secs:6.1f}s", flush=True)
    for strategy in strategies:
        name_, _, tol = strategy.partition("@")
        extra = {"search_tolerance": float(tol)} if tol else {}
        r = find_max_batch_size(spec, memory=memory, search=name_, **extra)
        row["strategies"][strategy] = {
            "max_batch_size": r.max_batch_size, "probes": len(r.probes),
            "ooms": r.oom_count, "seconds": round(r.seconds, 1), "bracketed": r.bracketed,
            "sequence": [(p.batch_size, p.outcome, p.peak_bytes) for p in r.probes]}
        print(f"{case:20s} {strategy:9s} max={r.max_batch_size:6d} probes={len(r.probes):3d} "
              f"ooms={r.oom_count:2d} {r.seconds:6.1f}s  "
              f"{[(p.batch_size, p.outcome[0]) for p in r.probes]}", flush=True)
    return row


def run_band(case: str, sizes: list[int], repeats: int, out: Path,
             probe_timeout: float = 600.0) -> None:
    """Fit rate of each size in fresh processes, added to ``out`` (bench/results/max_band.json)."""
    name, memory = case.split(":")
    t0 = time.time()

    def show(p) -> None:
        print(f"{case:20s} b={p.batch_size:5d} {p.outcome:9s} "
              f"peak={(p.peak_bytes or 0) / 2**20:6.1f} MiB {p.seconds:5.1f}s", flush=True)

    rates = fit_rates(MODELS[name], memory, sizes, repeats=repeats, on_probe=show,
                      probe_timeout=probe_timeout)
    data = json.loads(out.read_text()) if out.exists() else {"benchmark": "max_band", "rows": []}
    data["rows"] = [r for r in data["rows"] if r["case"] != case]
    data["rows"].append({
        "case": case, "date": time.strftime("%Y-%m-%d %H:%M"), "repeats": repeats,
        "seconds": round(time.time() - t0, 1),
        "probe_timeout": probe_timeout,
        "command": f"python bench/bench_max.py --band {case} "
                   f"{','.join(map(str, sizes))} --repeats {repeats} "
                   f"--probe-timeout {probe_timeout:g}",
        "sizes": [{"batch_size": b, "fits": sum(p.fits for p in ps), "runs": len(ps),
                   "outcomes": [p.outcome for p in ps],
                   "peak_mib": [None if p.peak_bytes is None else round(p.peak_bytes / 2**20, 1)
                                for p in ps]} for b, ps in rates.items()]})
    out.write_text(json.dumps(data, indent=1) + "\n")
    for r in data["rows"][-1]["sizes"]:
        print(f"{case:20s} b={r['batch_size']:5d} fits {r['fits']}/{r['runs']} {r['outcomes']}")


def band_markdown(data: dict) -> str:
    """The README table of ``--band`` runs: how often each size fitted in fresh processes."""
    header = "| case | fits / runs, by batch size | every size fitted up to | no size fitted from |"
    lines = [header, "|---|---|---|---|"]
    for row in data["rows"]:
        sizes = sorted(row["sizes"], key=lambda r: r["batch_size"])
        cells = ", ".join(f"{r['batch_size']}: {r['fits']}/{r['runs']}" for r in sizes)
        always = "-"
        for r in sizes:
            if r["fits"] < r["runs"]:
                break
            always = str(r["batch_size"])
        never = "-"
        for r in reversed(sizes):
            if r["fits"] > 0:
                break
            never = str(r["batch_size"])
        lines.append(f"| {row['case']} | {cells} | {always} | {never} |")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    lines = ["| model | budget | true max | strategy | result | probes | OOMs | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        for s, v in row["strategies"].items():
            lines.append(f"| {row['model']} | {row['memory']} | {row.get('true_max', '?')} | {s} "
                         f"| {v['max_batch_size']} | {v['probes']} | {v['ooms']} | {v['seconds']} |")
    return "\n".join(lines) + "\n\n" + targets_markdown(data)


def targets_markdown(data: dict) -> str:
    """Guided against issue 2's targets: the true max or within 2% below it, at most 6 probes
    and 1 out-of-memory, at most half of binsearch's wall time."""
    lines = ["| case | guided vs true max | probes | OOMs | wall time vs binsearch | all met |",
             "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        g, b = row["strategies"].get("guided"), row["strategies"].get("binsearch")
        if g is None:
            continue
        truth = row.get("true_max")
        if truth:
            diff = (g["max_batch_size"] - truth) / truth
            vs = (f"{g['max_batch_size']} = {truth}" if diff == 0
                  else f"{g['max_batch_size']}, {diff:+.1%}")
            exact = -0.02 <= diff <= 0
        else:
            vs, exact = f"{g['max_batch_size']} (no true max)", False
        ratio = g["seconds"] / b["seconds"] if b and b["seconds"] else None
        met = exact and g["probes"] <= 6 and g["ooms"] <= 1 and ratio is not None and ratio <= 0.5
        lines.append(f"| {row['model']}, {row['memory']} | {vs} | {g['probes']} | {g['ooms']} | "
                     f"{'-' if ratio is None else f'{ratio:.0%}'} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def rounds_markdown(data: dict) -> str:
    """The README tables of a ``--rounds`` run: the truth and each strategy's answers, round by
    round, and guided judged against the truth's own spread."""
    cases: dict[str, list[dict]] = {}
    for rnd in data["rounds"]:
        for row in rnd:
            cases.setdefault(row["case"], []).append(row)
    strategies = list(data["strategies"])
    head = "| case | true max, by round | " + " | ".join(
        f"{s}: result (probes, OOMs)" for s in strategies) + " |"
    lines = [head, "|" + "---|" * (2 + len(strategies))]
    for case, rows in cases.items():
        truths = [r.get("true_max") for r in rows]
        cells = [", ".join(str(t) for t in truths)]
        for s in strategies:
            cells.append(", ".join(f"{r['strategies'][s]['max_batch_size']} "
                                   f"({r['strategies'][s]['probes']}, {r['strategies'][s]['ooms']})"
                                   for r in rows if s in r["strategies"]))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", ("| strategy | within 2% below that round's truth | ... below some round's truth "
              "| probes <= 6 | OOMs <= 1 | <= half binsearch's time | all four | probes, median "
              "(range) | OOMs, median (range) |"), "|---|---|---|---|---|---|---|---|---|"]
    for s in strategies:
        same = some = n = few = safe = fast = every = 0
        probes, ooms = [], []
        for rows in cases.values():
            truths = [r["true_max"] for r in rows if r.get("true_max")]
            for r in rows:
                v = r["strategies"].get(s)
                if v is None:
                    continue
                n += 1
                probes.append(v["probes"])
                ooms.append(v["ooms"])
                t = r.get("true_max")
                exact = bool(t) and -0.02 <= (v["max_batch_size"] - t) / t <= 0
                same += exact
                some += any(-0.02 <= (v["max_batch_size"] - u) / u <= 0 for u in truths)
                few += v["probes"] <= 6
                safe += v["ooms"] <= 1
                b = r["strategies"].get("binsearch")
                quick = bool(b and b["seconds"]) and v["seconds"] <= 0.5 * b["seconds"]
                fast += quick
                every += exact and v["probes"] <= 6 and v["ooms"] <= 1 and quick

        def med(xs: list) -> str:
            return f"{sorted(xs)[len(xs) // 2]:g} ({min(xs)}-{max(xs)})" if xs else "-"

        lines.append(f"| {s} | {same}/{n} | {some}/{n} | {few}/{n} | {safe}/{n} | {fast}/{n} "
                     f"| {every}/{n} | {med(probes)} | {med(ooms)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    ap.add_argument("--strategies", nargs="*", default=STRATEGIES,
                    help="search policies to compare (search=); NAME@T: guided with "
                         "search_tolerance=T")
    ap.add_argument("--no-truth", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/max.json"))
    ap.add_argument("--markdown", metavar="JSON")
    ap.add_argument("--band", nargs=2, metavar=("CASE", "SIZES"),
                    help="fit rate of each size (comma-separated) in fresh processes")
    ap.add_argument("--repeats", type=int, default=3, help="--band: probes per size")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every case this many times over (round-robin); the JSON keeps "
                         "each round")
    ap.add_argument("--probe-timeout", type=float, default=600.0,
                    help="--band: seconds before a stalled probe counts as not fitting")
    args = ap.parse_args()
    if args.band:
        run_band(args.band[0], [int(b) for b in args.band[1].split(",")], args.repeats,
                 ROOT / "bench/results/max_band.json", args.probe_timeout)
        return
    if args.markdown:
        saved = json.loads(Path(args.markdown).read_text())
        if saved.get("benchmark") == "max_rounds":
            print(rounds_markdown(saved))
        elif saved.get("benchmark") == "max_band":
            print(band_markdown(saved))
            if "earlier" in saved:
                print(f"\nEarlier: {saved['earlier']['note']}\n")
                print(band_markdown(saved["earlier"]))
        else:
            print(markdown(saved))
        return
    t0 = time.time()
    import keras
    import tensorflow as tf
    data = {"benchmark": "max", "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "tensorflow": tf.__version__, "keras": keras.__version__},
            "command": "python bench/bench_max.py " + " ".join(sys.argv[1:]),
            "seconds": 0.0, "rows": []}
    if args.rounds > 1:
        del data["rows"]
        data.update(benchmark="max_rounds", strategies=args.strategies, rounds=[])
        for _ in range(args.rounds):   # round-robin: a slow spell of the machine hits all cases
            data["rounds"].append([])
            for case in args.cases:
                data["rounds"][-1].append(run_case(case, args.strategies, not args.no_truth))
                data["seconds"] = round(time.time() - t0, 1)
                Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
        print(rounds_markdown(data))
        return
    for case in args.cases:  # written after every case, so a stopped run keeps what it measured
        data["rows"].append(run_case(case, args.strategies, not args.no_truth))
        data["seconds"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(markdown(data))


if __name__ == "__main__":
    main()
