"""``estimate`` on JAX (API and CLI), and ``max``'s report saying how JAX on CPU measured."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

import batchfit
from batchfit.backend import get_backend
from batchfit.examples import models
from batchfit.report.terminal import render_max

SPEC = "batchfit.examples.models:seed_mlp"


def test_estimate_memory_is_the_backends_compiled_step_and_its_line() -> None:
    r = batchfit.estimate_memory(SPEC, [8, 16, 32], "1MiB")
    assert [s.batch_size for s in r.sizes] == [8, 16, 32]
    assert r.environment["backend"] == "jax" and r.step_jit
    # Each size is JAX's compile-time memory of the model's own step (nothing run) ...
    want = get_backend().compiled_step_memory(models.seed_mlp(), 16)
    got = r.sizes[1]
    assert (got.weights, got.optimizer_state, got.inputs, got.temporaries) == (
        want.weights, want.optimizer_state, want.inputs, want.temporaries)
    # ... and the largest batch for the budget is on the fitted line, within the budget.
    line = r.fit
    assert line is not None and line.per_sample_bytes > 0
    b = r.max_batch_size
    assert b is not None and b > 0
    assert line.fixed_bytes + line.per_sample_bytes * b <= (1 << 20)
    assert line.fixed_bytes + line.per_sample_bytes * (b + 1) > (1 << 20)


def test_max_on_cpu_reports_the_backend_and_predicted_peaks() -> None:
    r = batchfit.find_max_batch_size(SPEC, memory="2MiB", isolate="none")
    console = Console(record=True, width=200, color_system=None)
    render_max(r, console)
    text = console.export_text()
    assert "measured with Keras on jax (memory: compile-time" in text
    assert "compared with predicted (compile-time) peaks" in text
    assert "measured peaks" not in text


@pytest.mark.slow
def test_the_estimate_command_runs_on_jax(run_cli, tmp_path) -> None:
    out = tmp_path / "estimate.json"
    proc = run_cli("--backend", "jax", "estimate", SPEC, "--batch", "8,16", "--memory", "1MiB",
                   "--json", str(out), env={"KERAS_BACKEND": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["backend"] == "jax"
    assert [s["batch_size"] for s in result["sizes"]] == [8, 16]
    assert result["max_batch_size"] > 0 and "largest batch" in proc.stdout
