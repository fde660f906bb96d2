"""The runnable examples in the docstrings of the pure modules run and say what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "batchfit", "batchfit.core.sizes", "batchfit.core.memory_model", "batchfit.core.search",
    "batchfit.core.simulate", "batchfit.core.throughput", "batchfit.core.recommend",
    "batchfit.core.noise", "batchfit.core.static_scan", "batchfit.results",
    "batchfit.results.maxbatch", "batchfit.results._base", "batchfit.report",
    "batchfit.report.terminal", "batchfit.report.tune", "batchfit.core.shrink",
    "batchfit.results.fit", "batchfit.results.check", "batchfit.results.noise",
    "batchfit.errors", "batchfit.core.fit_control", "batchfit.core.validate",
    "batchfit.backend", "batchfit.backend.memory", "batchfit.backend.machine", "batchfit.verbs.resolve",
    "batchfit.workers.stall", "batchfit.workers.server",
    "batchfit.results.verify", "batchfit.report.verify", "batchfit.emulation",
    "batchfit.emulation.bootstrap", "batchfit.emulation.fit_job", "batchfit.core.estimate",
    "batchfit.results.estimate", "batchfit.report.estimate", "batchfit.verbs.estimate",
    "batchfit.backend.tensorflow.compiled", "batchfit.core.confirm", "batchfit.backend.keras_common.sampler",
    "batchfit.report.backend", "batchfit.verbs.maxbatch_xla", "batchfit.workers.switches",
    "batchfit.core.settle",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
