"""``find_max_batch_size``: the largest batch that fits a memory budget, found with few probes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..backend import get_backend
from ..core.confirm import DEFAULT_CONFIRMATIONS, check_confirm
from ..core.search import search_argument
from ..core.settle import PROBE_STEPS
from ..errors import InvalidInputError, NothingFitsError
from ..results import MaxBatchResult, Probe
from .maxbatch_local import search_max_batch_size, validate_search_args
from .resolve import resolve


def find_max_batch_size(
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
        search: the search policy: ``"guided"`` (memory-model guided; the default, ``None``),
            ``"binsearch"`` or ``"power"`` (PyTorch Lightning's algorithms, reproduced for
            comparison).
        granularity: only multiples of this are tried and reported (e.g. 8 for tensor cores).
        data: the user's own sample, ``(x, y)`` arrays or a ``tf.data.Dataset`` (or a
            ``"file.py:function"`` spec). Default: inputs and targets synthesized from the
            model's input specs and compiled loss.
        input_shapes: lengths for non-batch ``None`` dimensions, e.g. ``{"tokens": (128,)}``.
        upper: never try a batch larger than this (default 2**20).
        headroom: the least fraction of the budget ``safe_batch_size`` leaves free (default 0:
            the margin is sized from the band and the memory model alone, at least 3% of the
            budget; see :class:`~batchfit.results.Band`).
        steps: training steps per epoch of a probe (default
            :data:`~batchfit.core.settle.PROBE_STEPS`, 5).
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
            below the smallest failure (default ``None``: 0.05 when fresh-process
            confirmations follow, which settle the edge, else 0.02; ``0`` brackets to the
            granularity). Near the limit which sizes fit is not sharp (the same size fits in
            one process and not the next across a band 4-8% of the budget wide, measured), so
            the last probes of an exact bracket, half of them out-of-memory errors, buy little.
        strategy: deprecated alias of ``search`` (it warns, with a ``FutureWarning``, and goes
            in the next release); a ``tf.distribute`` strategy goes in ``distribute=``.
        confirm: after the search, run the answer again in this many fresh processes
            (default 3; ``0`` skips it), stepping down to a smaller size on any failure: near
            the limit the same size fits in one process and not in the next, and one probe
            draws once. ``max_batch_size`` is then the largest size that fitted every time it
            was tried; ``result.band`` also gives the sizes that fitted only sometimes and the
            smallest that never did. Needs process isolation (in-process probes are not
            confirmed, with a note). Under a multi-worker strategy each worker confirms its own.
        jit: XLA-compile the training step in the probes (``model.jit_compile = True``, set in
            the worker; the caller's model is unchanged). For an XLA step (this, or the model's
            own ``jit_compile=True``) the guided search starts at the boundary the step's
            compile-time memory predicts (:func:`batchfit.estimate_memory`'s line, compiled in
            the first worker) and real probes under the budget confirm it; a step XLA cannot
            compile is probed as it is, with a note naming the layer.

    Returns:
        A :class:`~batchfit.results.MaxBatchResult`.

    Raises:
        InvalidInputError: bad argument (unparsable size, budget <= 0, granularity < 1, a
            ``tf.distribute`` strategy passed as ``strategy=``, ...).
        ModelLoadError: the model (spec, factory) could not be loaded.
        ProbeFailedError: the model fails to train at the smallest size for a reason other
            than memory (its own error is in the message).
        NothingFitsError: even the smallest batch does not fit; states the fixed cost.

    Example:

    >>> import batchfit
    >>> from batchfit.examples.models import seed_mlp
    >>> r = batchfit.find_max_batch_size(seed_mlp, memory="64MiB")  # doctest: +SKIP
    >>> r.max_batch_size, r.band.confirmed, r.band.never              # doctest: +SKIP
    (1893, True, 1894)
    >>> r = batchfit.find_max_batch_size(seed_mlp, memory="64MiB",
    ...                                  distribute="mirrored")             # doctest: +SKIP
    >>> r.max_batch_size, r.replicas, r.global_max_batch_size               # doctest: +SKIP
    (1893, 2, 3786)
    """
    search = search_argument(search, strategy)
    validate_search_args(search, granularity, headroom, steps, upper, isolate, search_tolerance)
    confirm = check_confirm(confirm)
    resolved = resolve(model, distribute)
    if resolved.multiworker:
        if jit:
            raise InvalidInputError("jit=True is not supported under a multi-worker strategy "
                                    "yet; set jit_compile=True on the model instead")
        return _across_workers(
            model, resolved.strategy, memory, search=search, granularity=granularity, data=data,
            input_shapes=input_shapes, upper=upper, headroom=headroom, steps=steps,
            isolate=isolate, device=device, probe_timeout=probe_timeout, fresh=fresh,
            max_probes=max_probes, on_probe=on_probe, seed=seed,
            search_tolerance=search_tolerance, confirm=confirm)
    return search_max_batch_size(
        model, memory, search, granularity=granularity, data=data, input_shapes=input_shapes,
        upper=upper, headroom=headroom, steps=steps, isolate=isolate, device=device,
        probe_timeout=probe_timeout, fresh=fresh, max_probes=max_probes, on_probe=on_probe,
        seed=seed, distribute=resolved.strategy, search_tolerance=search_tolerance,
        confirm=confirm, jit=bool(jit))


def _across_workers(model: Any, dist: Any, memory: Any, **kwargs: Any) -> MaxBatchResult:
    """Under MultiWorkerMirroredStrategy: this worker's search, then the workers' agreement.

    Every worker searches its own device (probes in worker processes, outside the strategy),
    then all agree on the smallest per-replica size (see
    :func:`batchfit.verbs.multiworker.find_max_batch_size_multiworker`); the result is this
    worker's search with ``max_batch_size`` / ``safe_batch_size`` set to the agreed ones.
    """
    from .multiworker import find_max_batch_size_multiworker

    agreed = find_max_batch_size_multiworker(model, dist, memory, **kwargs)
    local = agreed.local
    if local is None:  # pragma: no cover - find_max_batch_size_multiworker raised instead
        raise NothingFitsError("nothing fits on this worker")
    own = ", ".join(f"worker {i}: {m}" for i, m in enumerate(agreed.worker_max_batch_sizes))
    replicas = get_backend().num_replicas(dist)
    note = (f"multiworker strategy, {agreed.num_workers} workers, {replicas} "
            f"replicas: each worker searched its own device ({own} per replica); all train "
            f"with the smallest, set by worker {agreed.limiting_worker}")
    notes = [*local.notes, note]
    return dataclasses.replace(
        local, max_batch_size=agreed.per_replica_batch_size,
        safe_batch_size=agreed.safe_per_replica_batch_size, replicas=agreed.num_replicas,
        distribute="multiworker", notes=notes, seconds=agreed.seconds)


