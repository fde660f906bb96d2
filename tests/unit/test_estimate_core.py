"""core/estimate.py: the line, the budget and the cards table (pure, no TensorFlow)."""

from __future__ import annotations

import pytest

from batchfit.core.estimate import (
    budget_batch,
    card_assumption,
    card_table,
    check_batch_sizes,
    fit_line,
    largest_batch,
    usable_bytes,
)
from batchfit.errors import InvalidInputError, NothingFitsError
from batchfit.results.estimate import CompiledStepMemory, EstimateResult, LinearFit


@pytest.mark.parametrize("given, expected", [
    ("32,64,128", [32, 64, 128]), (" 64, 32 ,32", [32, 64]), ([128, 8], [8, 128]), (16, [16]),
])
def test_batch_sizes_parse(given, expected):
    assert check_batch_sizes(given) == expected


@pytest.mark.parametrize("bad", ["0,32", "-4", "32,abc", "1.5", [3.5], [True], "", [], None])
def test_batch_sizes_refuse_what_is_not_a_positive_integer(bad):
    with pytest.raises(InvalidInputError, match="positive integers|at least one"):
        check_batch_sizes(bad)


def test_exact_line_is_recovered():
    line = fit_line([(b, 3_000_000 + 9_900 * b) for b in (32, 64, 128)])
    assert line.fixed_bytes == pytest.approx(3_000_000)
    assert line.per_sample_bytes == pytest.approx(9_900)
    assert line.r_squared == 1.0 and line.max_residual_fraction == pytest.approx(0, abs=1e-12)
    assert line.points == 3


def test_a_bent_line_reports_how_far_from_linear():
    # The third size has 10% more than the line through the first two.
    pts = [(32, 1_000 + 32 * 100), (64, 1_000 + 64 * 100), (128, (1_000 + 128 * 100) * 1.1)]
    line = fit_line(pts)
    assert line.r_squared < 1.0
    assert 0.01 < line.max_residual_fraction < 0.1


def test_one_point_gives_a_slope_only_and_equal_sizes_are_refused():
    assert fit_line([(10, 500)]).per_sample_bytes == 50
    with pytest.raises(InvalidInputError, match="differ"):
        fit_line([(10, 500), (10, 600)])
    with pytest.raises(InvalidInputError):
        fit_line([])


def test_largest_batch_for_a_budget():
    line = LinearFit(fixed_bytes=1_000, per_sample_bytes=100)
    assert largest_batch(line, 1_000 + 100 * 37 + 99) == 37
    assert largest_batch(line, 1_000 + 100 * 37, granularity=8) == 32
    assert largest_batch(line, 1_050) == 0
    assert budget_batch(line, 2_000) == 10


def test_a_budget_below_the_fixed_cost_says_the_fixed_cost():
    line = LinearFit(fixed_bytes=3 << 20, per_sample_bytes=1 << 20)
    with pytest.raises(NothingFitsError, match=r"fixed cost .* is 3\.00 MiB") as info:
        budget_batch(line, 2 << 20)
    assert info.value.fixed_bytes == 3 << 20


def test_cards_table_states_and_applies_the_usable_share():
    line = LinearFit(fixed_bytes=1 << 30, per_sample_bytes=100 << 20)
    rows = card_table(line, (16, 80), reserve_bytes=1 << 30, share=0.9)
    assert [r.name for r in rows] == ["16 GB", "80 GB"]
    assert rows[0].usable_bytes == int(0.9 * (15 << 30))
    assert rows[0].max_batch_size == int((0.9 * (15 << 30) - (1 << 30)) // (100 << 20))
    assert rows[1].max_batch_size > rows[0].max_batch_size
    assert usable_bytes(1 << 20) == 0  # smaller than the reserve
    assert "90%" in card_assumption(1 << 30, 0.9) and "1.00 GiB" in card_assumption(1 << 30, 0.9)


def test_estimate_result_round_trips():
    size = CompiledStepMemory(batch_size=32, weights=10, optimizer_state=20, inputs=5,
                              temporaries=100, outputs=1, rounding=3)
    result = EstimateResult(model_name="m", sizes=[size], fit=LinearFit(1.0, 2.0, points=1),
                            cards=card_table(LinearFit(1.0, 2.0)), notes=["n"])
    again = EstimateResult.from_json(result.to_json())
    assert again == result and again.sizes[0].total_bytes == 139


def test_report_renders_and_plots_a_saved_estimate(tmp_path):
    pytest.importorskip("matplotlib")
    from rich.console import Console

    from batchfit.report import plot, render

    sizes = [CompiledStepMemory(batch_size=b, weights=1 << 20, temporaries=b << 20)
             for b in (8, 16)]
    line = fit_line([(m.batch_size, m.total_bytes) for m in sizes])
    result = EstimateResult(model_name="toy", sizes=sizes, fit=line, memory_budget_bytes=64 << 20,
                            max_batch_size=largest_batch(line, 64 << 20),
                            cards=card_table(line), notes=["compiled for the host CPU"])
    console = Console(width=120, color_system=None, record=True)
    render(result, console)
    text = console.export_text()
    assert "largest batch 63" in text and "141 GB" in text and "compiled for the host" in text
    out = plot(result, tmp_path / "est.png")
    assert out.stat().st_size > 1000


def test_guided_start_and_next_bracket_a_sharp_limit_in_few_probes():
    from batchfit.core.estimate import guided_next, guided_start

    # The truth: 1.5% more than predicted per sample, 2% margin; the search must end bracketed.
    line = LinearFit(fixed_bytes=10 << 20, per_sample_bytes=1 << 20)
    budget = 500 << 20

    def true_peak(b):
        return (10 << 20) + 1.015 * (1 << 20) * b

    def fits(b):
        return true_peak(b) < budget * 0.98

    b = guided_start(line, budget, margin=0.02, granularity=8)
    assert b % 8 == 0 and line.predict(b) <= budget * 0.98 < line.predict(b + 8)
    probes = [b]
    lo, hi = 0, None
    while hi is None or hi - lo > 8:
        ok = fits(b)
        lo, hi = (max(lo, b), hi) if ok else (lo, b if hi is None else min(hi, b))
        b = guided_next(line, budget, b, ok, true_peak(b), margin=0.02, granularity=8)
        if hi is not None:
            b = min(b, hi - 8)
        if b <= lo:
            b = lo + 8
        probes.append(b)
        assert len(probes) < 6
    best = max(x for x in range(8, 1000, 8) if fits(x))
    assert lo == best and len(probes) <= 4


def test_guided_next_without_a_peak_steps_one_granule():
    from batchfit.core.estimate import guided_next

    line = LinearFit(fixed_bytes=0, per_sample_bytes=10)
    assert guided_next(line, 1_000, 64, False, None, granularity=8) == 56
    assert guided_next(line, 1_000, 64, True, None, granularity=8) == 72
    assert guided_next(line, 1_000, 8, False, None, granularity=8) == 8


def test_upper_line_drops_small_sizes_off_the_line() -> None:
    from batchfit.core.estimate import upper_line

    bent = [(16, 10_000 + 16 * 600), (32, 10_000 + 32 * 1_000), (64, 10_000 + 64 * 1_000)]
    line = upper_line(bent)
    assert line.points == 2 and round(line.per_sample_bytes) == 1_000
    assert round(line.predict(256)) == 10_000 + 256 * 1_000
    straight = [(16, 5_000 + 16 * 100), (32, 5_000 + 32 * 100), (64, 5_000 + 64 * 101)]
    assert upper_line(straight).points == 3  # within the tolerance: every size kept


def test_line_points_carry_the_least_allocator_overhead() -> None:
    from batchfit.core.estimate import line_points
    from batchfit.results.estimate import CompiledStepMemory

    sizes = [CompiledStepMemory(batch_size=b, temporaries=100 * b, allocator_overhead=o)
             for b, o in ((16, 500), (32, 500), (64, 90_500))]  # a batch landed in a hole
    assert line_points(sizes) == [(16, 2_100), (32, 3_700), (64, 6_900)]
    assert sizes[2].total_bytes == 6_400 + 90_500  # the compiled size keeps its own
