"""End to end under a real allocator cap: the search agrees with an exhaustive bisection run in
fresh processes (the ground truth), for models with custom layers, the seed's included.

The search's default ``search_tolerance`` (5% when fresh-process confirmations follow, as by
default; 2% without) lets it stop once its answer is within that fraction below the smallest
size that failed, so the answer may lie up to 5% under the bisection's. Near the
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

import sys
import textwrap

import pytest

import batchfit
from batchfit.core.confirm import band_of
from batchfit.core.search import Trial
from batchfit.core.settle import LIMIT_MARGIN, limit_outcome
from batchfit.verbs.maxbatch_local import CONFIRM_SEARCH_TOLERANCE
from batchfit.verbs.verify import exhaustive_max, fit_rates

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
    assert tol == CONFIRM_SEARCH_TOLERANCE   # confirmations follow: they settle the edge
    wobble = 0.04
    low, high = truth * (1 - tol - wobble) - 1, truth * (1 + wobble) + 1
    # The search's own answer is compared with the bisection's (one draw per size, like the
    # search's probes); confirmation in fresh processes may then step down through the band
    # (measured: seed_wide's search answered 2xx, its confirmations failed at it, 207 fitted
    # 3 of 3 where the bisection had drawn 224 once).
    searched = [Trial(p.batch_size, p.fits) for p in result.probes if p.phase == "search"]
    answer = band_of(searched).reliable
    # The bisection is one draw per size, so it may stop low in the band (the transformer's
    # bisection once stopped at 127 where 146 fitted every time and 147 never; seed_wide's
    # search drew 224, which fits 1 time in 2, where the bisection stopped at 208). An answer
    # above the bisection's must then hold where it matters: in more fresh processes.
    if result.max_batch_size > high:
        again = fit_rates(spec, memory, [result.max_batch_size], repeats=2)
        assert all(p.fits for p in again[result.max_batch_size]), (result.probes, truth_probes)
    # The band need not be monotone: with probes on fit's path (training and validation),
    # seed_wide at 64 MiB fitted 205 2 of 2, 209 and 215 0 of 2, 224 1 of 2 (fit_rates,
    # 2026-12-06); a bisection can step over 209-215 and draw 224 once, while the search,
    # which never answers above a failure it saw, stops below 209. Then the answer is the
    # largest fit below a failure the search saw inside the bisection's range.
    failures = [t.batch_size for t in searched if not t.fits]
    assert low <= answer or min(failures) <= truth, (result.probes, truth_probes)
    assert result.max_batch_size <= answer
    assert result.bracketed
    # the search's own out-of-memory probes (confirmations that step down add their own): at
    # most 3, against a bisection's ~6-7. Since each probe runs the graph traced for its own
    # size (as the user's fit does), the transformer's band at 64 MiB is 120-125 and its search
    # met 3 (2026-12-06: the line's jump from 58 to 129, then 128 and 125 inside the band).
    assert sum(p.outcome in ("oom", "crashed", "timeout") for p in result.probes
               if p.phase == "search") <= 3
    # the answer fitted in 3 fresh processes, and every other time it was tried
    assert result.band.confirmed and result.band.reliable == result.max_batch_size
    assert all(p.fits for p in result.probes if p.batch_size == result.max_batch_size)
    # every fitting probe ran within the budget, with the margin the answer promises: its
    # peak under the line, or near it in a few training steps only (core.settle.limit_outcome)
    for p in result.probes:
        if p.fits:
            assert p.peak_bytes is not None and limit_outcome(
                p.peak_bytes, result.memory_budget_bytes, typical=p.typical_peak_bytes,
                margin=LIMIT_MARGIN) == "fits", p


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


# The user's own training script: the Transformer of the examples on NumPy arrays of BATCHES
# batches, 2 epochs with a validation pass, as a user writes it.
USER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from batchfit.examples.models import transformer
    batch, batches = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1000, (batches * batch, 64)).astype("int32")
    y = rng.integers(0, 2, (batches * batch,)).astype("int32")
    transformer().fit(x, y, batch_size=batch, epochs=2, validation_data=(x[:batch], y[:batch]),
                      verbose=0)
    print("TRAINED")
""")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_safe_size_trains_in_the_users_script_with_epochs_of_many_batches(
        run_cli, tmp_path) -> None:
    """Probes of 3 steps (until session 15) answered 120 for the Transformer under 64 MiB, with
    a safe size of 114; the user's ``fit`` on arrays of 8 batches an epoch ran out of memory
    at both (2 of 2 each, at its second step: while an epoch has batches left to fetch, Keras's
    pipeline runs beside the step). The user's script under ``batchfit run`` is the check."""
    result = batchfit.find_max_batch_size("batchfit.examples.models:transformer", memory="64MiB")
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    proc = run_cli("run", "--memory", "64MiB", "--", sys.executable, str(script),
                   str(result.safe_batch_size), "8")
    assert proc.returncode == 0 and "TRAINED" in proc.stdout, (
        result.safe_batch_size, proc.stdout[-500:] + proc.stderr[-2000:])
