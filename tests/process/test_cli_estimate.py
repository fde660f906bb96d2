"""``batchfit estimate`` as a user runs it: JSON output and exit codes (fresh processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "batchfit.examples.models:seed_mlp"


def test_estimate_writes_json_and_exits_0(run_cli, tmp_path):
    out = tmp_path / "est.json"
    proc = run_cli("estimate", MODEL, "--batch", "16,32", "--memory", "64MiB", "--json",
                   str(out))
    assert proc.returncode == 0, proc.stderr
    assert "largest batch per card" in proc.stdout and "no step run" in proc.stdout
    data = json.loads(out.read_text())
    assert data["result_kind"] == "estimate"
    assert [s["batch_size"] for s in data["sizes"]] == [16, 32]
    assert data["fit"]["per_sample_bytes"] > 0 and data["max_batch_size"] > 32
    # a budget below the fixed cost: nothing fits (1), saying the fixed cost
    proc = run_cli("estimate", MODEL, "--batch", "16,32", "--memory", "1KiB")
    assert proc.returncode == 1 and "fixed cost" in proc.stderr, proc.stderr
    # a size that is not a positive integer: bad input (2), before anything compiles
    proc = run_cli("estimate", MODEL, "--batch", "16,0")
    assert proc.returncode == 2 and "positive integers" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--batch", "32,-1"], ["positive integers"]),
    (["--memory", "lots"], ["lots"]),
    (["--input-shape", "x=abc"], ["input-shape"]),
    (["--plot", "est.txt"], [".png"]),
])
def test_bad_input_exits_2_in_process(args, words, capsys, monkeypatch) -> None:
    from batchfit.cli import main

    monkeypatch.chdir(ROOT)
    rc = main(["estimate", MODEL, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert all(w.lower() in err.lower() for w in words), err
    assert "Traceback" not in err


def test_a_model_not_compiled_exits_2(capsys, monkeypatch) -> None:
    from batchfit.cli import main

    monkeypatch.chdir(ROOT)
    rc = main(["estimate", "tests/models_for_tests.py:uncompiled_model", "--batch", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "compile" in err.lower(), err
