"""The CLI end to end: exit statuses, clear errors without tracebacks, JSON that re-renders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = "tests/models_for_tests.py"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "batchfit", *args], check=False,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


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
    (["max", f"{MODELS}:seed_wide", "--input-shape", "x=abc"], ["input-shape"]),
    (["report", "no/such/run.json"], ["no such result file"]),
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


def test_bad_input_exit_status_of_the_real_command() -> None:
    proc = run_cli("max", f"{MODELS}:raising_factory", "--memory", "64MiB")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "feature store" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback() -> None:
    proc = run_cli("max", f"{MODELS}:seed_wide", "--memory", "lots", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_nothing_fits_exits_1_and_states_the_fixed_cost() -> None:
    proc = run_cli("max", f"{MODELS}:huge_model", "--memory", "56MiB")
    assert proc.returncode == 1, proc.stderr
    assert "nothing fits" in proc.stderr.lower()
    assert "optimizer state" in proc.stderr and "MiB" in proc.stderr


def test_max_writes_json_that_report_re_renders(tmp_path) -> None:
    out = tmp_path / "run.json"
    proc = run_cli("max", f"{MODELS}:seed_wide", "--memory", "48MiB", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for key in ("max_batch_size", "safe_batch_size", "memory_budget_bytes", "strategy", "probes"):
        assert key in data
    assert data["memory_budget_bytes"] == 48 << 20
    assert data["strategy"] == "guided"
    assert 0 < data["safe_batch_size"] <= data["max_batch_size"]
    fitting = [p for p in data["probes"] if p["fits"]]
    assert max(p["batch_size"] for p in fitting) == data["max_batch_size"]
    assert all(p["peak_bytes"] <= 48 << 20 for p in fitting)
    assert "probe  1" in proc.stdout  # one line per probe while searching
    again = run_cli("report", str(out))
    assert again.returncode == 0, again.stderr
    assert str(data["max_batch_size"]) in again.stdout


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("batchfit ")
    assert run_cli().returncode == 2
