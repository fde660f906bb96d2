"""Test-wide settings and shared fixtures, applied before any test imports TensorFlow.

- Quiet TensorFlow's C++ logging.
- Use TensorFlow's BFC allocator on CPU (no cap), so in-process probes can read allocator
  statistics: on this machine the default CPU allocator keeps none
  (``get_memory_info('CPU:0')`` raises "Allocator stats not available").
- The folders are the kinds of test: ``unit/`` (pure logic, no TensorFlow), ``integration/``
  (real Keras in this process), ``process/`` (worker processes, child processes, the CLI as a
  command: every test there is marked ``slow``, so ``make test-fast`` leaves them out);
  ``jax/`` (Keras on JAX, run by ``KERAS_BACKEND=jax pytest tests/jax``, left out otherwise).
- Fixtures: :func:`run_cli` (the ``batchfit`` command in a fresh process) and
  :func:`capped_env` (the environment of a child whose CPU allocator is capped).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PROCESS_TESTS = TESTS / "process"

# tests/jax need Keras on JAX, chosen before Keras is imported: they run in a pytest of their
# own (`KERAS_BACKEND=jax pytest tests/jax`, which `make test` runs after this suite), and the
# TensorFlow suite leaves them out.
collect_ignore = [] if os.environ.get("KERAS_BACKEND", "").strip().lower() == "jax" else ["jax"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/process/`` as ``slow``."""
    for item in items:
        if PROCESS_TESTS in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(TESTS), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args, timeout=600, env=None)``: ``python -m batchfit ARGS`` in the repository
    root, in a fresh process importing this checkout; returns the completed process (text)."""

    def run(*args: str, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "batchfit", *args], check=False,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=_child_env(env))

    return run


@pytest.fixture(scope="session")
def capped_env() -> Callable[[int | None], dict[str, str]]:
    """``capped_env(mib)``: a child's environment with TensorFlow quiet and its CPU allocator
    capped at ``mib`` MiB (real out-of-memory errors; oneDNN off), or uncapped for ``None``."""
    from child_support import capped_env as make

    return make
