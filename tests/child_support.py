"""What the tests' child processes share: the parent's runner, the scenario loop, one model.

Some scenarios need a TensorFlow configured before it starts (a capped allocator, logical
devices, a multi-worker cluster), so they run in a child process, ``python tests/X_child.py
SCENARIO...``, which prints (or writes) one JSON object: scenario -> results. The parent side is
:class:`ChildRuns`; the child side :func:`run_scenarios` and :func:`pairwise_model`. Not
collected by pytest (no ``test_`` prefix). Keras is imported only by :func:`pairwise_model`, so
a child can configure TensorFlow before anything here starts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def capped_env(cap_mb: int | None) -> dict[str, str]:
    """The environment of a child: TensorFlow quiet, and its CPU allocator capped at ``cap_mb``
    MiB (real out-of-memory errors) unless ``None``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if cap_mb is not None:
        env.update(TF_ENABLE_ONEDNN_OPTS="0", TF_CPU_ALLOCATOR_USE_BFC="true",
                   TF_CPU_BFC_MEM_LIMIT_IN_MB=str(cap_mb))
    return env


class ChildRuns:
    """The child processes of one test module, each started once, early, and read as JSON.

    Args:
        script: the child script.
        runs: fixture name -> (scenarios, allocator cap in MiB or ``None``).
        timeout: seconds to wait for a child's result.
    """

    def __init__(self, script: Path, runs: dict[str, tuple[list[str], int | None]],
                 timeout: float) -> None:
        self.script, self.runs, self.timeout = script, runs, timeout
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        if name not in self.procs:
            scenarios, cap_mb = self.runs[name]
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(self.script), *scenarios], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=capped_env(cap_mb), cwd=ROOT)
        return self.procs[name]

    def early(self, request: Any):
        """For a module-scoped autouse fixture: start the children the module's selected tests
        use at its first test (they run while the in-process tests run); kill them after."""
        for name in self.runs:
            if any(name in getattr(item, "fixturenames", ()) for item in request.session.items
                   if item.module is request.module):
                self.start(name)
        yield
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def result(self, name: str) -> dict:
        """The child's JSON, after checking it exited cleanly and no scenario failed."""
        import pytest

        proc = self.start(name)
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"the {name} child timed out: {stderr[-3000:]}")
        assert proc.returncode == 0, stderr[-3000:]
        out = json.loads(stdout.strip().splitlines()[-1])
        for scenario, res in out.items():
            assert "error" not in res, f"{scenario}: {res['error']}\n{res.get('traceback')}"
        return out


def run_scenarios(scenarios: dict[str, Callable[..., dict]], names: Sequence[str], *,
                  args: tuple = (), label: str = "[child]",
                  out: dict | None = None,
                  after_each: Callable[[dict], None] | None = None) -> dict:
    """Run the named scenarios in turn; a failure becomes that scenario's ``error`` (with its
    traceback), the others still run. Each result gets its ``wall_s``."""
    out = {} if out is None else out
    for name in names:
        t0 = time.perf_counter()
        try:
            out[name] = scenarios[name](*args)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as data
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]}
        out[name]["wall_s"] = time.perf_counter() - t0
        print(f"{label} {name} done in {out[name]['wall_s']:.1f}s", file=sys.stderr, flush=True)
        if after_each is not None:
            after_each(out)
    return out


def pairwise_model(length: int | None = None, *, features: int = 8, counter: bool = False,
                   metrics: Sequence[str] = (), accumulation: int | None = None) -> Any:
    """A compiled model whose memory per example grows with the square of the sequence length
    (``(batch, T, T)`` pairwise scores, cheap to compute) while its weights are tiny.

    ``counter`` adds a first layer named ``counter`` whose variable ``seen`` counts the examples
    of every training step that completed; ``accumulation`` is SGD's
    ``gradient_accumulation_steps``.
    """
    import keras

    class Pairwise(keras.layers.Layer):
        def call(self, h):
            s = keras.ops.matmul(h, keras.ops.transpose(h, (0, 2, 1)))
            return keras.ops.mean(keras.ops.tanh(s), axis=-1, keepdims=True) * h

    class SampleCounter(keras.layers.Layer):
        def build(self, input_shape):
            self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                        dtype="float32", name="seen")

        def call(self, x, training=None):
            if training:
                self.seen.assign_add(keras.ops.cast(keras.ops.shape(x)[0], "float32"))
            return x

    keras.utils.set_random_seed(0)
    inp = keras.Input((length, features))
    h = SampleCounter(name="counter")(inp) if counter else inp
    h = keras.layers.Dense(32)(h)
    h = Pairwise()(h)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    m = keras.Model(inp, out)
    m.compile(keras.optimizers.SGD(0.05, gradient_accumulation_steps=accumulation), "mse",
              metrics=list(metrics))
    return m
