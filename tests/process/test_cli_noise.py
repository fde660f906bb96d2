"""``batchfit noise`` as a command: JSON and plot written, ``report`` re-renders, bad input exits 2."""

from __future__ import annotations

import json
import math

from batchfit.results import NoiseScaleResult, load_result

FIX = "tests/noise_fixtures.py"


def test_cli_noise_json_and_report_round_trip(run_cli, tmp_path) -> None:
    out = tmp_path / "noise.json"
    png = tmp_path / "noise.png"
    proc = run_cli("noise", f"{FIX}:linear_model", "--data", f"{FIX}:linear_data",
                   "--small", "4", "--big", "32", "--steps", "16", "--json", str(out),
                   "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "B_simple" in proc.stdout
    data = json.loads(out.read_text())
    assert data["result_kind"] == "noise_scale" and len(data["pairs"]) == 16
    assert png.stat().st_size > 0
    r = load_result(out)
    assert isinstance(r, NoiseScaleResult) and math.isclose(r.b_simple, data["b_simple"])
    again = run_cli("report", str(out))
    assert again.returncode == 0, again.stderr
    assert "B_simple" in again.stdout


def test_cli_noise_without_data_exits_2_and_says_why(run_cli) -> None:
    proc = run_cli("noise", f"{FIX}:linear_model")
    assert proc.returncode == 2
    assert "real data" in proc.stderr and "--data" in proc.stderr
    assert "Traceback" not in proc.stderr
