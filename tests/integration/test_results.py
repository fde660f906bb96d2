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
        budget_source="user", device="CPU:0", isolation="process", search="guided",
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
    for key in ("max_batch_size", "safe_batch_size", "memory_budget_bytes", "search",
                "strategy", "probes", "schema_version", "oom_count"):
        assert key in data
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["oom_count"] == 1
    for p in data["probes"]:
        assert {"batch_size", "fits", "peak_bytes", "seconds"} <= set(p)
        assert isinstance(p["fits"], bool)


def test_the_search_policy_is_saved_under_both_names_for_one_release() -> None:
    data = json.loads(_result().to_json())
    assert data["search"] == data["strategy"] == "guided"  # an older batchfit reads "strategy"


def test_a_run_saved_before_the_rename_still_loads() -> None:
    data = json.loads(_result().to_json())
    del data["search"]                      # as written before search= replaced strategy=
    data["strategy"] = "binsearch"
    loaded = load_result(json.dumps(data))
    assert isinstance(loaded, MaxBatchResult)
    assert loaded.search == "binsearch"
    assert loaded == MaxBatchResult.from_dict(data)


def test_a_tune_run_saved_before_the_rename_still_loads() -> None:
    from batchfit.results import (
        Recommendation,
        ThroughputPoint,
        ThroughputResult,
        TuneResult,
    )

    tune = TuneResult(
        recommendation=Recommendation(batch_size=32, decided_by="throughput", reasons=(),
                                      verdicts=()),
        max_batch=_result(),
        throughput=ThroughputResult(points=[ThroughputPoint(batch_size=32, outcome="ok",
                                                            samples_per_second=100.0)],
                                    knee=32, tolerance=0.05, device="CPU:0",
                                    window_target_seconds=0.3, gpu_metrics=""))
    data = json.loads(tune.to_json())
    del data["max_batch"]["search"]
    loaded = load_result(json.dumps(data))
    assert loaded == tune and loaded.max_batch.search == "guided"


def test_the_old_attribute_name_warns_and_answers() -> None:
    with pytest.warns(FutureWarning, match="search"):
        assert _result().strategy == "guided"


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


@pytest.mark.parametrize("text, words", [
    ("{}", ["max_batch", "missing"]),                                  # foreign object
    ('{"name": "something else", "version": 3}', ["missing"]),
    ('{"result_kind": ["tune"]}', ["unknown result kind"]),
    ('{"result_kind": "tune", "schema_version": "2"}', ["schema_version"]),
    ('{"result_kind": "tune", "schema_version": null}', ["schema_version"]),
    ('{"result_kind": "noise_scale", "schema_version": 1}', ["noise_scale", "missing"]),
])
def test_malformed_or_foreign_json_is_bad_input(text, words) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_result(text)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("probes", None), ("probes", "abc"), ("memory_model", 5), ("max_batch_size", "64"),
    ("bracketed", "yes"), ("notes", {"a": 1})])
def test_a_field_of_the_wrong_type_is_bad_input(key, value) -> None:
    # Loaded as it was, such a file crashed the renderer later (an internal error, exit 1).
    data = json.loads(_result().to_json())
    data[key] = value
    with pytest.raises(InvalidInputError, match="not a valid batchfit 'max_batch' result"):
        load_result(json.dumps(data))
    data = json.loads(_result().to_json())
    data["probes"][0]["seconds"] = "1.5"
    with pytest.raises(InvalidInputError, match="expected a number"):
        load_result(json.dumps(data))


def test_newer_schema_is_bad_input() -> None:
    data = json.loads(_result().to_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(InvalidInputError, match="upgrade batchfit"):
        load_result(json.dumps(data))


def test_version_1_and_unversioned_runs_still_load() -> None:
    data = json.loads(_result().to_json())
    for key in ("replicas", "distribute", "search_tolerance", "global_max_batch_size",
                "global_safe_batch_size", "oom_count"):
        data.pop(key)
    data["schema_version"] = 1
    assert load_result(json.dumps(data)).replicas == 1
    data.pop("schema_version"), data.pop("result_kind")
    assert load_result(json.dumps(data)).max_batch_size == 64


def test_unreadable_result_file_is_bad_input(tmp_path) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidInputError, match="cannot read result file"):
        load_result(path)


def _render(result, width: int = 100) -> str:
    from rich.console import Console

    from batchfit.report import render

    console = Console(width=width, color_system=None)
    with console.capture() as cap:
        render(result, console)
    return cap.get()


def test_noise_notes_with_brackets_print_as_they_are() -> None:
    # A note is plain text: rich markup in it raised MarkupError (an internal error, exit 1).
    from batchfit.results import NoiseScaleResult

    r = NoiseScaleResult(b_simple=420.0, low=300.0, high=610.0, confidence=0.95,
                         gradient_sq_norm=0.01, trace_sigma=4.2, small_batch=32, big_batch=256,
                         notes=["inputs [/x] and [bold]y[/bold]"])
    assert "note: inputs [/x] and [bold]y[/bold]" in _render(load_result(r.to_json()))


def test_model_names_with_brackets_print_as_they_are() -> None:
    # Names are plain text too: a Keras model may be named "net[/x]" (MarkupError before).
    import dataclasses

    from batchfit.results import NoiseScaleResult

    r = dataclasses.replace(_result(), model_name="net[/x]")
    assert "net[/x]" in _render(load_result(r.to_json()))
    n = NoiseScaleResult(b_simple=420.0, low=300.0, high=610.0, confidence=0.95,
                         gradient_sq_norm=0.01, trace_sigma=4.2, small_batch=32, big_batch=256,
                         model_name="net[/x]")
    assert "net[/x]" in _render(load_result(n.to_json()))


def _throughput(samples: list[float]):
    from batchfit.results import ThroughputPoint, ThroughputResult

    points = [ThroughputPoint(batch_size=b, outcome="ok", samples_per_second=s, low=0.9 * s,
                              high=1.1 * s, cv=0.02, median_error=0.012,
                              step_seconds=b / s, steps_per_window=10,
                              window_seconds=[0.3] * 15)
              for b, s in zip([2 ** i for i in range(len(samples))], samples)]
    return ThroughputResult(points=points, knee=points[-3].batch_size, tolerance=0.05,
                            device="CPU:0", window_target_seconds=0.3, gpu_metrics="none")


def test_slow_throughput_is_not_printed_as_zero() -> None:
    # A large model on a CPU: 0.4 samples/s read "0" in the table and in the progress line.
    from rich.console import Console

    from batchfit.report.tune import PointLog

    t = _throughput([0.4, 0.7, 45.25, 3000.0])
    out = _render(t)
    row = next(line for line in out.splitlines() if line.strip().startswith("1 "))
    assert "0.4" in row and "0.36-0.44" in row, row
    assert "45.2" in out and "3,000" in out and "2700-3300" in out
    console = Console(width=100, color_system=None)
    with console.capture() as cap:
        PointLog(console)(t.points[0])
    assert "0.4 samples/s" in cap.get()


def test_tune_table_keeps_every_number_whole_in_80_columns() -> None:
    # Not a terminal (a CI log, a pipe), rich renders 80 columns wide: the recommendation mark
    # made the throughput table too wide and rich cut numbers and headers ("160.0 …", "bat…").
    import dataclasses

    from batchfit.results import Recommendation, TuneResult

    t = _throughput([3000.0 + 3 * 2 ** i for i in range(10)])
    t = dataclasses.replace(t, points=[dataclasses.replace(p, step_seconds=p.batch_size / 3200)
                                       for p in t.points])
    knee = t.knee
    r = TuneResult(recommendation=Recommendation(knee, "throughput", ("it stops",), ()),
                   max_batch=_result(), throughput=t)
    out = _render(load_result(r.to_json()), width=80)
    assert "…" not in out, out
    assert "batch   samples/s   ± s.e." in out and "160.0 ms" in out and "recommended" in out
