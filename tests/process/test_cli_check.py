"""``batchfit check`` as a command on the built-in demo: exit 0, JSON that ``report`` re-renders;
a saved result re-rendered in a fresh interpreter that never imports TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys

import check_gallery as g
import pytest

from batchfit import check
from batchfit.results import load_result


def test_cli_on_the_demo_exits_0_and_its_json_re_renders(run_cli, tmp_path) -> None:
    out = tmp_path / "demo.json"
    proc = run_cli("check", "--json", str(out))          # the built-in demo: seed layers
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "my_custom_layer" in proc.stdout and "PASS" in proc.stdout
    data = json.loads(out.read_text())
    assert data["findings"] == [] and len(data["layers"]) == 2
    again = run_cli("report", str(out))
    assert again.returncode == 0 and "my_variable_batch_layer" in again.stdout


def test_result_round_trips_and_renders_without_tensorflow(tmp_path) -> None:
    # Moved from tests/integration/test_check.py (it starts a subprocess); the result is the
    # gallery's static_batch layer, checked as there.
    static_batch = check(g.StaticBatchFlatten(), input_shape=(4, 3))
    path = tmp_path / "check.json"
    static_batch.to_json(path)
    assert load_result(path) == static_batch
    data = json.loads(path.read_text())
    for f in data["findings"]:
        assert {"layer", "check", "severity", "message", "location"} <= set(f)
    code = ("import sys; from rich.console import Console; from batchfit.results import "
            f"load_result; from batchfit.report import render; render(load_result({str(path)!r}),"
            " Console(width=120)); sys.exit(1 if 'tensorflow' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "dynamic_batch" in proc.stdout and "FAIL" in proc.stdout


def test_cli_on_a_kerashub_causal_lm_reaches_the_nested_layers(run_cli, tmp_path) -> None:
    pytest.importorskip("keras_hub")
    out = tmp_path / "gpt2.json"
    proc = run_cli("check", "tests/hub_models.py:gpt2", "--input-shape", "token_ids=10",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    layers = {r["layer"]: r for r in data["layers"]}
    assert set(layers) == {"position_embedding", "transformer_layer_0", "transformer_layer_1"}
    assert all(r["input_shape"] == [10, 32] for r in layers.values())  # token_ids=10 got there
    assert data["skipped"] == [] and data["findings"] == []
    assert "taken as 8" not in proc.stdout
