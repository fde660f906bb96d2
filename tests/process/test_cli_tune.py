"""``batchfit tune`` end to end on the built-in example: JSON, plot, report, clean logs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def tune_run(run_cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    js, png = out / "run.json", out / "run.png"
    # The built-in example on its emulated device; --max-batch keeps the test short.
    proc = run_cli("tune", "--max-batch", "64", "--windows", "3", "--window-seconds", "0.1",
                   "--target", "1000", "--json", str(js), "--plot", str(png))
    return proc, js, png


def test_tune_runs_the_built_in_example(tune_run) -> None:
    proc, _, _ = tune_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "built-in example" in out
    assert "recommended batch size" in out
    assert "decided by" in out
    assert "gradient_accumulation_steps=" in out  # the target 1000 does not fit in 64
    # progress: one line per probe and per timed size, plain (stdout is not a terminal)
    assert out.count("probe ") >= 2 and out.count("time   batch") >= 7
    assert "\x1b[" not in out and "\r" not in out


def test_json_holds_everything_measured(tune_run) -> None:
    proc, js, _ = tune_run
    assert proc.returncode == 0
    data = json.loads(js.read_text())
    assert data["result_kind"] == "tune" and data["schema_version"] >= 1
    rec = data["recommendation"]
    assert 1 <= rec["batch_size"] <= data["max_batch"]["max_batch_size"] <= 64
    assert rec["decided_by"] in ("throughput", "memory") and rec["reasons"]
    sizes = [p["batch_size"] for p in data["throughput"]["points"]]
    assert sizes[:7] == [1, 2, 4, 8, 16, 32, 64]
    for p in data["throughput"]["points"]:
        assert p["outcome"] == "ok" and p["samples_per_second"] > 0
        # at least --windows, at most 3x; more only while the median's error is above 2%
        n = len(p["window_seconds"])
        assert 3 <= n <= 9
        assert n == 9 or p["median_error"] <= 0.02
    assert data["target"]["accumulation_steps"] > 1
    assert data["max_batch"]["probes"]


def test_plot_is_a_valid_png(tune_run) -> None:
    proc, _, png = tune_run
    assert proc.returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400


def test_report_re_renders_without_tensorflow(tune_run, tmp_path) -> None:
    proc, js, _ = tune_run
    assert proc.returncode == 0
    png = tmp_path / "again.png"
    code = ("import sys; from batchfit.cli import main; "
            "rc = main(['report', sys.argv[1], '--plot', sys.argv[2]]); "
            "assert 'tensorflow' not in sys.modules, 'report imported tensorflow'; sys.exit(rc)")
    rep = subprocess.run([sys.executable, "-c", code, str(js), str(png)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert rep.returncode == 0, rep.stderr
    assert "recommended batch size" in rep.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_tune_refuses_steps_which_its_search_would_ignore() -> None:
    # tune() has no steps=: `batchfit tune --steps 10` was accepted and silently ignored.
    from batchfit.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["tune", "--steps", "10"])
    assert exc.value.code == 2
    assert build_parser().parse_args(["max", "--steps", "10"]).steps == 10


@pytest.mark.parametrize("args, word", [
    (["tune", "--target", "0"], "target"),
    (["tune", "--batch-sizes", "a,b"], "batch-sizes"),
    (["tune", "--plot", "out.txt"], "plot"),
    (["tune", "--tolerance", "2"], "tolerance"),
])
def test_tune_bad_input_exits_2(run_cli, args, word) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.stdout[-500:], proc.stderr[-500:])
    assert word in proc.stderr and "Traceback" not in proc.stderr
