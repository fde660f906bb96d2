"""Unit tests of batchfit.core.search against fake and simulated devices (no TensorFlow)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from batchfit.core.search import (
    DEFAULT_SEARCH,
    POLICY_NAMES,
    BinsearchPolicy,
    GuidedPolicy,
    PowerPolicy,
    SearchPolicy,
    Trial,
    check_search,
    make_policy,
    run_search,
    search_argument,
)
from batchfit.core.simulate import SimulatedDevice, search_cost
from batchfit.errors import InvalidInputError

GiB = 2**30
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def up_to(limit: int) -> Callable[[int], Trial]:
    """A device on which every size up to ``limit`` fits, without peaks."""
    return lambda b: Trial(b, fits=b <= limit)


def sizes(history: list[Trial]) -> list[int]:
    return [t.batch_size for t in history]


def fails(history: list[Trial]) -> int:
    return sum(not t.fits for t in history)


def check_answer(policy: SearchPolicy, history: list[Trial]) -> int:
    """Invariants of every answer: verified, below every failure, no repeated probe."""
    best = policy.best(history)
    assert len(set(sizes(history))) == len(history), "a size was probed twice"
    failing = [t.batch_size for t in history if not t.fits]
    if best:
        assert any(t.batch_size == best and t.fits for t in history), "answer never probed"
        assert all(best < f for f in failing), "answer above a failing size"
    if policy.upper is not None:
        assert max(sizes(history), default=0) <= policy.upper
    assert all(b % policy.granularity == 0 for b in sizes(history))
    return best


# ------------------------------------------------------------------ Lightning-faithful modes


def test_power_matches_lightning_sequence() -> None:
    policy = PowerPolicy()
    history = run_search(policy, up_to(95))
    assert sizes(history) == [2, 4, 8, 16, 32, 64, 128]
    assert policy.best(history) == 64 and not policy.bracketed(history)


def test_binsearch_matches_lightning_sequence() -> None:
    policy = BinsearchPolicy()
    history = run_search(policy, up_to(95))
    assert sizes(history) == [2, 4, 8, 16, 32, 64, 128, 96, 80, 88, 92, 94, 95]
    assert policy.best(history) == 95 and policy.bracketed(history)


def test_power_max_trials_counts_every_probe_and_keeps_the_last_success() -> None:
    policy = PowerPolicy(max_trials=3)
    history = run_search(policy, up_to(1000))
    assert sizes(history) == [2, 4, 8] and policy.best(history) == 8


def test_binsearch_max_trials_counts_only_successes() -> None:
    policy = BinsearchPolicy(max_trials=3)
    history = run_search(policy, up_to(5))
    assert sizes(history) == [2, 4, 8, 6, 5] and policy.best(history) == 5


def test_first_size_failing_halves_like_lightning() -> None:
    # power: 64 fails, 32 fails, 16 fits; Lightning then re-runs 32 (known: no probe) and stops
    power = PowerPolicy(init=64)
    history = run_search(power, up_to(20))
    assert sizes(history) == [64, 32, 16] and power.best(history) == 16
    # binsearch: Lightning's bisection with its assumed low = 1
    binsearch = BinsearchPolicy(init=64)
    history = run_search(binsearch, up_to(20))
    assert sizes(history) == [64, 32, 16, 24, 20, 22, 21]
    assert binsearch.best(history) == 20 and binsearch.bracketed(history)


@pytest.mark.parametrize("cls", [PowerPolicy, BinsearchPolicy])
def test_lightning_modes_verify_size_one(cls: type[SearchPolicy]) -> None:
    policy = cls()                                   # Lightning returns 1 untested here
    history = run_search(policy, up_to(1))
    assert sizes(history) == [2, 1] and policy.best(history) == 1
    history = run_search(policy, up_to(0))
    assert sizes(history) == [2, 1] and policy.best(history) == 0 and policy.bracketed(history)


def test_lightning_modes_with_granularity_and_upper() -> None:
    policy = make_policy("binsearch", granularity=8)
    history = run_search(policy, up_to(95))
    assert sizes(history) == [8, 16, 32, 64, 128, 96, 80, 88]
    assert policy.best(history) == 88 and policy.bracketed(history)
    for name in ("power", "binsearch"):
        capped = make_policy(name, upper=50)
        history = run_search(capped, up_to(95))
        assert sizes(history) == [2, 4, 8, 16, 32, 50]
        assert capped.best(history) == 50 and capped.bracketed(history)
    power = make_policy("power", upper=100)          # Lightning would answer 50 (untested)
    history = run_search(power, up_to(95))
    assert sizes(history)[-1] == 100 and power.best(history) == 64


# -------------------------------------------------------------------- all three policies

ALL = ("power", "binsearch", "guided")


def non_monotonic(b: int) -> bool:
    return b <= 95 or 101 <= b <= 110


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [None, 1000.0])
def test_non_monotonic_boundary(name: str, budget: float | None) -> None:
    policy = make_policy(name, budget_bytes=budget)
    history = run_search(policy, lambda b: Trial(b, non_monotonic(b),
                                                 8.0 * b if non_monotonic(b) else None))
    best = check_answer(policy, history)
    assert best <= 95 or 101 <= best <= 110
    if name != "power":
        assert policy.bracketed(history)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("upper", [None, 37])
def test_all_fail_terminates_with_zero(name: str, upper: int | None) -> None:
    policy = make_policy(name, budget_bytes=GiB, upper=upper)
    history = run_search(policy, up_to(0))
    assert policy.best(history) == 0 and policy.bracketed(history)
    assert len(history) <= 8 and 1 in sizes(history)


@pytest.mark.parametrize("name", ALL)
def test_upper_fits_is_the_answer(name: str) -> None:
    policy = make_policy(name, budget_bytes=GiB, upper=50)
    history = run_search(policy, lambda b: Trial(b, True, 1e6 + 1e3 * b))
    assert policy.best(history) == 50 and policy.bracketed(history)
    check_answer(policy, history)


# ------------------------------------------------------------------------------- guided


def test_guided_on_linear_memory_sequence() -> None:
    device = SimulatedDevice(fixed=0.3 * GiB, per_sample=0.7 * GiB / 1000.5, budget=GiB)
    policy = GuidedPolicy(device.budget)
    history = run_search(policy, device.trial)
    assert policy.best(history) == device.max_batch() == 1000
    assert len(history) <= 6 and fails(history) == 1 and policy.bracketed(history)


@FAST
@given(fixed_frac=st.floats(0.0, 0.9), limit=st.integers(8, 50_000),
       frac=st.floats(0.01, 0.99), g=st.sampled_from([1, 1, 2, 8, 32]),
       budget=st.sampled_from([GiB, 16 * GiB, 80 * GiB, 2_000_000]))
def test_guided_exact_on_linear_memory(fixed_frac: float, limit: int, frac: float, g: int,
                                       budget: int) -> None:
    """On linear memory: the exact answer, in at most 6 probes and 1 out-of-memory."""
    fixed = fixed_frac * budget
    device = SimulatedDevice(fixed, (budget - fixed) / (limit + frac), budget)
    truth = device.max_batch(g)
    assume(truth >= -(-8 // g) * g)                  # the first probe (8) fits
    policy = GuidedPolicy(budget, granularity=g)
    history = run_search(policy, device.trial)
    assert check_answer(policy, history) == truth
    assert policy.bracketed(history)
    assert len(history) <= 6, sizes(history)
    assert fails(history) <= 1, sizes(history)


@FAST
@given(fixed_frac=st.floats(0.0, 0.9), limit=st.integers(20, 20_000),
       at=st.floats(0.3, 1.1), factor=st.floats(1.13, 1.34),
       frag=st.sampled_from([0.0, 0.0, 0.02, 0.05]), g=st.sampled_from([1, 8]),
       noise=st.sampled_from([0.0, 0.3]))
def test_guided_exact_with_jumps_and_fragmentation(fixed_frac: float, limit: int, at: float,
                                                   factor: float, frag: float, g: int,
                                                   noise: float) -> None:
    """A +13..34% jump anywhere near the limit, fragmentation: still exact, more probes."""
    budget = 16 * GiB
    fixed = fixed_frac * budget
    per_sample = (budget - fixed) / (limit + 0.5)
    device = SimulatedDevice(fixed, per_sample, budget, jumps=((max(2, int(at * limit)), factor),),
                             fragmentation=frag, rounding=2**18,
                             noise=noise * per_sample / budget)
    policy = GuidedPolicy(budget, granularity=g)
    history = run_search(policy, device.trial)
    best = check_answer(policy, history)
    assert policy.bracketed(history)
    if noise == 0:
        assert best == device.max_batch(g)
    else:                                            # locally exact on a jittery device
        assert best == 0 or (device.fits(best) and not device.fits(best + g))
    assert len(history) <= 30 and fails(history) <= 12


def test_guided_near_limit_jump_costs_little() -> None:
    # The NOTES case: +34% from one size to the next, the jump right below the linear limit.
    device = SimulatedDevice(fixed=15 * 2**20, per_sample=12 * 2**20, budget=1.2 * GiB,
                             jumps=((90, 1.34),))
    policy = GuidedPolicy(device.budget)
    history = run_search(policy, device.trial)
    assert policy.best(history) == device.max_batch() == 89
    assert len(history) <= 12 and fails(history) <= 4


@pytest.mark.parametrize("budget", [None, 8 * GiB])
def test_guided_without_peaks_or_budget_still_exact(budget: float | None) -> None:
    device = SimulatedDevice(fixed=GiB, per_sample=GiB / 300.3, budget=8 * GiB,
                             report_peaks=False)
    policy = GuidedPolicy(budget)
    history = run_search(policy, device.trial)
    assert policy.best(history) == device.max_batch() == 2102
    assert policy.bracketed(history) and len(history) <= 25


def test_guided_first_probe_failing_goes_down() -> None:
    device = SimulatedDevice(fixed=0.5 * GiB, per_sample=0.1 * GiB, budget=GiB)  # limit 5
    policy = GuidedPolicy(GiB)
    history = run_search(policy, device.trial)
    assert sizes(history)[0] == 8 and policy.best(history) == 5 and policy.bracketed(history)


def test_guided_budget_not_binding_falls_back_to_doubling() -> None:
    # Peaks above the budget on sizes that fit: the budget is not what limits the device.
    policy = GuidedPolicy(budget_bytes=100.0)
    history = run_search(policy, lambda b: Trial(b, b <= 70, 1000.0 + b))
    assert policy.best(history) == 70 and policy.bracketed(history)


@FAST
@given(seed=st.integers(0, 10**6), p_fit=st.floats(0.0, 1.0),
       g=st.sampled_from([1, 4]), upper=st.sampled_from([None, 1, 60, 500]),
       peaks=st.sampled_from(["none", "random", "linear"]),
       budget=st.sampled_from([None, 1e6]))
def test_guided_terminates_on_any_device(seed: int, p_fit: float, g: int, upper: int | None,
                                         peaks: str, budget: float | None) -> None:
    assume(upper is None or upper >= g)
    rng = random.Random(seed)
    table: dict[int, Trial] = {}

    def device(b: int) -> Trial:
        if b not in table:
            ok = rng.random() < p_fit
            peak = {"none": None, "random": rng.uniform(0, 2e6),
                    "linear": 1e5 + 1e3 * b}[peaks]
            table[b] = Trial(b, ok, peak if ok else None)
        return table[b]

    policy = GuidedPolicy(budget, granularity=g, upper=upper)
    history = run_search(policy, device, max_probes=100)
    assert len(history) <= policy.max_trials
    check_answer(policy, history)
    assert policy.next_size(history) is None or len(history) == policy.max_trials


def test_guided_never_probes_the_same_size_and_stays_inside_the_bracket() -> None:
    policy = GuidedPolicy(GiB)
    history = [Trial(8, True, 0.1 * GiB), Trial(500, False), Trial(200, True, 0.5 * GiB)]
    nxt = policy.next_size(history)
    assert nxt is not None and 200 < nxt < 500
    assert policy.next_size([*history, Trial(201, False)]) is None


# ------------------------------------------------------------- make_policy and run_search


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "fast"}, "unknown search strategy"),
    ({"name": "power", "granularity": 0}, "granularity"),
    ({"name": "guided", "granularity": 2.5}, "granularity"),
    ({"name": "binsearch", "upper": 0}, "upper"),
    ({"name": "guided", "upper": 4, "granularity": 8}, "below granularity"),
    ({"name": "power", "init": 0}, "init"),
    ({"name": "guided", "budget_bytes": -1.0}, "budget_bytes"),
    ({"name": "guided", "budget_bytes": True}, "budget_bytes"),
    ({"name": "guided", "budget_bytes": float("nan")}, "budget_bytes"),
])
def test_make_policy_rejects(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(InvalidInputError, match=match):
        make_policy(name, **kwargs)


def test_make_policy_builds_each() -> None:
    assert make_policy("GUIDED", budget_bytes=1e9).name == "guided"
    assert isinstance(make_policy("power"), PowerPolicy)
    assert make_policy("binsearch", init=16).init == 16
    assert make_policy("guided", granularity=8, upper=100).upper == 96


def test_run_search_reuses_repeated_sizes_and_stops() -> None:
    class Stubborn(SearchPolicy):
        name = "stubborn"

        def next_size(self, history):  # always asks for the same size
            return 4

    calls: list[int] = []

    def trial(b: int) -> Trial:
        calls.append(b)
        return Trial(b, True)

    history = run_search(Stubborn(), trial, max_probes=5)
    assert calls == [4] and sizes(history) == [4]


def test_run_search_limits_probes_and_checks_trials() -> None:
    history = run_search(PowerPolicy(max_trials=50), up_to(10**9), max_probes=4)
    assert sizes(history) == [2, 4, 8, 16]
    with pytest.raises(InvalidInputError, match="Trial for batch size 2"):
        run_search(PowerPolicy(), lambda b: Trial(b + 1, True))
    with pytest.raises(InvalidInputError, match="max_probes"):
        run_search(PowerPolicy(), up_to(4), max_probes=0)


def test_guided_beats_binsearch_on_simulated_devices() -> None:
    cases = [SimulatedDevice(0.2 * GiB, 0.8 * GiB / 3000.3, GiB),
             SimulatedDevice(0.7 * GiB, 0.3 * GiB / 150.6, GiB, rounding=2**18),
             SimulatedDevice(0.1 * GiB, 0.9 * GiB / 700.2, GiB, fragmentation=0.03)]
    for device in cases:
        costs = {}
        for name in ("guided", "binsearch"):
            policy = make_policy(name, budget_bytes=device.budget)
            history = run_search(policy, device.trial)
            assert policy.best(history) == device.max_batch()
            costs[name] = search_cost(history)
        assert costs["guided"] < costs["binsearch"]


# ------------------------------------------------------------------ tolerance, cheap failures

@FAST
@given(fixed_frac=st.floats(0.0, 0.9), limit=st.integers(60, 20_000),
       at=st.floats(0.3, 1.1), factor=st.floats(1.13, 1.34),
       frag=st.sampled_from([0.0, 0.05, 0.25]), tol=st.sampled_from([0.01, 0.02, 0.05]))
def test_guided_tolerance_stops_within_it_and_never_costs_more(
        fixed_frac: float, limit: int, at: float, factor: float, frag: float,
        tol: float) -> None:
    """With a tolerance the answer fits, lies within it below the true limit, and the search
    makes no more probes than the exact one (it is the exact search, stopped earlier: at most
    its last probe differs, the one that closes the bracket to the tolerance)."""
    budget = 16 * GiB
    fixed = fixed_frac * budget
    device = SimulatedDevice(fixed, (budget - fixed) / (limit + 0.5), budget,
                             jumps=((max(2, int(at * limit)), factor),), fragmentation=frag)
    truth = device.max_batch()
    assume(truth >= 8)
    exact_policy, loose_policy = GuidedPolicy(budget), GuidedPolicy(budget, tolerance=tol)
    exact = run_search(exact_policy, device.trial)
    loose = run_search(loose_policy, device.trial)
    best = check_answer(loose_policy, loose)
    assert loose_policy.bracketed(loose)
    assert device.fits(best) and truth * (1 - tol) - 1 <= best <= truth
    assert len(loose) <= len(exact)
    assert sizes(loose)[:-1] == sizes(exact)[:len(loose) - 1]


@FAST
@given(lo=st.integers(1, 10_000), width=st.floats(0.0, 0.1),
       tol=st.sampled_from([0.01, 0.02, 0.05]), g=st.sampled_from([1, 8]), fits=st.booleans())
def test_guided_closing_probe_ends_a_narrow_bracket_whatever_it_answers(
        lo: int, width: float, tol: float, g: int, fits: bool) -> None:
    lo *= g
    hi = lo + max(g, int(lo * width) // g * g)
    policy = GuidedPolicy(None, granularity=g, tolerance=tol)
    history = [Trial(lo, True), Trial(hi, False)]
    if policy.bracketed(history):
        assert policy.next_size(history) is None
        return
    nxt = policy.next_size(history)
    assert nxt is not None and lo < nxt < hi and nxt % g == 0
    after = [*history, Trial(nxt, fits)]
    if lo >= hi / (1 + tol) ** 2 + g:  # narrow enough for one probe to close it
        assert policy.bracketed(after), (lo, hi, nxt)
        assert policy.next_size(after) is None


def test_guided_tolerance_zero_is_exact_and_bad_values_are_refused() -> None:
    assert not GuidedPolicy(None).bracketed([Trial(100, True), Trial(102, False)])
    assert GuidedPolicy(None, tolerance=0.02).bracketed([Trial(100, True), Trial(102, False)])
    for bad in (-0.1, 0.5, "2%", True):
        with pytest.raises(InvalidInputError, match="tolerance"):
            GuidedPolicy(None, tolerance=bad)


def test_guided_splits_in_half_after_a_cheap_failure() -> None:
    """An out-of-memory failure (no peak: ten seconds of allocator retries) moves the next
    probe toward the fitting end; a failure that ran and measured a peak over the budget
    costs no more than a fit, so the bracket is halved."""
    fit = Trial(100, True, peak_bytes=500)
    oom = GuidedPolicy(None).next_size([fit, Trial(200, False)])
    cheap = GuidedPolicy(None).next_size([fit, Trial(200, False, peak_bytes=990)])
    assert oom == 135 and cheap == 150


# ------------------------------------------------------------- search= and its old name


class _FakeDistribution:
    """Looks like a tf.distribute strategy to batchfit (no TensorFlow in unit tests)."""

    num_replicas_in_sync = 2

    def scope(self) -> None:  # pragma: no cover - never entered
        return None


def test_every_policy_name_is_a_search_and_guided_is_the_default() -> None:
    assert DEFAULT_SEARCH == "guided" and DEFAULT_SEARCH in POLICY_NAMES
    assert [check_search(n) for n in POLICY_NAMES] == list(POLICY_NAMES)
    assert [make_policy(n).name for n in POLICY_NAMES] == list(POLICY_NAMES)
    assert search_argument() == DEFAULT_SEARCH
    assert search_argument("power") == "power"


def test_the_old_name_strategy_warns_and_works() -> None:
    with pytest.warns(FutureWarning, match="search="):
        assert search_argument(None, "binsearch") == "binsearch"


def test_an_unknown_policy_names_the_choices() -> None:
    with pytest.raises(InvalidInputError, match="guided, binsearch, power"):
        check_search("fastest")
    with pytest.warns(FutureWarning), pytest.raises(InvalidInputError, match="strategy"):
        search_argument(strategy="fastest")


def test_a_distribution_strategy_passed_as_strategy_names_distribute() -> None:
    for kwargs in ({"strategy": _FakeDistribution()}, {"search": _FakeDistribution()}):
        with pytest.raises(InvalidInputError, match="distribute=") as info:
            search_argument(**kwargs)
        assert "_FakeDistribution" in str(info.value)


def test_search_and_strategy_together_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="search= only"):
        search_argument("guided", "power")
