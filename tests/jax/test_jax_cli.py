"""The CLI on JAX, as a command: ``--backend`` chooses Keras's backend before Keras is imported;
an unsupported backend and a GPU that JAX does not see are bad input (exit 2)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_backend_jax_runs_max_and_the_result_says_how_it_measured(run_cli, tmp_path) -> None:
    out = tmp_path / "max.json"
    # KERAS_BACKEND empty: the flag alone chooses JAX (and the worker inherits it)
    proc = run_cli("--backend", "jax", "max", "batchfit.examples.models:seed_mlp",
                   "--memory", "2MiB", "--json", str(out), env={"KERAS_BACKEND": ""},
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["backend"] == "jax"
    assert "no step ran under the budget" in result["environment"]["memory_source"]
    assert result["max_batch_size"] > 0 and result["isolation"] == "process"


def test_an_unsupported_backend_exits_2_listing_the_supported(run_cli) -> None:
    proc = run_cli("--backend", "torch", "max", "--memory", "64MiB", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'torch'" in proc.stderr and "tensorflow, jax" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_gpu_on_a_jax_without_one_exits_2(run_cli) -> None:
    proc = run_cli("--backend", "jax", "max", "batchfit.examples.models:seed_mlp",
                   "--memory", "64MiB", "--device", "GPU:0", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "JAX sees no GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [
    ["verify", "batchfit.examples.models:seed_mlp", "--batch", "8", "--memory", "64MiB"],
    ["run", "--memory", "64MiB", "--", "python", "-c", "pass"],
])
def test_verify_and_run_on_a_cpu_refuse_a_budget_jax_cannot_cap(run_cli, argv) -> None:
    # JAX caps no memory on a CPU: a "fits" there would prove nothing, so it is refused
    proc = run_cli("--backend", "jax", *argv, env={"KERAS_BACKEND": ""}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "JAX caps no memory on a CPU" in proc.stderr and "Traceback" not in proc.stderr
