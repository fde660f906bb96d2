"""Results are plain data: JSON round trips, schema versions, re-rendering without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from batchfit.errors import InvalidInputError
from batchfit.results import SCHEMA_VERSION, MaxBatchResult, MemoryModel, Probe, load_result


def _result() -> MaxBatchResult:
    probes = [Probe(8, True, "fits", 10 << 20, 1.5, 0.01),
              Probe(64, True, "fits", 40 << 20, 0.4, 0.02),
              Probe(65, False, "oom", None, 10.2, None, "ResourceExhaustedError: OOM when ...")]
    return MaxBatchResult(
        max_batch_size=64, safe_batch_size=57, headroom=0.1, memory_budget_bytes=48 << 20,
        budget_source="user", device="CPU:0", isolation="process", strategy="guided",
        granularity=1, upper_bound=1 << 20, bracketed=True,
        memory_model=MemoryModel(6e6, 5.6e5, 0.999, 2), probes=probes, seconds=12.1,
        model_name="m", notes=["a note"], environment={"tensorflow": "2.21.0"})


def test_round_trip_is_exact(tmp_path) -> None:
    r = _result()
    path = tmp_path / "run.json"
    r.to_json(path)
    assert MaxBatchResult.from_json(path) == r
    assert load_result(path) == r


def test_json_has_the_documented_keys() -> None:
    data = json.loads(_result().to_json())
    for key in ("max_batch_size", "safe_batch_size", "memory_budget_bytes", "strategy",
                "probes", "schema_version", "oom_count"):
        assert key in data
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["oom_count"] == 1
    for p in data["probes"]:
        assert {"batch_size", "fits", "peak_bytes", "seconds"} <= set(p)
        assert isinstance(p["fits"], bool)


def test_newer_schema_is_refused_with_advice() -> None:
    data = json.loads(_result().to_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="upgrade batchfit"):
        MaxBatchResult.from_dict(data)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="no such result file"):
        load_result(tmp_path / "nope.json")


def test_memory_model_predicts_and_inverts() -> None:
    m = MemoryModel(fixed_bytes=100.0, per_sample_bytes=10.0)
    assert m.predict(5) == 150.0
    assert m.max_batch(155.0) == 5
    assert m.max_batch(1000.0, granularity=8) == 88
    assert m.max_batch(50.0) == 0


def test_report_renders_saved_run_without_tensorflow(tmp_path) -> None:
    path = tmp_path / "run.json"
    _result().to_json(path)
    code = ("import sys; from batchfit.cli import main; rc = main(['report', sys.argv[1]]); "
            "assert 'tensorflow' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "64" in proc.stdout and "guided" in proc.stdout
