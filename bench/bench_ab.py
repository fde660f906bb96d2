"""A/B: ``bench/bench_max.py`` of two checkouts, interleaved case by case, in one run.

A change that should not move the search's figures (a restructure) is checked by running the old
and the new code side by side: for each round and case, the old checkout's ``bench_max.py`` and
then the new one's (each in a fresh process, each with its own exhaustive-bisection truth), so
both meet the same machine load. Each side's answer is held against its own truth. Results go to
one JSON; ``--markdown`` prints the table for docs/benchmarks.md.

    git worktree add --detach /tmp/old <commit>
    python bench/bench_ab.py --old /tmp/old --new . --cases cnn:128MiB transformer:64MiB \\
        lstm:16MiB --strategies guided binsearch --out bench/results/max_ab.json
    python bench/bench_ab.py --markdown bench/results/max_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_side(checkout: Path, case: str, strategies: list[str]) -> dict:
    """One case of ``bench_max.py`` in ``checkout``, in a fresh process; its JSON row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        env = dict(os.environ, PYTHONPATH=str(checkout / "src"), TF_CPP_MIN_LOG_LEVEL="2")
        cmd = [sys.executable, str(checkout / "bench/bench_max.py"), "--cases", case,
               "--strategies", *strategies, "--out", str(out)]
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{checkout}: {case} failed:\n{proc.stderr[-3000:]}")
        print(proc.stdout, end="", flush=True)
        return json.loads(out.read_text())["rows"][0]


def commit_of(checkout: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout,
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "?"


def markdown(data: dict) -> str:
    """Per case and strategy: old and new answers against their own truths, probes, OOMs, s."""
    lines = ["| round | case | side | truth | strategy | answer | vs truth | probes | OOMs | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        for side in ("old", "new"):
            r = row[side]
            truth = r.get("true_max")
            for s, v in r["strategies"].items():
                rel = f"{v['max_batch_size'] / truth - 1:+.1%}" if truth else "-"
                lines.append(f"| {row['round']} | {row['case']} | {side} | {truth} | {s} | "
                             f"{v['max_batch_size']} | {rel} | {v['probes']} | {v['ooms']} | "
                             f"{v['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path)
    ap.add_argument("--new", type=Path, default=ROOT)
    ap.add_argument("--cases", nargs="*", default=["cnn:128MiB", "transformer:64MiB",
                                                   "lstm:16MiB"])
    ap.add_argument("--strategies", nargs="*", default=["guided", "binsearch"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/max_ab.json")
    ap.add_argument("--markdown", metavar="JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.old is None:
        ap.error("--old CHECKOUT is required (a worktree of the commit to compare against)")
    data = {"benchmark": "max_ab", "date": time.strftime("%Y-%m-%d %H:%M"),
            "old": commit_of(args.old), "new": commit_of(args.new),
            "command": " ".join(["python bench/bench_ab.py", "--cases", *args.cases,
                                 "--strategies", *args.strategies, "--rounds",
                                 str(args.rounds)]), "rows": []}
    for rnd in range(1, args.rounds + 1):
        for case in args.cases:
            row = {"round": rnd, "case": case,
                   "old": run_side(args.old.resolve(), case, args.strategies),
                   "new": run_side(args.new.resolve(), case, args.strategies)}
            data["rows"].append(row)
            args.out.write_text(json.dumps(data, indent=1) + "\n")  # kept if stopped
    print(markdown(data))


if __name__ == "__main__":
    main()
