"""The architecture's one-way imports: the pure layers never load TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE_MODULES = [
    "batchfit",
    "batchfit.core.search",
    "batchfit.core.sizes",
    "batchfit.core.memory_model",
    "batchfit.core.throughput",
    "batchfit.core.recommend",
    "batchfit.results.tune",
    "batchfit.report.tune",
    "batchfit.report.plots",
    "batchfit.cli.tune",
    "batchfit.core.noise",
    "batchfit.results.noise",
    "batchfit.report.noise",
    "batchfit.cli.noise",
    "batchfit.core.static_scan",
    "batchfit.results.check",
    "batchfit.report.check",
    "batchfit.cli.check",
    "batchfit.tf.check",
    "batchfit.results",
    "batchfit.errors",
    "batchfit.report",
    "batchfit.cli",
    "batchfit.tf.oom",
    "batchfit.tf.adaptive",
    "batchfit.core.shrink",
    "batchfit.results.fit",
    "batchfit.tf.worker",
    "batchfit.tf.maxbatch",
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_import_does_not_load_tensorflow(module: str) -> None:
    code = (f"import sys, {module}; "
            "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"importing {module} loaded {proc.stdout.strip()}: {proc.stderr}"


def test_core_sources_never_import_tensorflow() -> None:
    from pathlib import Path

    import batchfit.core

    for path in Path(batchfit.core.__file__).parent.glob("*.py"):
        text = path.read_text()
        for banned in ("import tensorflow", "from tensorflow", "import keras", "from keras"):
            assert banned not in text, f"{path.name} contains {banned!r}"
