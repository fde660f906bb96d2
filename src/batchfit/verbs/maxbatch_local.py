"""The memory search on this process's devices: probes, the policy, the answer and its notes.

:mod:`batchfit.verbs.maxbatch` adds the multi-worker agreement on top; the multi-worker search
(:mod:`batchfit.verbs.multiworker`) runs this on each worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..backend import get_backend
from ..backend.memory import resolve_budget
from ..core.memory_model import fit_memory_model
from ..core.search import Trial, make_policy, run_search
from ..core.sizes import format_bytes, parse_size
from ..errors import (
    InvalidInputError,
    ModelLoadError,
    NothingFitsError,
    ProbeFailedError,
)
from ..results import MaxBatchResult, MemoryModel, Probe

STRATEGIES = ("guided", "binsearch", "power")
ISOLATION_MODES = ("auto", "process", "none")
DEFAULT_UPPER = 1 << 20
LIMIT_MARGIN = 0.02  # a fitting peak stays this fraction under the budget (see ProbeRunner)
DEFAULT_SEARCH_TOLERANCE = 0.02  # guided stops within 2% below the smallest failure
STALL_GRACE_SECONDS = 20.0  # an allocator's OOM wait (10 s) plus slack
STALL_FACTOR = 5.0


def _is_keras_model(obj: Any) -> bool:
    return hasattr(obj, "train_on_batch") and hasattr(obj, "variables")


def validate_model_arg(model: Any) -> None:
    """Refuse what is neither a model, a factory nor a spec; check a model is compiled."""
    if model is None or (not isinstance(model, str) and not callable(model)
                         and not _is_keras_model(model)):
        raise InvalidInputError(
            f"model must be a compiled keras.Model, a function returning one, or a spec "
            f"'file.py:factory' / 'package.module:factory' / 'model.keras'; got "
            f"{type(model).__name__}")
    if _is_keras_model(model):
        get_backend().check_model(model)


def validate_search_args(strategy: str, granularity: Any, headroom: Any, steps: Any, upper: Any,
                         isolate: str, search_tolerance: Any) -> None:
    """Check the search's arguments before any model is built."""
    if strategy not in STRATEGIES:
        raise InvalidInputError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise InvalidInputError(f"granularity must be an integer >= 1 (e.g. 8 for tensor cores), "
                                f"got {granularity!r}")
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise InvalidInputError(f"headroom must be a fraction in [0, 1), e.g. 0.1 for 10%, got {headroom!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps must be an integer >= 1, got {steps!r}")
    if upper is not None and (isinstance(upper, bool) or not isinstance(upper, int) or upper < granularity):
        raise InvalidInputError(f"max batch size (upper bound) must be an integer >= granularity "
                                f"({granularity}), got {upper!r}")
    if isolate not in ISOLATION_MODES:
        raise InvalidInputError(f"isolate must be one of {', '.join(ISOLATION_MODES)}, got {isolate!r}")
    if (isinstance(search_tolerance, bool) or not isinstance(search_tolerance, (int, float))
            or not 0 <= search_tolerance < 0.5):
        raise InvalidInputError(f"search_tolerance must be a fraction in [0, 0.5), e.g. 0.02 "
                                f"for 2% or 0 for an exact answer, got {search_tolerance!r}")


def _device_name(device: str | None) -> str:
    if device:
        d = device.upper()
        if d in ("CPU", "GPU"):
            d += ":0"
        if not d.startswith(("CPU:", "GPU:")):
            raise InvalidInputError(f"device must be 'CPU:0' or 'GPU:0', got {device!r}")
        return d
    return get_backend().default_device()


def search_max_batch_size(
    model: Any,
    memory: str | int | None = None,
    strategy: str = "guided",
    *,
    granularity: int = 1,
    data: Any = None,
    input_shapes: Any = None,
    upper: int | None = None,
    headroom: float = 0.1,
    steps: int = 3,
    isolate: str = "auto",
    device: str | None = None,
    probe_timeout: float = 600.0,
    fresh: bool = True,
    max_probes: int = 60,
    on_probe: Callable[[Probe], None] | None = None,
    seed: int = 0,
    distribute: Any = None,
    search_tolerance: float = DEFAULT_SEARCH_TOLERANCE,
) -> MaxBatchResult:
    """The search on this process's devices: :func:`batchfit.find_max_batch_size` without the
    multi-worker agreement (``distribute`` may be a single-process strategy). Arguments and
    result as there.
    """
    t_start = time.perf_counter()
    validate_search_args(strategy, granularity, headroom, steps, upper, isolate,
                         search_tolerance)
    validate_model_arg(model)
    dist: Any = None
    if distribute is not None or _is_keras_model(model):
        from ..backend.tensorflow.distribute import resolve_strategy

        dist = resolve_strategy(distribute, model if _is_keras_model(model) else None)
    if dist is not None:
        from ..backend.tensorflow.distribute import (
            distribute_name,
            num_replicas,
            probe_device,
            smallest_device_memory,
        )

        replicas, dist_name = num_replicas(dist), distribute_name(dist)
        dev = _device_name(device) if device else probe_device(dist)
        if memory is None:
            budget, strategy_note = smallest_device_memory(dist)
            budget_source = "device"
        else:
            budget, budget_source, strategy_note = parse_size(memory), "user", ""
        notes = [strategy_note] if strategy_note else []
        notes.append(f"{dist_name} strategy, {replicas} replica(s): memory probed per replica "
                     f"on one device; the global batch is per replica x {replicas}")
    else:
        replicas, dist_name = 1, ""
        dev = _device_name(device)
        budget, budget_source, budget_note = resolve_budget(memory, dev)
        notes = [budget_note] if budget_note else []
    upper = upper if upper is not None else DEFAULT_UPPER

    mode = isolate
    if mode == "auto":
        mode = "process" if (dev.startswith("CPU") or not _is_keras_model(model)) else "none"
    runner: Any = None
    worker: Any = None
    info: dict[str, Any] = {}
    if mode == "process":
        worker, info, fallback_note = _start_worker(model, data, input_shapes, steps, dev, budget,
                                                    seed, probe_timeout, fresh,
                                                    explicit=isolate == "process")
        if worker is None:
            mode = "none"
            notes.append(fallback_note)
    if mode == "none" and replicas > 1 and _is_keras_model(model):
        raise InvalidInputError(
            "a model built under a distribution strategy cannot be probed per replica in this "
            "process; pass a module-level factory or a spec ('file.py:factory') so each probe "
            "builds it on one device in a worker process")
    if mode == "none":
        runner, info = _in_process_runner(model, data, input_shapes, steps, dev, budget, seed)
        if budget is not None and dev.startswith("CPU"):
            notes.append("in-process probes: the budget is compared with measured peaks, "
                         "not enforced by the allocator (fragmentation is not accounted)")
    notes.extend(info.get("notes", []))

    policy = make_policy(strategy, budget_bytes=budget, granularity=granularity, upper=upper,
                         saturation=LIMIT_MARGIN, tolerance=float(search_tolerance))
    probes: list[Probe] = []

    def trial(b: int) -> Trial:
        p = (worker.probe(b, timeout=_stall_timeout(probes, b, probe_timeout))
             if worker is not None else runner.run(b))
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        if p.outcome == "refused" and not any(q.fits for q in probes) and len(probes) == 1:
            raise ProbeFailedError(
                f"the model does not train at batch size {b}, for a reason other than memory: "
                f"{p.detail}. Fix the model (or its inputs: pass data= / input_shapes=) and retry.")
        return Trial(batch_size=b, fits=p.fits, peak_bytes=p.peak_bytes)

    try:
        trials = run_search(policy, trial, max_probes=max_probes)
    finally:
        if worker is not None:
            worker.close()

    best = policy.best(trials)
    mem_model = _fit(probes)
    state = info.get("state_bytes")
    if best <= 0:
        smallest = min((p.batch_size for p in probes), default=granularity)
        fixed = mem_model.fixed_bytes if mem_model else state
        parts = [f"nothing fits: even batch {smallest} does not fit"]
        if budget is not None:
            parts.append(f"in {format_bytes(budget)}")
        msg = " ".join(parts) + "."
        if state is not None:
            msg += (f" The model's weights, optimizer state and metrics alone take "
                    f"{format_bytes(state)}")
            msg += f" ({state / budget:.0%} of the budget)." if budget else "."
        msg += (" Use a larger budget, a smaller model, mixed precision, or an optimizer with "
                "less state (Adam keeps two extra copies of the weights, SGD none).")
        raise NothingFitsError(msg, fixed_bytes=fixed, budget_bytes=budget)

    if not any(p.peak_bytes is not None for p in probes):
        notes.append("the allocator kept no statistics, so no peaks were measured (on CPU, "
                     "set TF_CPU_ALLOCATOR_USE_BFC=true before importing TensorFlow)")
    safe, safe_note = _safe_size(best, mem_model, budget, headroom, granularity,
                                 min(p.batch_size for p in probes if p.fits))
    if safe_note:
        notes.append(safe_note)
    bad = [p for p in probes if p.outcome in ("crashed", "timeout")]
    if bad:
        notes.append(f"{len(bad)} probe(s) killed the worker ({bad[0].detail[:120]}); "
                     f"treated as not fitting, the search went on")
    return MaxBatchResult(
        max_batch_size=best, safe_batch_size=safe, headroom=headroom,
        memory_budget_bytes=budget, budget_source=budget_source, device=dev,
        isolation="process" if mode == "process" else "in-process", strategy=strategy,
        granularity=granularity, upper_bound=upper, bracketed=policy.bracketed(trials),
        memory_model=mem_model, probes=probes, seconds=time.perf_counter() - t_start,
        model_name=str(info.get("model_name", "")), notes=notes,
        environment=dict(info.get("environment", {})), replicas=replicas,
        distribute=dist_name,
        search_tolerance=float(search_tolerance) if strategy == "guided" else 0.0)


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


def _fit(probes: list[Probe]) -> MemoryModel | None:
    pts: dict[int, float] = {}
    for p in probes:
        if p.fits and p.peak_bytes is not None:
            pts[p.batch_size] = float(p.peak_bytes)
    if len(pts) < 2:
        return None
    return fit_memory_model(sorted(pts.items()))


def _safe_size(best: int, model: MemoryModel | None, budget: int | None, headroom: float,
               granularity: int, smallest_fit: int) -> tuple[int, str]:
    if model is not None and budget is not None and model.per_sample_bytes > 0:
        safe = min(best, model.max_batch(budget * (1 - headroom), granularity))
    else:
        safe = (int(best * (1 - headroom)) // granularity) * granularity
    if safe < smallest_fit:
        return smallest_fit, (f"no batch leaves {headroom:.0%} of the budget free; "
                              f"safe_batch_size is the smallest that fits")
    return safe, ""


def _start_worker(model: Any, data: Any, input_shapes: Any, steps: int, device: str,
                  budget: int | None, seed: int, probe_timeout: float, fresh: bool, *,
                  explicit: bool) -> tuple[Any, dict[str, Any], str]:
    from ..workers.worker import ModelSource, ProbeWorker, WorkerConfig

    try:
        source = ModelSource.from_model(model)
    except Exception as exc:
        why = (f"the model cannot be sent to a worker process ({type(exc).__name__}: "
               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")
        if explicit:
            raise InvalidInputError(why + "; pass a module-level factory function instead of the "
                                          "model object, or isolate='none'") from exc
        return None, {}, why + "; probed in this process instead"
    payload = data
    if data is not None and not isinstance(data, str):
        payload = get_backend().data_sample(data)
    worker = ProbeWorker(WorkerConfig(source=source, data=payload, input_shapes=input_shapes,
                                      steps=steps, device=device, budget_bytes=budget, seed=seed),
                         probe_timeout=probe_timeout, fresh_each_probe=fresh)
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


def _in_process_runner(model: Any, data: Any, input_shapes: Any, steps: int, device: str,
                       budget: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    backend = get_backend()
    if isinstance(model, str):
        model = backend.load_model(model)
    elif not backend.is_model(model):
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
