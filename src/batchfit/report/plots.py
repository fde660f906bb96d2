"""Figures with matplotlib, imported only when a plot is asked for (headless ``Agg`` backend).

Memory against batch size (probes, the fitted line, the budget) and throughput against batch
size (median and spread, the knee, the recommendation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..results import MaxBatchResult, ThroughputResult, TuneResult

MiB = float(1 << 20)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        from ..errors import InvalidInputError
        raise InvalidInputError("plots need matplotlib: pip install 'batchfit[plot]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _memory_panel(ax: Any, r: MaxBatchResult) -> None:
    fits = [p for p in r.probes if p.fits and p.peak_bytes is not None]
    ax.scatter([p.batch_size for p in fits], [p.peak_bytes / MiB for p in fits],
               color="tab:green", zorder=3, label="probe fits (peak)")
    failed = [p for p in r.probes if not p.fits]
    top = r.memory_budget_bytes / MiB if r.memory_budget_bytes else None
    if failed:
        ys = [(p.peak_bytes / MiB if p.peak_bytes else top or 0) for p in failed]
        ax.scatter([p.batch_size for p in failed], ys, marker="x", color="tab:red", zorder=3,
                   label="does not fit")
    sizes = [p.batch_size for p in r.probes] or [1]
    if r.memory_model is not None:
        xs = [0, max(sizes) * 1.05]
        ax.plot(xs, [r.memory_model.predict(x) / MiB for x in xs], color="tab:blue", lw=1,
                label=f"fit: {r.memory_model.fixed_bytes / MiB:.1f} MiB + "
                      f"{r.memory_model.per_sample_bytes / 1024:.1f} KiB x batch")
    if top:
        ax.axhline(top, color="black", ls="--", lw=1, label=f"budget {top:.0f} MiB")
    ax.axvline(r.max_batch_size, color="tab:green", ls=":", lw=1,
               label=f"largest fit {r.max_batch_size}")
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("memory")
    ax.legend(fontsize=7, loc="upper left")


def _throughput_panel(ax: Any, t: ThroughputResult, *, recommended: int | None = None,
                      largest: int | None = None, goodput: list[float] | None = None,
                      noise_scale: float | None = None) -> None:
    pts = t.measured()
    xs = [p.batch_size for p in pts]
    ys = [p.samples_per_second or 0.0 for p in pts]
    lo = [y - (p.low or y) for p, y in zip(pts, ys)]
    hi = [(p.high or y) - y for p, y in zip(pts, ys)]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", color="tab:blue", capsize=3,
                label="median of windows (min-max)")
    if goodput and len(goodput) == len(xs):
        label = "goodput (x statistical efficiency" + (
            f", B_noise {noise_scale:,.0f})" if noise_scale else ")")
        ax.plot(xs, goodput, marker="s", color="tab:purple", ls="--", label=label)
    if t.knee is not None and t.knee in xs:
        ax.scatter([t.knee], [ys[xs.index(t.knee)]], s=160, facecolors="none",
                   edgecolors="tab:orange", lw=2, zorder=4,
                   label=f"knee {t.knee} (within {t.tolerance:.0%} of best)")
    if t.knee_range and t.knee_range[0] != t.knee_range[1]:
        ax.axvspan(t.knee_range[0], t.knee_range[1], color="tab:orange", alpha=0.12,
                   label=f"knee range {t.knee_range[0]}-{t.knee_range[1]} (timing error)")
    if recommended is not None:
        ax.axvline(recommended, color="tab:green", lw=2, alpha=0.6,
                   label=f"recommended {recommended}")
    if largest is not None:
        ax.axvline(largest, color="black", ls=":", lw=1, label=f"largest fit {largest}")
    if xs and min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    ax.set_title(f"throughput ({t.device})")
    ax.legend(fontsize=7, loc="lower right")


def plot_tune(result: TuneResult, path: str | Path) -> Path:
    """Two panels: memory against batch size, throughput against batch size."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        _memory_panel(a, result.max_batch)
        _throughput_panel(b, result.throughput, recommended=result.recommendation.batch_size,
                          largest=result.max_batch.max_batch_size, goodput=result.goodput,
                          noise_scale=result.noise_scale)
        name = result.max_batch.model_name or "model"
        fig.suptitle(f"{name}: recommended batch {result.recommendation.batch_size} "
                     f"(decided by {result.recommendation.decided_by})", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def _one_panel(draw: Callable[[Any], None], path: str | Path) -> Path:
    """A single-panel figure drawn by ``draw(ax)``, saved to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    try:
        draw(ax)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def plot_max(result: MaxBatchResult, path: str | Path) -> Path:
    """Memory against batch size for a ``max`` run."""
    return _one_panel(lambda ax: _memory_panel(ax, result), path)


def plot_throughput(result: ThroughputResult, path: str | Path) -> Path:
    """Throughput against batch size, with the knee."""
    return _one_panel(lambda ax: _throughput_panel(ax, result), path)
