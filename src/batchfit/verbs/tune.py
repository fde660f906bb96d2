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
from ..core.throughput import geometric_grid
from ..errors import InvalidInputError
from ..results import (
    MaxBatchResult,
    NoiseScaleResult,
    Probe,
    ThroughputPoint,
    TuneResult,
)
from .throughput import (
    DEFAULT_TARGET_ERROR,
    DEFAULT_WINDOW_SECONDS,
    DEFAULT_WINDOWS,
    check_sizes,
    profile_throughput,
    resolve_model,
    validate_timing,
)


def tune(
    model: Any,
    memory: str | int | None = None,
    data: Any = None,
    *,
    strategy: str = "guided",
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
        strategy: the memory search (``"guided"``, ``"binsearch"``, ``"power"``).
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
    if target is not None and (isinstance(target, bool) or not isinstance(target, int)
                               or target < 1):
        raise InvalidInputError(f"target batch size must be an integer >= 1, got {target!r}")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise InvalidInputError(f"tolerance must be a fraction in [0, 1), e.g. 0.05, got {tolerance!r}")
    phase = on_phase or (lambda _label: None)
    if isinstance(noise_scale, str) and noise_scale != "estimate":
        raise InvalidInputError(f"noise_scale must be a number, a NoiseScaleResult or "
                                f"'estimate', got {noise_scale!r}")
    if noise_scale == "estimate" and data is None:
        raise InvalidInputError("noise_scale='estimate' needs your real data (data=...): the "
                                "gradient noise scale of synthesized inputs means nothing")
    # Refuse bad input now, not after minutes of probing and timing.
    if noise_scale is not None and noise_scale != "estimate":
        _noise_value(noise_scale)
    validate_timing(window_seconds, windows, max_windows, target_error, tolerance)
    if batch_sizes is not None:
        batch_sizes = check_sizes(batch_sizes)  # sorted, each once (an iterator is read once)
    # Load once here: the memory search needs the spec (its worker rebuilds the model), the
    # throughput measurement needs the model itself.
    is_factory = callable(model) and not hasattr(model, "train_on_batch")
    dist: Any = None
    if distribute is not None or not (isinstance(model, str) or is_factory):
        from ..backend.tensorflow.distribute import resolve_strategy

        dist = resolve_strategy(
            distribute, None if (isinstance(model, str) or is_factory) else model)
    if dist is not None:
        from ..backend.tensorflow.distribute import is_multiworker

        if is_multiworker(dist):
            from .multiworker import upstream_fit_failure, upstream_fit_works

            if not upstream_fit_works(dist):
                raise InvalidInputError(
                    "tune times Keras's own training step, which fails under "
                    "MultiWorkerMirroredStrategy in this Keras (keras-team/keras issue 20585: "
                    f"{upstream_fit_failure(dist)[:160]}). Run `batchfit max --distribute "
                    "multiworker` on every worker for the batch size, and train with "
                    "batchfit.fit_multiworker")
    if dist is not None and (isinstance(model, str) or is_factory):
        with dist.scope():  # throughput is timed with the model under the strategy
            model_obj = resolve_model(model)
    else:
        model_obj = resolve_model(model)
    search_model = model if (isinstance(model, str) or is_factory) else model_obj
    replicas, dist_name = 1, ""
    if dist is not None:
        from ..backend.tensorflow.distribute import distribute_name, num_replicas

        replicas, dist_name = num_replicas(dist), distribute_name(dist)

    from .maxbatch import find_max_batch_size

    phase("memory")
    max_result: MaxBatchResult = find_max_batch_size(
        search_model, memory=memory, strategy=strategy, granularity=granularity, data=data,
        input_shapes=input_shapes, upper=upper, headroom=headroom, isolate=isolate,
        device=device, seed=seed, on_probe=on_probe, distribute=dist,
        search_tolerance=search_tolerance)
    # From here on sizes are global (per replica x replicas): what fit takes.
    largest = max_result.max_batch_size * replicas
    safe = max_result.safe_batch_size * replicas
    notes: list[str] = []
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

    phase("throughput")
    throughput = profile_throughput(
        model_obj, sizes, data=data, input_shapes=input_shapes, window_seconds=window_seconds,
        windows=windows, max_windows=max_windows, target_error=target_error,
        tolerance=tolerance, device=device, seed=seed, on_point=on_point)

    noise_result = None
    b_noise: float | None = None
    if noise_scale is not None:
        if noise_scale == "estimate":
            from .noise import estimate_noise_scale

            phase("noise")
            noise_result = estimate_noise_scale(model_obj, data, seed=seed)
            noise_scale = noise_result
        b_noise = _noise_value(noise_scale)

    measured = throughput.measured()
    mm = max_result.memory_model
    facts = TuneFacts(
        max_batch=largest, safe_batch=safe,
        batch_sizes=tuple(p.batch_size for p in measured),
        throughputs=tuple(float(p.samples_per_second or 0.0) for p in measured),
        tolerance=float(tolerance), granularity=granularity * replicas,
        bytes_at=({p.batch_size: mm.predict(p.batch_size / replicas) for p in measured}
                  if mm else {}),  # per device
        extras={**({"noise_scale": b_noise} if b_noise is not None else {}), **(extras or {})})
    rec = recommend(facts, list(criteria) if criteria is not None else default_criteria())
    plan = plan_target(target, facts) if target is not None else None
    if replicas > 1:
        notes.append(f"{dist_name} strategy, {replicas} replicas: sizes are global batches "
                     f"(per replica x {replicas}); memory was searched per replica, "
                     "throughput timed with the model under the strategy")
    if replicas == 1 and throughput.device != max_result.device.split(" ")[0]:
        notes.append(f"memory probed on {max_result.device}, throughput timed on "
                     f"{throughput.device}")
    goodput: list[float] = []
    if b_noise is not None and measured:
        from ..core.noise import goodput_optimal_batch

        choice = goodput_optimal_batch(facts.batch_sizes, facts.throughputs, b_noise)
        goodput = list(choice.goodput)
    if isinstance(noise_scale, NoiseScaleResult) and noise_result is None:
        noise_result = noise_scale
    return TuneResult(recommendation=rec, max_batch=max_result, throughput=throughput,
                      target=plan, noise_scale=None if b_noise is None or not math.isfinite(
                          b_noise) else b_noise, noise=noise_result, goodput=goodput,
                      seconds=time.perf_counter() - t_start, notes=notes, replicas=replicas,
                      distribute=dist_name)


def _noise_value(noise_scale: Any) -> float:
    """``B_simple`` from a number or a noise-scale result (``inf`` when unbounded)."""
    if isinstance(noise_scale, NoiseScaleResult):
        return math.inf if noise_scale.b_simple is None else float(noise_scale.b_simple)
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not (
            noise_scale > 0):
        raise InvalidInputError(f"noise_scale must be a positive number (B_simple), got "
                                f"{noise_scale!r}")
    return float(noise_scale)
