"""The memory search on this process's devices: probes, the policy, the answer and its notes.

:mod:`batchfit.verbs.maxbatch` adds the multi-worker agreement on top; the multi-worker search
(:mod:`batchfit.verbs.multiworker`) runs this on each worker.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backend import get_backend
from ..backend.memory import resolve_budget
from ..core.confirm import (
    DEFAULT_CONFIRMATIONS,
    ConfirmPolicy,
    band_of,
    check_confirm,
    near_the_edge,
    run_confirmation,
    safe_size,
)
from ..core.estimate import XLA_MARGIN
from ..core.memory_model import fit_memory_model
from ..core.search import Trial, check_search, make_policy, run_search, search_argument
from ..core.settle import LIMIT_MARGIN, PROBE_STEPS
from ..core.sizes import format_bytes, parse_size
from ..core.validate import check_choice, check_int, is_int, is_number
from ..errors import (
    InvalidInputError,
    ModelLoadError,
    NothingFitsError,
    ProbeFailedError,
    error_line,
)
from ..results import Band, MaxBatchResult, MemoryModel, Probe
from ..workers.switches import switched_on
from .maxbatch_xla import settle_worker, xla_prior, xla_worker_config
from .resolve import ResolvedModel, resolve, validate_model_arg
from .safe_check import SAFE_PHASE, check_safe_by_default

ISOLATION_MODES = ("auto", "process", "none")
DEFAULT_UPPER = 1 << 20
DEFAULT_SEARCH_TOLERANCE = 0.02  # guided stops within 2% below the smallest failure
# ... and within 5% when fresh-process confirmations follow: they settle the edge (a band 4-8%
# of the budget wide, measured), so the search's last bracketing probes, each a draw from that
# band and half of them out-of-memory errors, are not bought. The answer stays >= 95% of the
# smallest failure (measured: the LSTM under 16 MiB, 272 fitting and 291 failing, took 282 at
# the limit and 277 out of memory to end on 272, which the confirmation then kept).
CONFIRM_SEARCH_TOLERANCE = 0.05
STALL_GRACE_SECONDS = 20.0  # an allocator's OOM wait (10 s) plus slack
STALL_FACTOR = 5.0

__all__ = ["CONFIRM_SEARCH_TOLERANCE", "DEFAULT_SEARCH_TOLERANCE", "ISOLATION_MODES",
           "search_max_batch_size", "search_tolerance_for",
           "validate_model_arg", "validate_search_args"]


def validate_search_args(search: str, granularity: Any, headroom: Any, steps: Any, upper: Any,
                         isolate: str, search_tolerance: Any) -> None:
    """Check the search's arguments before any model is built."""
    check_search(search)
    check_int("granularity", granularity, minimum=1, hint="e.g. 8 for tensor cores")
    check_fraction_below("headroom", headroom, 1, "e.g. 0.1 for 10%")
    check_int("steps", steps, minimum=1)
    if upper is not None and (not is_int(upper) or upper < granularity):
        raise InvalidInputError(f"max batch size (upper bound) must be an integer >= granularity "
                                f"({granularity}), got {upper!r}")
    check_choice("isolate", isolate, ISOLATION_MODES)
    if search_tolerance is not None:
        check_fraction_below("search_tolerance", search_tolerance, 0.5,
                             "e.g. 0.02 for 2% or 0 for an exact answer")


def search_tolerance_for(search_tolerance: float | None, confirm: int, *,
                         confirmable: bool) -> float:
    """The guided search's tolerance: the one given, else 2%, or 5% when ``confirm`` fresh
    processes will settle the edge afterwards (``confirmable``: the probes run in worker
    processes).

    Example:

    >>> search_tolerance_for(None, 3, confirmable=True), search_tolerance_for(None, 0,
    ...                                                                        confirmable=True)
    (0.05, 0.02)
    >>> search_tolerance_for(0.0, 3, confirmable=True)
    0.0
    """
    if search_tolerance is not None:
        return float(search_tolerance)
    if confirm > 0 and confirmable:
        return CONFIRM_SEARCH_TOLERANCE
    return DEFAULT_SEARCH_TOLERANCE


def check_fraction_below(name: str, value: Any, high: float, example: str) -> None:
    """Refuse ``value`` unless it is a number in ``[0, high)``, in the words batchfit has
    always used (``"headroom must be a fraction in [0, 1), e.g. 0.1 for 10%, got 2"``)."""
    if not is_number(value) or not 0 <= value < high:
        raise InvalidInputError(f"{name} must be a fraction in [0, {high:g}), {example}, "
                                f"got {value!r}")


def _device_name(device: str | None) -> str:
    if device:
        d = device.upper()
        if d in ("CPU", "GPU"):
            d += ":0"
        if not d.startswith(("CPU:", "GPU:")):
            raise InvalidInputError(f"device must be 'CPU:0' or 'GPU:0', got {device!r}")
        return d
    return get_backend().default_device()


@dataclass(frozen=True)
class _Placement:
    """Where the probes run and under which budget (per replica under a strategy)."""

    device: str
    budget: int | None
    budget_source: str
    notes: list[str]


def _placement(resolved: ResolvedModel, memory: str | int | None,
               device: str | None) -> _Placement:
    """The probe device and the budget: one replica's device under a strategy."""
    if resolved.strategy is None:
        dev = _device_name(device)
        budget, budget_source, budget_note = resolve_budget(memory, dev)
        return _Placement(dev, budget, budget_source, [budget_note] if budget_note else [])
    backend = get_backend()
    dev = _device_name(device) if device else backend.probe_device(resolved.strategy)
    if memory is None:
        budget, strategy_note = backend.smallest_device_memory(resolved.strategy)
        budget_source = "device"
    else:
        budget, budget_source, strategy_note = parse_size(memory), "user", ""
    notes = [strategy_note] if strategy_note else []
    notes.append(f"{resolved.distribute} strategy, {resolved.replicas} replica(s): memory "
                 f"probed per replica on one device; the global batch is per replica x "
                 f"{resolved.replicas}")
    return _Placement(dev, budget, budget_source, notes)


@dataclass
class _Prober:
    """Runs the probes: in a worker process, or in this process with a runner."""

    mode: str                      # "process" | "none"
    worker: Any = None
    runner: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def probe(self, batch_size: int, timeout: float) -> Probe:
        if self.worker is not None:
            return self.worker.probe(batch_size, timeout=timeout)  # type: ignore[no-any-return]
        return self.runner.run(batch_size)  # type: ignore[no-any-return]

    def probe_fresh(self, batch_size: int, timeout: float, *, again: bool = False) -> Probe:
        """A probe in a process that has run nothing before (a worker is needed). ``again``:
        the next probe is likely at this size too (a confirmation): the process started
        meanwhile prepares for it (:meth:`~batchfit.workers.worker.ProbeWorker.expect`)."""
        self.worker.expect(batch_size if again else None)
        return self.worker.probe_fresh(batch_size, timeout=timeout)  # type: ignore[no-any-return]

    def near_the_edge(self, probes: list[Probe], batch_size: int) -> bool:
        """Whether a search probe at ``batch_size`` runs in a fresh process rather than a
        reused one: the worker reuses processes after fits, and the size's predicted peak is
        near the budget (:func:`batchfit.core.confirm.near_the_edge`;
        ``BATCHFIT_FRESH_NEAR_EDGE=0`` turns this off)."""
        w = self.worker
        if w is None or not (w.fresh_each_probe and w.reuse_fits):
            return False
        if not switched_on("BATCHFIT_FRESH_NEAR_EDGE"):
            return False
        return near_the_edge(_fit_points(probes), batch_size, w.config.budget_bytes)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _start_prober(resolved: ResolvedModel, place: _Placement, isolate: str, *, data: Any,
                  input_shapes: Any, steps: int, seed: int, probe_timeout: float,
                  fresh: bool, xla: dict[str, Any] | None = None) -> _Prober:
    """Start the worker (``isolate`` process or auto), or fall back to probing in this process."""
    dev, budget = place.device, place.budget
    mode = isolate
    if mode == "auto":
        mode = "process" if (dev.startswith("CPU") or not resolved.given_object) else "none"
    prober = _Prober(mode=mode)
    if mode == "process":
        worker, info, fallback_note = _start_worker(
            resolved.source, data, input_shapes, steps, dev, budget, seed, probe_timeout, fresh,
            explicit=isolate == "process", xla=xla)
        prober.worker, prober.info = worker, info
        if worker is None:
            prober.mode = "none"
            prober.notes.append(fallback_note)
    if prober.mode == "none" and resolved.replicas > 1 and resolved.given_object:
        raise InvalidInputError(
            "a model built under a distribution strategy cannot be probed per replica in this "
            "process; pass a module-level factory or a spec ('file.py:factory') so each probe "
            "builds it on one device in a worker process")
    if prober.mode == "none":
        prober.runner, prober.info = _in_process_runner(resolved.source, data, input_shapes,
                                                        steps, dev, budget, seed)
        if budget is not None and dev.startswith("CPU"):
            predicted = prober.info.get("environment", {}).get("memory_source")  # JAX on CPU
            prober.notes.append(
                "in-process probes: the budget is compared with predicted (compile-time) peaks"
                if predicted else "in-process probes: the budget is compared with measured "
                "peaks, not enforced by the allocator (fragmentation is not accounted)")
    prober.notes.extend(prober.info.get("notes", []))
    return prober


def _trial_function(prober: _Prober, probes: list[Probe], probe_timeout: float,
                    on_probe: Callable[[Probe], None] | None, *,
                    confirm: bool = False) -> Callable[[int], Trial]:
    """What the search policy calls: one probe, recorded in ``probes``, as a :class:`Trial`
    (``confirm``: in a fresh process, recorded with ``phase="confirm"``)."""

    def trial(b: int) -> Trial:
        timeout = _stall_timeout(probes, b, probe_timeout)
        if confirm:
            p = dataclasses.replace(prober.probe_fresh(b, timeout, again=True),
                                    phase="confirm")
        elif prober.near_the_edge(probes, b):
            p = prober.probe_fresh(b, timeout)
        else:
            p = prober.probe(b, timeout)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        if p.outcome == "refused" and not any(q.fits for q in probes) and len(probes) == 1:
            raise ProbeFailedError(
                f"the model does not train at batch size {b}, for a reason other than memory: "
                f"{p.detail}. Fix the model (or its inputs: pass data= / input_shapes=) and retry.")
        return Trial(batch_size=b, fits=p.fits, peak_bytes=p.peak_bytes)

    return trial


def search_max_batch_size(
    model: Any,
    memory: str | int | None = None,
    search: str | None = None,
    *,
    granularity: int = 1,
    data: Any = None,
    input_shapes: Any = None,
    upper: int | None = None,
    headroom: float = 0.0,
    steps: int = PROBE_STEPS,
    isolate: str = "auto",
    device: str | None = None,
    probe_timeout: float = 600.0,
    fresh: bool = True,
    max_probes: int = 60,
    on_probe: Callable[[Probe], None] | None = None,
    seed: int = 0,
    distribute: Any = None,
    search_tolerance: float | None = None,
    strategy: str | None = None,
    confirm: int = DEFAULT_CONFIRMATIONS,
    jit: bool = False,
) -> MaxBatchResult:
    """The search on this process's devices: :func:`batchfit.find_max_batch_size` without the
    multi-worker agreement (``distribute`` may be a single-process strategy). Arguments and
    result as there (``strategy=`` is the deprecated alias of ``search=``).
    """
    t_start = time.perf_counter()
    search = search_argument(search, strategy)
    validate_search_args(search, granularity, headroom, steps, upper, isolate, search_tolerance)
    confirm = check_confirm(confirm)
    # NumPy numbers are accepted; the result holds plain ones (json cannot write an np.int64).
    granularity, steps, headroom = int(granularity), int(steps), float(headroom)
    resolved = resolve(model, distribute)
    place = _placement(resolved, memory, device)
    upper = int(upper) if upper is not None else DEFAULT_UPPER
    prober = _start_prober(resolved, place, isolate, data=data, input_shapes=input_shapes,
                           steps=steps, seed=seed, probe_timeout=probe_timeout, fresh=fresh,
                           xla=xla_worker_config(search, place.budget, jit=jit))
    settle_worker(prober.worker, prober.info, jit=jit)
    notes = [*place.notes, *prober.notes]
    if jit and prober.worker is None:
        notes.append("jit=True needs process isolation: the in-process probes ran the model's "
                     "step as it is")
    prior = xla_prior(prober.info, place.budget, granularity, upper, XLA_MARGIN, steps,
                      notes) if search == "guided" else None
    search_tolerance = search_tolerance_for(search_tolerance, confirm,
                                            confirmable=prober.worker is not None)
    policy = make_policy(search, budget_bytes=place.budget, granularity=granularity, upper=upper,
                         saturation=LIMIT_MARGIN, tolerance=float(search_tolerance),
                         init=prior.start if prior else None,
                         prior=prior.need if prior else None,
                         prior_peak=prior.peak if prior else None)
    probes: list[Probe] = []
    try:
        trials = run_search(policy, _trial_function(prober, probes, probe_timeout, on_probe),
                            max_probes=max_probes)
        confirmed, confirm_policy, shared = _confirm(prober, trials, probes, confirm,
                                                     place.budget, granularity, probe_timeout,
                                                     on_probe, notes)
    finally:
        prober.close()

    everything = [*trials, *confirmed]
    mem_model = _fit(probes)
    band = band_of(everything, confirmations=confirm if confirm_policy else 0,
                   confirmed=bool(confirm_policy and confirm_policy.is_confirmed(
                       trials, confirmed, shared)),
                   step_downs=len({t.batch_size for t in confirmed if not t.fits}))
    best = band.reliable
    if best <= 0:
        raise _nothing_fits(probes, granularity, place.budget, mem_model,
                            prober.info.get("state_bytes"))
    if not any(p.peak_bytes is not None for p in probes):
        notes.append("the allocator kept no statistics, so no peaks were measured (on CPU, "
                     "set TF_CPU_ALLOCATOR_USE_BFC=true before importing TensorFlow)")
    slope = _memory_slope(probes, mem_model)
    band, safe, free = _safe(band, everything, mem_model, place.budget, headroom, granularity,
                             notes, memory_bound=slope is not None)
    if prober.worker is not None and confirm_policy is not None:
        checked = check_safe_by_default(
            prober.worker.config, safe, k=confirm, granularity=granularity,
            per_sample_bytes=slope, probe_timeout=probe_timeout, probes=probes,
            on_probe=on_probe, notes=notes)
        if checked.checks:
            free = _free_at(mem_model, place.budget, checked.batch_size, free)
            safe = checked.batch_size
            band = dataclasses.replace(band, safe_checks=checked.checks,
                                       safe_confirmed=checked.confirmed,
                                       safe_settings=checked.settings)
    bad = [p for p in probes if p.outcome in ("crashed", "timeout")]
    if bad:
        notes.append(f"{len(bad)} probe(s) killed the worker ({bad[0].detail[:120]}); "
                     f"treated as not fitting, the search went on")
    return MaxBatchResult(
        max_batch_size=best, safe_batch_size=safe, headroom=free,
        memory_budget_bytes=place.budget, budget_source=place.budget_source, device=place.device,
        isolation="process" if prober.mode == "process" else "in-process", search=search,
        granularity=granularity, upper_bound=upper, bracketed=policy.bracketed(trials),
        memory_model=mem_model, probes=probes, seconds=time.perf_counter() - t_start,
        model_name=str(prober.info.get("model_name", "")), notes=notes,
        environment=dict(prober.info.get("environment", {})), replicas=resolved.replicas,
        distribute=resolved.distribute,
        search_tolerance=float(search_tolerance) if search == "guided" else 0.0, band=band,
        xla_step=bool(prober.info.get("step_jit")),
        xla_prediction=prior.start if prior else None)


def _confirm(prober: _Prober, trials: list[Trial], probes: list[Probe], k: int,
             budget: int | None, granularity: int, probe_timeout: float,
             on_probe: Callable[[Probe], None] | None,
             notes: list[str]) -> tuple[list[Trial], ConfirmPolicy | None, list[Trial]]:
    """Confirm the search's answer in ``k`` fresh processes, stepping down on any failure."""
    if k <= 0 or not any(t.fits for t in trials):
        return [], None, []
    if prober.worker is None:
        notes.append("not confirmed: confirmation runs the answer again in fresh processes, "
                      "which needs process isolation (isolate='process'); the answer is the "
                      "search's single draw")
        return [], None, []
    policy = ConfirmPolicy(k=k, granularity=granularity, budget_bytes=budget,
                           per_sample_bytes=_memory_slope(probes, _fit(probes)))
    answer = band_of(trials).reliable
    shared = _fresh_search_fits(prober, probes)
    prober.worker.prefetch(_confirm_spares(k), size=answer)
    confirmed = run_confirmation(policy, trials, _trial_function(
        prober, probes, probe_timeout, on_probe, confirm=True), shared=shared)
    edge = band_of([*trials, *confirmed]).reliable
    failed = [t for t in confirmed if not t.fits]
    ok = policy.is_confirmed(trials, confirmed, shared)
    reused = sum(t.batch_size == edge for t in shared)
    counted = (f" ({reused} of them the search's own probe in a fresh process)" if reused
               else "")
    if ok and not failed:
        notes.append(f"confirmed: {answer} fitted in {k} of {k} fresh processes{counted}")
    elif ok:
        tried = sorted({t.batch_size for t in failed}, reverse=True)
        notes.append(f"the search's answer {answer} did not hold: confirmation in fresh "
                     f"processes failed at {', '.join(map(str, tried))}; stepped down to "
                     f"{edge}, which fitted {k} of {k}")
    else:
        notes.append(f"not confirmed: after {len(failed)} failed confirmation(s) the answer is "
                     f"{edge}, the largest size that fitted every time it was tried, without "
                     f"{k} fresh-process confirmations")
    return confirmed, policy, shared


# Whether a search fit in a process that had run nothing counts as one of the k confirmations.
# Off: in a clean-clone CI run (2026-12-06) the Transformer's answer at 64 MiB, confirmed with
# one such shared fit, then failed in 1 of 2 further fresh processes; k dedicated runs after the
# search are the reliability the answer promises (they cost 3 of 9 runs one probe in
# bench_trust). The pure rule (core.confirm, ``shared=``) stays tested for when it is measured
# safe.
SHARE_SEARCH_FITS = False
# On for an XLA-compiled step: its memory is fixed when it compiles, and every size runs in a
# fresh process (``settle_worker``). Measured (the example CNN under 128 MiB, ``max --jit``,
# bench/results/jit_cache_s16.json): the answer 42 peaked at 72,262,912-72,263,680 B in 8 of 8
# fresh processes, and 43 ran out of memory in every fresh one (10 of 10, session 16).
SHARE_XLA_SEARCH_FITS = True


def _fresh_search_fits(prober: _Prober, probes: list[Probe]) -> list[Trial]:
    """The search's fits that ran in a process that had run nothing before: confirmations
    already (with ``fresh``: the first probe, and each after a failure), when
    :data:`SHARE_SEARCH_FITS` (:data:`SHARE_XLA_SEARCH_FITS` for an XLA-compiled step)."""
    worker = prober.worker
    share = (SHARE_XLA_SEARCH_FITS if prober.info.get("step_jit") else SHARE_SEARCH_FITS)
    if not share or worker is None or not getattr(worker, "fresh_each_probe", False):
        return []
    return [Trial(p.batch_size, True, p.peak_bytes) for p in probes
            if p.phase == "search" and p.fits and not p.reused]


#: Outcomes the budget itself gave: the allocator refused, or the peak came over or near it.
_BUDGET_OUTCOMES = ("oom", "over_budget", "at_limit")
#: Outcomes that say memory set the limit (a refusal by the model does not; a worker that
#: crashed or stalled may have been short of memory).
_MEMORY_OUTCOMES = (*_BUDGET_OUTCOMES, "crashed", "timeout")


def _memory_slope(probes: list[Probe], model: MemoryModel | None) -> float | None:
    """The memory model's bytes per sample where memory set the limit (some probe failed for
    memory), to size steps and margins in samples; ``None`` otherwise: a model whose size is
    limited by something else (a layer refusing large batches) can have a per-sample memory
    so small that a margin of a few MiB is thousands of samples."""
    if model is None or not any(p.outcome in _MEMORY_OUTCOMES for p in probes):
        return None
    return model.per_sample_bytes


def _safe(band: Band, trials: list[Trial], model: MemoryModel | None, budget: int | None,
          headroom: float, granularity: int, notes: list[str], *,
          memory_bound: bool = True) -> tuple[Band, int, float]:
    """The band with its margin, ``safe_batch_size`` and the fraction of the budget left free
    (``memory_bound``: a failure above the edge was memory's; if not, the margin is kept
    under the budget, as when nothing failed)."""
    sized = band if memory_bound else dataclasses.replace(band, never=None)
    s = safe_size(sized, trials, budget_bytes=budget,
                  per_sample_bytes=model.per_sample_bytes if model else None,
                  fixed_bytes=model.fixed_bytes if model else None, granularity=granularity,
                  headroom=headroom)
    safe = s.batch_size
    if s.margin_bytes is not None and budget and model is not None and (
            model.predict(safe) > budget - s.margin_bytes):
        notes.append(f"even safe_batch_size {safe} is predicted to come within the margin of "
                     f"the budget: the model's fixed memory leaves little room")
    band = dataclasses.replace(band, margin_bytes=s.margin_bytes, margin_reason=s.reason)
    return band, safe, s.free_fraction if s.free_fraction is not None else headroom


def _nothing_fits(probes: list[Probe], granularity: int, budget: int | None,
                  mem_model: MemoryModel | None, state: int | None) -> NothingFitsError:
    """The error for a search in which nothing fit: the smallest size tried, the fixed cost."""
    smallest = min((p.batch_size for p in probes), default=granularity)
    fixed = mem_model.fixed_bytes if mem_model else state
    memory = any(p.batch_size == smallest and p.outcome in _BUDGET_OUTCOMES
                 for p in probes) or not probes
    parts = [f"nothing fits: even batch {smallest} does not fit" if memory else
             f"nothing fits: no probe down to batch {smallest} succeeded"]
    if budget is not None:
        parts.append(f"in {format_bytes(budget)}")
    msg = " ".join(parts) + "."
    if state is not None:
        msg += (f" The model's weights, optimizer state and metrics alone take "
                f"{format_bytes(state)}")
        msg += f" ({state / budget:.0%} of the budget)." if budget else "."
    msg += (" Use a larger budget, a smaller model, mixed precision, or an optimizer with "
            "less state (Adam keeps two extra copies of the weights, SGD none).")
    return NothingFitsError(msg + _not_memory(probes), fixed_bytes=fixed, budget_bytes=budget)


_OUTCOME_WORDS = {"timeout": "timed out", "crashed": "crashed (the worker process died)",
                  "refused": "raised an error in the model"}


def _not_memory(probes: list[Probe]) -> str:
    """What a "nothing fits" message must add where some probes failed for another reason than
    memory (a worker that crashed or timed out, a model that raised): each such outcome, how
    often, and its first detail; empty where every failure was memory's."""
    other: dict[str, list[Probe]] = {}
    for p in probes:
        if not p.fits and p.outcome not in _BUDGET_OUTCOMES:
            other.setdefault(p.outcome, []).append(p)
    if not other:
        return ""
    said = "; ".join(f"{len(ps)} {_OUTCOME_WORDS.get(outcome, outcome)} (first at batch "
                     f"{ps[0].batch_size}: {ps[0].detail or 'no detail'})"
                     for outcome, ps in other.items())
    return (f" Not every failure was memory's: {said}. Those say nothing about the budget: "
            f"fix what they name, then run again.")


def _stall_timeout(probes: list[Probe], batch_size: int, limit: float) -> float:
    """How long a probe at ``batch_size`` may take before it counts as stalled.

    Near a capped allocator's limit a step can wait 10 s for memory at every allocation (an
    LSTM's loop took 60-130 s to fail, measured), so a probe is given a generous multiple of
    what the fits so far predict for its size, plus the allocator's own 10 s wait, and is
    stopped after that: it would not be a usable batch size anyway.
    """
    estimates = [p.seconds * max(1.0, batch_size / p.batch_size) for p in probes if p.fits]
    if not estimates:
        return limit
    return min(limit, STALL_GRACE_SECONDS + STALL_FACTOR * max(estimates))


def _free_at(model: MemoryModel | None, budget: int | None, size: int, free: float) -> float:
    """The fraction of the budget the memory model predicts free at ``size`` (else ``free``)."""
    if model is None or not budget:
        return free
    return max(0.0, 1.0 - model.predict(size) / budget)


def _fit_points(probes: list[Probe]) -> list[tuple[int, float]]:
    """``(batch_size, peak_bytes)`` of the probes that fitted under the workers' settings."""
    return [(p.batch_size, float(p.peak_bytes)) for p in probes
            if p.fits and p.peak_bytes is not None and p.phase != SAFE_PHASE]


def _fit(probes: list[Probe]) -> MemoryModel | None:
    """The memory model of the probes that fitted under the workers' settings (the last peak
    measured at each size)."""
    pts = dict(_fit_points(probes))
    if len(pts) < 2:
        return None
    return fit_memory_model(sorted(pts.items()))


def _start_worker(model: Any, data: Any, input_shapes: Any, steps: int, device: str,
                  budget: int | None, seed: int, probe_timeout: float, fresh: bool, *,
                  explicit: bool, xla: dict[str, Any] | None = None
                  ) -> tuple[Any, dict[str, Any], str]:
    from ..workers.worker import ModelSource, ProbeWorker, WorkerConfig

    try:
        source = ModelSource.from_model(model)
    except Exception as exc:
        why = (f"the model cannot be sent to a worker process ({type(exc).__name__}: "
               f"{error_line(exc, limit=200)})")
        if explicit:
            raise InvalidInputError(why + "; pass a module-level factory function instead of the "
                                          "model object, or isolate='none'") from exc
        return None, {}, why + "; probed in this process instead"
    payload = data
    if data is not None and not isinstance(data, str):
        payload = get_backend().data_sample(data)
    worker = ProbeWorker(WorkerConfig(source=source, data=payload, input_shapes=input_shapes,
                                      steps=steps, device=device, budget_bytes=budget, seed=seed,
                                      **(xla or {})),
                         probe_timeout=probe_timeout, fresh_each_probe=fresh,
                         reuse_fits=fresh and _reuse_workers())
    try:
        info = worker.start()
    except BaseException as exc:
        worker.close()  # its processes, and its hold on the process's fork server
        if not isinstance(exc, ModelLoadError) or source.kind != "pickle" or explicit:
            raise
        return None, {}, ("the model could not be rebuilt in a worker process (custom layers "
                          "without get_config?); probed in this process instead. Pass a "
                          "module-level factory to get an enforced budget")
    return worker, info, ""


def _reuse_workers() -> bool:
    """Run ascending fits in one worker (``BATCHFIT_REUSE_WORKER=0``: a fresh process each)."""
    return switched_on("BATCHFIT_REUSE_WORKER")


def _confirm_spares(k: int) -> int:
    """Fresh processes to keep warming ahead during confirmation: one per spare core, at
    most the ``k - 1`` confirmations that follow the current one, at least one.

    Not more on two cores: building and tracing are CPU-bound, so processes started together
    share the cores and each takes longer. Measured (MobileNetV2 at 256 MiB, same loaded
    machine): with ``k - 1`` spares started from the search's first failure, a search's
    processes took 29 s each to build and trace instead of 9 s, its probes 2-3x longer, and
    it waited 84.5 s for processes against 42.6 s with one spare.
    """
    return max(1, min(k - 1, (os.cpu_count() or 2) - 1))


def _in_process_runner(model: Any, data: Any, input_shapes: Any, steps: int, device: str,
                       budget: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    backend = get_backend()
    if isinstance(model, str):
        model = backend.load_model(model)
    elif not backend.is_model(model):
        # A factory probed here (isolate="none", or one defined in __main__ that no worker can
        # import): its own errors in the words find_max_batch_size has always used.
        try:
            built = model()
        except Exception as exc:
            raise ModelLoadError(f"the model factory raised {type(exc).__name__}: {exc}") from exc
        backend.check_model(built)
        model = built
    batch_fn, notes = backend.make_batch_fn(model, data, input_shapes, seed)
    runner = backend.probe_runner(model, batch_fn, steps=steps, device=device,
                                  budget_bytes=budget, limit_margin=LIMIT_MARGIN)
    runner.warm_up()
    return runner, {"model_name": model.name, "state_bytes": backend.state_bytes(model),
                    "notes": notes, "environment": backend.environment_info()}
