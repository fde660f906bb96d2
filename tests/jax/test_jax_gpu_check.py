"""bench/gpu_check.py, the GPU run prepared for a device machine, kept from rotting: its dry run
(the same code on the CPU, one small model) end to end, its time limit, its refusal to call a
CPU a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, check=False, cwd=ROOT)


def test_the_dry_run_writes_every_section(tmp_path) -> None:
    out = tmp_path / "dry.json"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["skipped"] == []
    (entry,) = report["models"].values()
    (row,) = entry["max"]
    truth = row["truth"]
    assert truth["kind"] == "exhaustive" and truth["max"] > 0
    # both policies find the exhaustive bisection's answer (compile-time memory on CPU is
    # deterministic), every probe in a fresh process
    assert row["guided"]["max"] == row["binsearch"]["max"] == truth["max"]
    assert "no step ran under the budget" in row["environment"]["memory_source"]
    pred = row["prediction"]
    assert pred["batch_size"] == row["guided"]["max"] and pred["ratio"] == 1.0  # CPU: same
    assert [p["outcome"] for p in entry["tune"]["points"]] == ["ok", "ok"]
    assert all(p["compile_seconds"] > 0 for p in entry["tune"]["points"])


def test_past_the_time_limit_sections_are_skipped_and_listed(tmp_path) -> None:
    out = tmp_path / "none.json"
    proc = _run("--dry-run", "--time-limit", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["skipped"]) >= 4 and any("tune" in s for s in report["skipped"])


def test_without_a_gpu_it_refuses_unless_dry_run(tmp_path) -> None:
    proc = _run("--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
