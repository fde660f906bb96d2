"""Run a JAX test's code in a child process with two CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=2`` takes effect only before JAX starts, so
tests of ``keras.distribution`` run their code in a fresh interpreter; it prints one JSON line
last, which :func:`run_on_two_devices` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_on_two_devices(code: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``code`` with ``KERAS_BACKEND=jax`` over two CPU devices; its last line, parsed."""
    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"the child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
