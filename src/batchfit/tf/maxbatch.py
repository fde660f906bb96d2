"""``find_max_batch_size``: the largest batch that fits a memory budget, found with few probes."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

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
HOST_RESERVE_BYTES = 1 << 30  # left to the OS and this process when the budget is "all of RAM"
LIMIT_MARGIN = 0.02  # a fitting peak stays this fraction under the budget (see ProbeRunner)
DEFAULT_SEARCH_TOLERANCE = 0.02  # guided stops within 2% below the smallest failure
STALL_GRACE_SECONDS = 20.0  # an allocator's OOM wait (10 s) plus slack
STALL_FACTOR = 5.0


def host_available_bytes() -> int | None:
    """Memory the kernel says is available for new allocations (``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_total_bytes(index: int = 0) -> tuple[int | None, str]:
    """``(total bytes, name)`` of a GPU through NVML (``nvidia-ml-py``), ``(None, "")`` without it."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None, ""
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or driver mismatch: unknown, not fatal
        return None, ""


def _is_keras_model(obj: Any) -> bool:
    return hasattr(obj, "train_on_batch") and hasattr(obj, "variables")


def _validate(strategy: str, granularity: Any, headroom: Any, steps: Any, upper: Any,
              isolate: str) -> None:
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


def resolve_budget(memory: Any, device: str) -> tuple[int | None, str, str]:
    """``(budget bytes or None, source, note)`` for a ``memory=`` argument on ``device``."""
    if memory is not None:
        return parse_size(memory), "user", ""
    if device.upper().startswith("GPU"):
        total, _ = gpu_total_bytes()
        if total is None:
            return None, "device", ("GPU total memory unknown (install nvidia-ml-py to read it): "
                                    "the search runs until the device refuses")
        return total, "device", ""
    avail = host_available_bytes()
    if avail is None:
        raise InvalidInputError("cannot read this machine's available memory; pass memory= "
                                "(e.g. memory='8GiB')")
    budget = max(avail - HOST_RESERVE_BYTES, avail // 2)
    return budget, "device", (f"CPU: budget is this machine's available memory less a reserve "
                              f"({format_bytes(budget)})")


def _device_name(device: str | None) -> str:
    if device:
        d = device.upper()
        if d in ("CPU", "GPU"):
            d += ":0"
        if not d.startswith(("CPU:", "GPU:")):
            raise InvalidInputError(f"device must be 'CPU:0' or 'GPU:0', got {device!r}")
        return d
    import tensorflow as tf

    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


def find_max_batch_size(
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
    """Find the largest batch size that trains within a memory budget.

    Each probe runs ``steps`` real training steps of the model (its optimizer, loss and layers)
    at one batch size and reads the allocator's peak. With a budget on CPU the probes run in an
    isolated worker process whose TensorFlow allocator is capped at the budget, so "does not fit"
    is a real ``ResourceExhaustedError``, as on a GPU of that size; a probe that crashes the
    worker is reported and the search goes on. The caller's model is never changed.

    Args:
        model: a compiled ``keras.Model``, a zero-argument function returning one (needed for
            process isolation when the model cannot be pickled), or a spec string
            (``"file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``).
        memory: the budget: ``"16GiB"``, ``"512MiB"``, bytes as an int; default: the device's
            own memory (a GPU's total; on CPU the available RAM less a reserve).
        strategy: ``"guided"`` (memory-model guided, default), ``"binsearch"`` or ``"power"``
            (PyTorch Lightning's algorithms, reproduced for comparison).
        granularity: only multiples of this are tried and reported (e.g. 8 for tensor cores).
        data: the user's own sample, ``(x, y)`` arrays or a ``tf.data.Dataset`` (or a
            ``"file.py:function"`` spec). Default: inputs and targets synthesized from the
            model's input specs and compiled loss.
        input_shapes: lengths for non-batch ``None`` dimensions, e.g. ``{"tokens": (128,)}``.
        upper: never try a batch larger than this (default 2**20).
        headroom: fraction of the budget ``safe_batch_size`` leaves free (default 0.1).
        steps: training steps per probe (default 3).
        isolate: ``"process"`` (worker process, budget enforced), ``"none"`` (this process;
            a budget is checked against measured peaks), or ``"auto"`` (process on CPU and for
            spec strings; in-process for a model object on a GPU this process already holds).
        device: ``"CPU:0"`` or ``"GPU:0"``; default: the GPU if TensorFlow sees one.
        probe_timeout: seconds one probe may take before its worker is killed.
        fresh: with process isolation, run every probe in a new process (default ``True``), as
            training starts in one: which sizes fit a capped allocator depends on what ran
            before in the same process (measured). ``False`` reuses one worker (faster,
            history-dependent near the limit).
        max_probes: hard cap on the number of probes.
        on_probe: called with each :class:`~batchfit.results.Probe` as it completes.
        seed: seed for synthesized data.
        distribute: a ``tf.distribute.Strategy``, ``"mirrored"``, ``"multiworker"``, or
            ``None`` (default: the strategy a model object was built under, if any). Under a
            strategy memory is probed per replica, on one device with the memory of the
            smallest replica device (``memory=`` then means one device's memory), and the
            result also gives the global sizes (``global_max_batch_size``: per replica x
            replicas), which is what ``model.fit`` takes.
        search_tolerance: ``"guided"`` stops once the largest fit is within this fraction
            below the smallest failure (default 0.02; ``0`` brackets to the granularity).
            Near the limit which sizes fit is not sharp (1-3% between processes, measured),
            so the last probes of an exact bracket cost ~10 s each and buy little.

    Returns:
        A :class:`~batchfit.results.MaxBatchResult`.

    Raises:
        InvalidInputError: bad argument (unparsable size, budget <= 0, granularity < 1, ...).
        ModelLoadError: the model (spec, factory) could not be loaded.
        ProbeFailedError: the model fails to train at the smallest size for a reason other
            than memory (its own error is in the message).
        NothingFitsError: even the smallest batch does not fit; states the fixed cost.

    Example:

    >>> import batchfit
    >>> from batchfit.examples.models import seed_mlp
    >>> r = batchfit.find_max_batch_size(seed_mlp, memory="64MiB")  # doctest: +SKIP
    >>> r.max_batch_size, len(r.probes)                               # doctest: +SKIP
    (1893, 5)
    >>> r = batchfit.find_max_batch_size(seed_mlp, memory="64MiB",
    ...                                  distribute="mirrored")             # doctest: +SKIP
    >>> r.max_batch_size, r.replicas, r.global_max_batch_size               # doctest: +SKIP
    (1893, 2, 3786)
    """
    t_start = time.perf_counter()
    _validate(strategy, granularity, headroom, steps, upper, isolate)
    if (isinstance(search_tolerance, bool) or not isinstance(search_tolerance, (int, float))
            or not 0 <= search_tolerance < 0.5):
        raise InvalidInputError(f"search_tolerance must be a fraction in [0, 0.5), e.g. 0.02 "
                                f"for 2% or 0 for an exact answer, got {search_tolerance!r}")
    if model is None or (not isinstance(model, str) and not callable(model)
                         and not _is_keras_model(model)):
        raise InvalidInputError(
            f"model must be a compiled keras.Model, a function returning one, or a spec "
            f"'file.py:factory' / 'package.module:factory' / 'model.keras'; got {type(model).__name__}")
    if _is_keras_model(model):
        from .loader import check_model
        check_model(model)
    dist: Any = None
    if distribute is not None or _is_keras_model(model):
        from .distribute import resolve_strategy

        dist = resolve_strategy(distribute, model if _is_keras_model(model) else None)
    if dist is not None:
        from .distribute import is_multiworker

        if is_multiworker(dist):
            return _across_workers(
                model, dist, memory, search=strategy, granularity=granularity, data=data,
                input_shapes=input_shapes, upper=upper, headroom=headroom, steps=steps,
                isolate=isolate, device=device, probe_timeout=probe_timeout, fresh=fresh,
                max_probes=max_probes, on_probe=on_probe, seed=seed,
                search_tolerance=search_tolerance)
        from .distribute import (
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


def _across_workers(model: Any, dist: Any, memory: Any, **kwargs: Any) -> MaxBatchResult:
    """Under MultiWorkerMirroredStrategy: this worker's search, then the workers' agreement.

    Every worker searches its own device (probes in worker processes, outside the strategy),
    then all agree on the smallest per-replica size (see
    :func:`batchfit.tf.multiworker.find_max_batch_size_multiworker`); the result is this
    worker's search with ``max_batch_size`` / ``safe_batch_size`` set to the agreed ones.
    """
    from .distribute import num_replicas
    from .multiworker import find_max_batch_size_multiworker

    agreed = find_max_batch_size_multiworker(model, dist, memory, **kwargs)
    local = agreed.local
    if local is None:  # pragma: no cover - find_max_batch_size_multiworker raised instead
        raise NothingFitsError("nothing fits on this worker")
    own = ", ".join(f"worker {i}: {m}" for i, m in enumerate(agreed.worker_max_batch_sizes))
    note = (f"multiworker strategy, {agreed.num_workers} workers, {num_replicas(dist)} "
            f"replicas: each worker searched its own device ({own} per replica); all train "
            f"with the smallest, set by worker {agreed.limiting_worker}")
    notes = [*local.notes, note]
    return dataclasses.replace(
        local, max_batch_size=agreed.per_replica_batch_size,
        safe_batch_size=agreed.safe_per_replica_batch_size, replicas=agreed.num_replicas,
        distribute="multiworker", notes=notes, seconds=agreed.seconds)


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
    from .worker import ModelSource, ProbeWorker, WorkerConfig

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
        from .data import DataSample
        payload = DataSample.from_data(data)
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
    from .loader import check_model, load_model
    from .probe import ProbeRunner, state_bytes
    from .worker import environment_info, make_batch_fn

    if isinstance(model, str):
        model = load_model(model)
    elif not _is_keras_model(model):
        try:
            built = model()
        except Exception as exc:
            raise ModelLoadError(f"the model factory raised {type(exc).__name__}: {exc}") from exc
        check_model(built)
        model = built
    batch_fn, notes = make_batch_fn(model, data, input_shapes, seed)
    runner = ProbeRunner(model, batch_fn, steps=steps, device=device, budget_bytes=budget,
                         limit_margin=LIMIT_MARGIN)
    runner.warm_up()
    return runner, {"model_name": model.name, "state_bytes": state_bytes(model), "notes": notes,
                    "environment": environment_info()}
