"""The CLI end to end: exit statuses, clear errors without tracebacks, JSON that re-renders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = "tests/models_for_tests.py"


@pytest.mark.parametrize("args, words", [
    (["max", "no/such/file.py:build", "--memory", "64MiB"], ["not found", "file.py"]),
    (["max", f"{MODELS}:not_a_model", "--memory", "64MiB"], ["keras.Model"]),
    (["max", f"{MODELS}:raising_factory", "--memory", "64MiB"], ["RuntimeError", "feature store"]),
    (["max", f"{MODELS}:uncompiled_model", "--memory", "64MiB"], ["compile"]),
    (["max", f"{MODELS}:missing_name", "--memory", "64MiB"], ["missing_name"]),
    (["max", f"{MODELS}:seed_wide", "--memory", "lots"], ["lots", "GiB"]),
    (["max", f"{MODELS}:seed_wide", "--memory", "0"], ["0"]),
    (["max", f"{MODELS}:seed_wide", "--memory", "64MiB", "--granularity", "0"], ["granularity"]),
    (["max", f"{MODELS}:seed_wide", "--memory", "64MiB", "--headroom", "1.5"], ["headroom"]),
    (["max", f"{MODELS}:seed_wide", "--memory", "64MiB", "--confirm", "-1"], ["confirm", "0"]),
    (["max", f"{MODELS}:seed_wide", "--input-shape", "x=abc"], ["input-shape"]),
    # An empty name was taken, and refused only after loading the model, as "input_shapes".
    (["max", f"{MODELS}:seed_wide", "--memory", "64MiB", "--input-shape", "=12"],
     ["--input-shape", "NAME=DIMS"]),
    (["report", "no/such/run.json"], ["no such result file"]),
    # --strategy is the search policy's old name, not tf.distribute
    (["max", f"{MODELS}:seed_wide", "--strategy", "mirrored"], ["--distribute mirrored"]),
    (["tune", f"{MODELS}:seed_wide", "--strategy", "multiworker"], ["--distribute multiworker"]),
    (["max", f"{MODELS}:seed_wide", "--strategy", "fastest"], ["--strategy", "guided"]),
    (["max", f"{MODELS}:seed_wide", "--search", "power", "--strategy", "power"],
     ["--search only"]),
])
def test_bad_input_exits_2_with_a_clear_message_and_no_traceback(args, words, capsys,
                                                                 monkeypatch) -> None:
    # In process (the CLI's main() returns the exit status), so each case does not pay for a
    # TensorFlow start-up; test_bad_input_exit_status_of_the_real_command runs the real command.
    from batchfit.cli import main

    monkeypatch.chdir(ROOT)
    rc = main(list(args))
    out, err_text = capsys.readouterr()
    assert rc == 2, (out, err_text)
    err = err_text.lower()
    for word in words:
        assert word.lower() in err, err_text
    assert "Traceback" not in err_text


def test_bad_input_exit_status_of_the_real_command(run_cli) -> None:
    proc = run_cli("max", f"{MODELS}:raising_factory", "--memory", "64MiB")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "feature store" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(run_cli) -> None:
    proc = run_cli("max", f"{MODELS}:seed_wide", "--memory", "lots", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_nothing_fits_exits_1_and_states_the_fixed_cost(run_cli) -> None:
    proc = run_cli("max", f"{MODELS}:huge_model", "--memory", "56MiB")
    assert proc.returncode == 1, proc.stderr
    assert "nothing fits" in proc.stderr.lower()
    assert "optimizer state" in proc.stderr and "MiB" in proc.stderr


def test_max_writes_json_that_report_re_renders(run_cli, tmp_path) -> None:
    out = tmp_path / "runs" / "run.json"  # --json into a directory that does not exist yet
    proc = run_cli("max", f"{MODELS}:seed_wide", "--memory", "48MiB", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for key in ("max_batch_size", "safe_batch_size", "memory_budget_bytes", "search",
                "strategy", "probes"):
        assert key in data
    assert data["memory_budget_bytes"] == 48 << 20
    assert data["search"] == data["strategy"] == "guided"
    assert 0 < data["safe_batch_size"] <= data["max_batch_size"]
    fitting = [p for p in data["probes"] if p["fits"]]
    band = data["band"]
    assert band["reliable"] == data["max_batch_size"] and band["confirmations"] == 3
    # the answer is the largest size that fitted every time (confirmations included)
    assert max(p["batch_size"] for p in fitting
               if p["batch_size"] not in band["sometimes"]) == data["max_batch_size"]
    assert [p["phase"] for p in data["probes"]].count("confirm") >= 3
    assert all(p["peak_bytes"] <= 48 << 20 for p in fitting)
    assert "probe  1" in proc.stdout  # one line per probe while searching
    assert "confirm" in proc.stdout and "margin of" in proc.stdout
    again = run_cli("report", str(out))
    assert again.returncode == 0, again.stderr
    assert str(data["max_batch_size"]) in again.stdout


def _saved_max_run(tmp_path: Path) -> Path:
    from batchfit.results import MaxBatchResult, MemoryModel, Probe

    r = MaxBatchResult(
        max_batch_size=64, safe_batch_size=57, headroom=0.1, memory_budget_bytes=48 << 20,
        budget_source="user", device="CPU:0", isolation="process", search="guided",
        granularity=1, upper_bound=1 << 20, bracketed=True,
        memory_model=MemoryModel(6e6, 5.6e5, 0.999, 2),
        probes=[Probe(8, True, "fits", 10 << 20, 1.5), Probe(64, True, "fits", 40 << 20, 0.4),
                Probe(65, False, "oom", None, 10.2, None, "OOM")])
    path = tmp_path / "run.json"
    r.to_json(path)
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda d: {"name": "not batchfit's", "items": [1, 2]}, ["not a valid", "max_batch"]),
    (lambda d: {**d, "schema_version": d["schema_version"] + 1}, ["upgrade batchfit"]),
    (lambda d: {**d, "schema_version": "2"}, ["schema_version"]),
    (lambda d: {**d, "probes": None}, ["not a valid"]),
    (lambda d: {**d, "result_kind": {"a": 1}}, ["unknown result kind"]),
])
def test_report_of_a_malformed_or_foreign_file_exits_2(edit, words, tmp_path, capsys) -> None:
    from batchfit.cli import main

    path = _saved_max_run(tmp_path)
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    rc = main(["report", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "internal error" not in err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_outputs_go_into_new_directories_and_unwritable_paths_exit_2(tmp_path, capsys) -> None:
    from rich.console import Console

    from batchfit.cli import main
    from batchfit.cli._common import write_outputs
    from batchfit.errors import InvalidInputError
    from batchfit.results import load_result

    path = _saved_max_run(tmp_path)
    # A missing directory is created (a long run is not lost at the very end).
    assert main(["report", str(path), "--plot", str(tmp_path / "new" / "dir" / "m.png")]) == 0
    assert (tmp_path / "new" / "dir" / "m.png").read_bytes()[:4] == b"\x89PNG"
    result = load_result(path)
    write_outputs(result, Console(file=open(os.devnull, "w")),  # noqa: SIM115
                  json_path=str(tmp_path / "a" / "b" / "run.json"))
    assert load_result(tmp_path / "a" / "b" / "run.json") == result
    capsys.readouterr()
    # A path that cannot be written (under a file, or a directory) is bad input: exit 2.
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc = main(["report", str(path), "--plot", str(blocker / "m.png")])
    _, err = capsys.readouterr()
    assert rc == 2 and "cannot write" in err and "Traceback" not in err, err
    (tmp_path / "adir.png").mkdir()
    assert main(["report", str(path), "--plot", str(tmp_path / "adir.png")]) == 2
    with pytest.raises(InvalidInputError, match="--json"):
        write_outputs(result, Console(file=open(os.devnull, "w")),  # noqa: SIM115
                      json_path=str(blocker / "run.json"))


def test_progress_lines_stay_one_line_each_when_stdout_is_not_a_terminal() -> None:
    # The CLI's console on a pipe is 80 columns wide; a probe's failure detail made its line
    # wrap in two ("one line per probe and per timed size", README).
    import io

    from rich.console import Console

    from batchfit.report import ProbeLog
    from batchfit.report.tune import PointLog
    from batchfit.results import Probe, ThroughputPoint

    buf = io.StringIO()
    console = Console(file=buf, width=80)
    assert not console.is_terminal
    detail = ("peak within 2% of the budget: too close to count as fitting (near the cap the "
              "same size fits in one process and not the next)")
    ProbeLog(console)(Probe(193, False, "at_limit", 47 << 20, 1.0, None, detail))
    PointLog(console)(ThroughputPoint(batch_size=512, outcome="failed", detail=detail))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("probe  1") and lines[1].startswith("time ")
    assert "\x1b" not in buf.getvalue()


def test_version_and_help(run_cli) -> None:
    assert run_cli("--version").stdout.startswith("batchfit ")
    assert run_cli().returncode == 2


@pytest.mark.parametrize("option", ["--search", "--strategy"])
def test_search_names_the_policy_and_strategy_still_works_with_a_warning(run_cli, tmp_path,
                                                                         option) -> None:
    out = tmp_path / "run.json"
    proc = run_cli("max", f"{MODELS}:seed_wide", "--memory", "48MiB", option, "binsearch",
                   "--max-batch", "64", "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["search"] == "binsearch"
    assert [p["batch_size"] for p in data["probes"]][:2] == [2, 4]  # binsearch's own start
    deprecated = "--strategy is deprecated" in proc.stderr
    assert deprecated == (option == "--strategy"), proc.stderr
    if deprecated:
        assert "use --search" in proc.stderr
