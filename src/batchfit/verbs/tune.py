"""``tune``: the largest batch that fits, the throughput curve, and one recommended batch size."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..core.recommend import (
    Criterion,
    TuneFacts,
    default_criteria,
    plan_target,
    recommend,
)
from ..core.search import search_argument
from ..core.throughput import geometric_grid
from ..core.validate import is_int, is_number
from ..errors import InvalidInputError
from ..results import (
    MaxBatchResult,
    NoiseScaleResult,
    Probe,
    ThroughputPoint,
    TuneResult,
)
from .resolve import ResolvedModel, resolve
from .throughput import (
    DEFAULT_TARGET_ERROR,
    DEFAULT_WINDOW_SECONDS,
    DEFAULT_WINDOWS,
    check_sizes,
    check_tolerance,
    profile_throughput,
    validate_timing,
)


def tune(
    model: Any,
    memory: str | int | None = None,
    data: Any = None,
    *,
    search: str | None = None,
    granularity: int = 1,
    input_shapes: Any = None,
    upper: int | None = None,
    headroom: float = 0.1,
    target: int | None = None,
    noise_scale: float | str | Any = None,
    tolerance: float = 0.05,
    batch_sizes: Sequence[int] | None = None,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    windows: int = DEFAULT_WINDOWS,
    max_windows: int | None = None,
    target_error: float = DEFAULT_TARGET_ERROR,
    isolate: str = "auto",
    device: str | None = None,
    criteria: Sequence[Criterion] | None = None,
    extras: dict[str, Any] | None = None,
    seed: int = 0,
    on_probe: Callable[[Probe], None] | None = None,
    on_point: Callable[[ThroughputPoint], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    distribute: Any = None,
    search_tolerance: float = 0.02,
    strategy: str | None = None,
) -> TuneResult:
    """Find the batch size to train with: memory limit, throughput curve, recommendation.

    First the largest batch that fits ``memory`` (:func:`batchfit.find_max_batch_size`, real
    probes in an isolated worker), then steady-state throughput on a geometric grid up to it
    (:func:`batchfit.profile_throughput`, in this process with normal settings), then a
    recommendation from pluggable criteria: by default memory caps the batch at the safe size
    and throughput proposes its knee (the smallest size within ``tolerance`` of the best).

    Args:
        model: a compiled ``keras.Model``, a zero-argument function returning one, or a spec
            (``"file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``).
        memory: the budget (``"16GiB"``, bytes); default: the device's own memory.
        data: the user's sample (``(x, y)`` or a ``tf.data.Dataset``); default: synthesized.
        search: the memory search policy (``"guided"``, the default, ``"binsearch"``,
            ``"power"``).
        granularity: sizes are multiples of this (e.g. 8 for tensor cores).
        input_shapes: lengths of non-batch ``None`` dimensions.
        upper: never try a larger batch.
        headroom: fraction of the budget the safe size leaves free (default 0.1).
        target: an effective batch size you want; the result says how to reach it (micro-batch
            and gradient-accumulation steps) and what it costs in throughput.
        noise_scale: weigh the gradient noise scale (goodput criterion): a number
            (``B_simple``), a :class:`~batchfit.results.NoiseScaleResult` (from
            :func:`batchfit.estimate_noise_scale` or ``batchfit noise --json``), or
            ``"estimate"`` to measure it on ``data`` (real data required). Default ``None``:
            the recommendation weighs memory and speed only.
        tolerance: the knee's tolerance (default 0.05: within 5% of the best throughput).
        batch_sizes: sizes to time instead of the default grid (those above the largest
            batch that fits are left out, with a note).
        window_seconds: wall time of each timed window.
        windows: timed windows per size at least (default 5).
        max_windows: timed windows per size at most (default ``3 * windows``): a size whose
            median is not yet known to ``target_error`` gets more windows, up to this.
        target_error: relative standard error of each size's median to aim at (default 0.02).
        isolate: how memory probes run (see ``find_max_batch_size``).
        device: ``"CPU:0"`` / ``"GPU:0"``.
        criteria: the recommendation's criteria (default: memory, then throughput); add your
            own object with ``name`` and ``judge(facts) -> Verdict | None``.
        extras: further facts for custom criteria (e.g. ``{"noise_scale": 420.0}``).
        seed: seed for synthesized data.
        on_probe: called with each memory probe.
        on_point: called with each throughput point.
        on_phase: called with a short label as each phase starts.
        search_tolerance: the memory search stops once its answer is within this fraction
            below the smallest failure (default 0.02; 0: exact; see
            :func:`batchfit.find_max_batch_size`).
        distribute: a ``tf.distribute.Strategy``, ``"mirrored"``, ``"multiworker"`` or
            ``None`` (default: the strategy a model object was built under, if any). Memory is
            searched per replica (``memory=`` is one device's memory); throughput is timed at
            the global batch (per replica x replicas) with the model under the strategy (a
            spec or factory is built inside ``strategy.scope()``); the recommendation, the
            curve and ``target`` are global sizes, ``per_replica_batch_size`` the share of
            each replica.
        strategy: deprecated alias of ``search`` (it warns, with a ``FutureWarning``, and goes
            in the next release); a ``tf.distribute`` strategy goes in ``distribute=``.

    Returns:
        A :class:`~batchfit.results.TuneResult`; ``result.batch_size`` is the recommendation.

    Example:

    >>> import batchfit
    >>> r = batchfit.tune("batchfit.examples.models:demo_model", memory="128MiB")  # doctest: +SKIP
    >>> r.batch_size, r.recommendation.decided_by                                # doctest: +SKIP
    (256, 'throughput')
    >>> r = batchfit.tune(build_model, memory="16GiB", distribute="mirrored")  # doctest: +SKIP
    >>> r.batch_size, r.per_replica_batch_size, r.replicas                    # doctest: +SKIP
    (512, 256, 2)
    """
    t_start = time.perf_counter()
    search = search_argument(search, strategy)
    _check_arguments(target, tolerance, noise_scale, data)
    validate_timing(window_seconds, windows, max_windows, target_error, tolerance)
    if batch_sizes is not None:
        batch_sizes = check_sizes(batch_sizes)  # sorted, each once (an iterator is read once)
    phase = on_phase or (lambda _label: None)
    # Load once here: the memory search needs the spec (its worker rebuilds the model), the
    # throughput measurement needs the model itself.
    resolved = _resolve(model, distribute)
    replicas = resolved.replicas

    from .maxbatch import find_max_batch_size

    phase("memory")
    max_result: MaxBatchResult = find_max_batch_size(
        resolved.rebuildable, memory=memory, search=search, granularity=granularity, data=data,
        input_shapes=input_shapes, upper=upper, headroom=headroom, isolate=isolate,
        device=device, seed=seed, on_probe=on_probe, distribute=resolved.strategy,
        search_tolerance=search_tolerance)
    granularity = int(granularity)  # checked by the search; NumPy integers as plain ones
    target = None if target is None else int(target)
    notes: list[str] = []
    sizes = _timing_sizes(batch_sizes, max_result, replicas, granularity, notes)

    phase("throughput")
    throughput = profile_throughput(
        resolved.model, sizes, data=data, input_shapes=input_shapes,
        window_seconds=window_seconds, windows=windows, max_windows=max_windows,
        target_error=target_error, tolerance=tolerance, device=device, seed=seed,
        on_point=on_point)

    noise_result, b_noise = _noise(noise_scale, resolved.model, data, seed, phase)
    measured = throughput.measured()
    facts = _facts(max_result, measured, replicas, tolerance, granularity, b_noise, extras)
    rec = recommend(facts, list(criteria) if criteria is not None else default_criteria())
    plan = plan_target(target, facts) if target is not None else None
    if replicas > 1:
        notes.append(f"{resolved.distribute} strategy, {replicas} replicas: sizes are global "
                     f"batches (per replica x {replicas}); memory was searched per replica, "
                     "throughput timed with the model under the strategy")
    if replicas == 1 and throughput.device != max_result.device.split(" ")[0]:
        notes.append(f"memory probed on {max_result.device}, throughput timed on "
                     f"{throughput.device}")
    goodput: list[float] = []
    if b_noise is not None and measured:
        from ..core.noise import goodput_optimal_batch

        choice = goodput_optimal_batch(facts.batch_sizes, facts.throughputs, b_noise)
        goodput = list(choice.goodput)
    return TuneResult(recommendation=rec, max_batch=max_result, throughput=throughput,
                      target=plan, noise_scale=None if b_noise is None or not math.isfinite(
                          b_noise) else b_noise, noise=noise_result, goodput=goodput,
                      seconds=time.perf_counter() - t_start, notes=notes, replicas=replicas,
                      distribute=resolved.distribute)


def _check_arguments(target: Any, tolerance: Any, noise_scale: Any, data: Any) -> None:
    """Refuse bad input now, not after minutes of probing and timing."""
    if target is not None and (not is_int(target) or target < 1):
        raise InvalidInputError(f"target batch size must be an integer >= 1, got {target!r}")
    check_tolerance(tolerance)
    if isinstance(noise_scale, str) and noise_scale != "estimate":
        raise InvalidInputError(f"noise_scale must be a number, a NoiseScaleResult or "
                                f"'estimate', got {noise_scale!r}")
    if noise_scale == "estimate" and data is None:
        raise InvalidInputError("noise_scale='estimate' needs your real data (data=...): the "
                                "gradient noise scale of synthesized inputs means nothing")
    if noise_scale is not None and noise_scale != "estimate":
        _noise_value(noise_scale)


def _resolve(model: Any, distribute: Any) -> ResolvedModel:
    """The model to time, built under the strategy (a spec or a factory is built here)."""
    resolved = resolve(model, distribute)
    if resolved.multiworker:
        from .multiworker import upstream_fit_failure, upstream_fit_works

        if not upstream_fit_works(resolved.strategy):
            raise InvalidInputError(
                "tune times Keras's own training step, which fails under "
                "MultiWorkerMirroredStrategy in this Keras (keras-team/keras issue 20585: "
                f"{upstream_fit_failure(resolved.strategy)[:160]}). Run `batchfit max "
                "--distribute multiworker` on every worker for the batch size, and train with "
                "batchfit.fit_multiworker")
    return resolve(model, resolved.strategy, build=True)


def _timing_sizes(batch_sizes: list[int] | None, max_result: MaxBatchResult, replicas: int,
                  granularity: int, notes: list[str]) -> list[int]:
    """The global sizes to time: those asked for that fit, else the grid up to the largest fit."""
    largest = max_result.max_batch_size * replicas
    safe = max_result.safe_batch_size * replicas
    sizes = list(batch_sizes) if batch_sizes is not None else []
    if any(b > largest for b in sizes):
        # Sizes that do not fit are no candidates: timed here (no cap) they would set the
        # "best" throughput that the knee and the target's cost are measured against.
        notes.append(f"not timed: {', '.join(str(b) for b in sizes if b > largest)} (above "
                     f"the largest batch that fits, {largest})")
        sizes = [b for b in sizes if b <= largest]
        if not sizes:
            notes.append("none of batch_sizes fits: timed the default grid instead")
    if not sizes:
        sizes = [b * replicas for b in geometric_grid(max_result.max_batch_size,
                                                      granularity=granularity)]
        if max_result.safe_batch_size >= granularity:
            sizes = sorted(set(sizes) | {safe})
    return sizes


def _noise(noise_scale: Any, model: Any, data: Any, seed: int,
           phase: Callable[[str], None]) -> tuple[NoiseScaleResult | None, float | None]:
    """The noise-scale result (measured here with ``"estimate"``, or given) and ``B_simple``."""
    if noise_scale is None:
        return None, None
    if noise_scale == "estimate":
        from .noise import estimate_noise_scale

        phase("noise")
        noise_scale = estimate_noise_scale(model, data, seed=seed)
    result = noise_scale if isinstance(noise_scale, NoiseScaleResult) else None
    return result, _noise_value(noise_scale)


def _facts(max_result: MaxBatchResult, measured: Sequence[ThroughputPoint], replicas: int,
           tolerance: float, granularity: int, b_noise: float | None,
           extras: dict[str, Any] | None) -> TuneFacts:
    """What the criteria judge, in global sizes (memory per device)."""
    mm = max_result.memory_model
    return TuneFacts(
        max_batch=max_result.max_batch_size * replicas,
        safe_batch=max_result.safe_batch_size * replicas,
        batch_sizes=tuple(p.batch_size for p in measured),
        throughputs=tuple(float(p.samples_per_second or 0.0) for p in measured),
        errors=tuple(p.median_error for p in measured),
        tolerance=float(tolerance), granularity=granularity * replicas,
        bytes_at=({p.batch_size: mm.predict(p.batch_size / replicas) for p in measured}
                  if mm else {}),  # per device
        extras={**({"noise_scale": b_noise} if b_noise is not None else {}), **(extras or {})})


def _noise_value(noise_scale: Any) -> float:
    """``B_simple`` from a number or a noise-scale result (``inf`` when unbounded)."""
    if isinstance(noise_scale, NoiseScaleResult):
        return math.inf if noise_scale.b_simple is None else float(noise_scale.b_simple)
    if not is_number(noise_scale) or not noise_scale > 0:
        raise InvalidInputError(f"noise_scale must be a positive number (B_simple), got "
                                f"{noise_scale!r}")
    return float(noise_scale)
