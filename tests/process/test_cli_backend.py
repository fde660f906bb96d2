"""The command without its backend: exit 2 and one line saying what to install or set."""

from __future__ import annotations

import pytest

# Hides TensorFlow from the import system, then runs the CLI: what a user without the extra sees.
NO_TENSORFLOW = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'tensorflow' or name.startswith('tensorflow.'):
            raise ModuleNotFoundError("No module named 'tensorflow'")
        return None
sys.meta_path.insert(0, Hide())
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n == 'tensorflow' else real(n, *a)
from batchfit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [["max", "--memory", "64MiB"], ["check"], ["tune"],
                                  ["noise", "x.py:m", "--data", "x.py:d"]])
def test_without_tensorflow_a_measuring_command_exits_2_with_the_install_command(args) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'batchfit[cpu]'" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_without_tensorflow_report_still_works(tmp_path) -> None:
    import dataclasses
    import subprocess
    import sys

    from batchfit.results import MaxBatchResult

    path = tmp_path / "r.json"
    names = {f.name for f in dataclasses.fields(MaxBatchResult)}
    policy = {"search" if "search" in names else "strategy": "guided"}
    MaxBatchResult(max_batch_size=64, safe_batch_size=57, headroom=0.1,
                   memory_budget_bytes=1 << 26, budget_source="user", device="CPU:0",
                   isolation="process", granularity=1, upper_bound=1 << 20, bracketed=True,
                   memory_model=None, probes=[], seconds=1.0, **policy).to_json(path)
    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, "report", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "64" in proc.stdout


def test_an_unsupported_keras_backend_exits_2_naming_it(run_cli) -> None:
    proc = run_cli("max", "--memory", "64MiB", env={"KERAS_BACKEND": "torch"})
    assert proc.returncode == 2, proc.stderr
    assert "'torch'" in proc.stderr and "KERAS_BACKEND=tensorflow" in proc.stderr
    assert "KERAS_BACKEND=jax" in proc.stderr
    assert "Traceback" not in proc.stderr
