"""``batchfit verify``: the model's own ``fit`` (with validation) in fresh processes under the
emulated device; exit 0 when every run fits, 1 when any runs out of memory, 2 bad input.
Also ``max --verify``. The built-in demo at batch 16 peaks at ~48 MiB, most of it a scratch buffer
of TensorFlow's convolution filter gradient whose size does not follow the batch (shape
``[177, 1024, 27]``, 19.6 MiB): under 64 MiB one CI run in two processes ran out of memory at
54 MiB, so the fitting case runs under 96 MiB (half of it spare). 1024 cannot fit 64 MiB (its
activations alone are several times the budget)."""

from __future__ import annotations

import json

import pytest

from batchfit.results import VerifyResult, load_result

DEMO = "batchfit.examples.models:demo_model"


def test_a_size_that_fits_trains_k_of_k_and_exits_0(run_cli, tmp_path) -> None:
    out = tmp_path / "v.json"
    proc = run_cli("verify", DEMO, "--batch", "16", "--memory", "96MiB", "--repeats", "2",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fits 2/2" in proc.stdout and "synthetic data" in proc.stdout
    result = load_result(out.read_text())
    assert isinstance(result, VerifyResult) and result.fitted == 2 and result.all_fit
    # The peak is fit's own (the region reserved at start is not counted), under the budget.
    assert all(0 < r.peak_bytes < 96 << 20 for r in result.runs)
    assert result.margin_bytes == (96 << 20) - max(r.peak_bytes for r in result.runs)
    assert json.loads(out.read_text())["fitted"] == 2


def test_a_size_far_too_big_runs_out_of_memory_and_exits_1(run_cli) -> None:
    proc = run_cli("verify", DEMO, "--batch", "1024", "--memory", "64MiB", "--repeats", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fits 0/1" in proc.stdout and "out of memory in 1" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["verify", DEMO, "--batch", "0", "--memory", "64MiB"], "batch_size"),
    (["verify", DEMO, "--batch", "8"], "needs --memory"),
    (["verify", DEMO, "--batch", "8", "--memory", "64MiB", "--repeats", "0"], "repeats"),
    (["verify", DEMO, "--batch", "8", "--memory", "lots"], "lots"),
    (["verify", "no_such_file.py:model", "--batch", "8", "--memory", "64MiB", "--repeats", "1"],
     "no_such_file.py"),
])
def test_bad_input_exits_2(run_cli, args, message) -> None:
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_max_verify_trains_at_the_answer(run_cli) -> None:
    proc = run_cli("max", "batchfit.examples.models:seed_mlp", "--memory", "64MiB",
                   "--max-batch", "64", "--quiet", "--verify", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify batchfit.examples.models:seed_mlp at batch 64" in proc.stdout
    assert "fits 1/1" in proc.stdout


def test_verify_trains_on_the_users_data_when_given(run_cli, tmp_path) -> None:
    fix = "tests/noise_fixtures.py"
    out = tmp_path / "v.json"
    proc = run_cli("verify", f"{fix}:linear_model", "--data", f"{fix}:linear_data", "--batch",
                   "32", "--memory", "64MiB", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = load_result(out.read_text())
    assert result.all_fit and not result.synthetic_data
    assert "synthetic" not in proc.stdout
