"""End to end under a real allocator cap: the search agrees with an exhaustive bisection run in
fresh processes (the ground truth), for models with custom layers, the seed's included.

The search's default ``search_tolerance`` (2%) lets it stop once its answer is within 2% below
the smallest size that failed, so the answer may lie up to 2% under the bisection's. Near the
cap which sizes fit is not perfectly sharp: the same size can fit in one fresh process and not
in the next. Probe workers run with a fixed address-space layout and hash seed and one thread
per op, which narrowed that band for seed_wide at 64 MiB from about 4% (238-248, with the
default thread pool; a clean-clone CI run had the search at 238 and the bisection at 248) to
about 1% (240 fitted 3 times in 3, 241 twice, 242 and above never), measured on a quiet
machine. Under a clean-clone CI run's load the band is wider: guided's fresh process fitted 248
where the bisection's stopped at 240 (2026-11-28), and bench/results/max_band.json measures
bands of 4-15% for a CNN, a transformer and an LSTM. So 4% either side of the tolerance is
allowed: the bisection is one draw from the band, not a sharp truth; the benchmark
(bench/results/max.json) records exact figures."""

from __future__ import annotations

import pytest

import batchfit
from batchfit.verbs.verify import exhaustive_max

CASES = [
    # the seed's MyVariableBatchLayer and MyCustomLayer
    ("tests/models_for_tests.py:seed_wide", "64MiB"),
    # a custom multi-head attention layer
    ("batchfit.examples.models:transformer", "64MiB"),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("spec, memory", CASES)
def test_guided_finds_what_exhaustive_bisection_in_fresh_processes_finds(spec, memory) -> None:
    result = batchfit.find_max_batch_size(spec, memory=memory)
    truth, truth_probes, _ = exhaustive_max(spec, memory)
    assert truth > 0
    tol = result.search_tolerance
    assert tol == 0.02
    wobble = 0.04
    low, high = truth * (1 - tol - wobble) - 1, truth * (1 + wobble) + 1
    assert low <= result.max_batch_size <= high, (result.probes, truth_probes)
    assert result.bracketed
    assert result.oom_count <= 2
    # every fitting probe ran within the budget, with the margin the answer promises
    for p in result.probes:
        if p.fits:
            assert p.peak_bytes is not None and p.peak_bytes < 0.98 * result.memory_budget_bytes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fit_rates_probe_every_size_in_every_round() -> None:
    from batchfit.verbs.verify import fit_rates

    seen: list[int] = []
    rates = fit_rates("tests/models_for_tests.py:seed_wide", "64MiB", [8, 4096], repeats=2,
                      on_probe=lambda p: seen.append(p.batch_size))
    assert seen == [8, 4096, 8, 4096]  # rounds over all sizes, not one size after another
    assert [p.fits for p in rates[8]] == [True, True]
    assert [p.fits for p in rates[4096]] == [False, False]
    assert all(p.outcome in ("oom", "at_limit") for p in rates[4096])
    with pytest.raises(ValueError, match="repeats"):
        fit_rates("tests/models_for_tests.py:seed_wide", "64MiB", [8], repeats=0)
