"""Ground truth: probes in fresh processes, and an exhaustive bisection made of them.

Every probe here runs in a new process, so no state (allocator fragmentation, cached kernels,
a previous OOM) carries over; on Linux, for the CPU, the process is forked from a server that
has imported TensorFlow once (see :class:`batchfit.workers.worker.ProbeWorker`), elsewhere started
by ``exec``. Meant for verifying answers: tests and benchmarks compare every search policy with
:func:`exhaustive_max`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..core.search import BinsearchPolicy, Trial, run_search
from ..core.settle import PROBE_STEPS
from ..core.sizes import parse_size
from ..results import Probe
from ..workers.worker import ModelSource, ProbeWorker, WorkerConfig


def _config(model: Any, memory: str | int, *, data: Any, input_shapes: Any, steps: int,
            device: str, seed: int, jit: bool = False) -> WorkerConfig:
    """The worker configuration every fresh-process probe of this module uses."""
    return WorkerConfig(source=ModelSource.from_model(model), data=data,
                        input_shapes=input_shapes, steps=steps, device=device,
                        budget_bytes=parse_size(memory), seed=seed, jit_compile=jit)


def _stall(jit: bool) -> dict[str, Any]:
    """An XLA step's probes wait out TensorFlow's 10 s (the stall watch misreads them)."""
    return {"stall_seconds": 0.0} if jit else {}


def fresh_probe(model: Any, batch_size: int, memory: str | int, *, steps: int = PROBE_STEPS,
                data: Any = None, input_shapes: Any = None, device: str = "CPU:0",
                seed: int = 0, probe_timeout: float = 600.0) -> Probe:
    """Run one probe in a brand-new worker process under ``memory`` and return it.

    Args:
        model: a spec string or a picklable zero-argument factory (see
            :func:`batchfit.find_max_batch_size`).
        batch_size: the size to try.
        memory: the budget (``"256MiB"`` or bytes).

    Example:

    >>> fresh_probe("batchfit.examples.models:seed_mlp", 64, "256MiB").fits  # doctest: +SKIP
    True
    """
    config = _config(model, memory, data=data, input_shapes=input_shapes, steps=steps,
                     device=device, seed=seed)
    with ProbeWorker(config, probe_timeout=probe_timeout) as worker:
        return worker.probe(batch_size)


def exhaustive_max(model: Any, memory: str | int, *, granularity: int = 1,
                   upper: int = 1 << 20, on_probe: Callable[[Probe], None] | None = None,
                   steps: int = PROBE_STEPS, data: Any = None, input_shapes: Any = None,
                   device: str = "CPU:0", seed: int = 0,
                   probe_timeout: float = 600.0, jit: bool = False
                   ) -> tuple[int, list[Probe], float]:
    """The largest fitting batch by doubling then bisection, every probe in a fresh process.

    The search is :class:`~batchfit.core.search.BinsearchPolicy` (Lightning's algorithm)
    starting at ``granularity`` instead of 2, with no limit on the number of probes.

    ``jit=True`` XLA-compiles the training step in every probe (as ``max --jit``).

    Returns:
        ``(largest fitting size or 0, probes, seconds)``. The bisection runs to the exact
        size (to ``granularity``): it stops only when ``hi - lo == granularity``.
    """
    t0 = time.perf_counter()
    probes: list[Probe] = []
    config = _config(model, memory, data=data, input_shapes=input_shapes, steps=steps,
                     device=device, seed=seed, jit=jit)
    # Lightning's doubling-then-bisection from one granule, with no cap on the probes: the
    # same policy as search="binsearch" (which starts at 2), run to the exact size.
    policy = BinsearchPolicy(init=granularity, max_trials=1 << 30, upper=upper,
                             granularity=granularity)
    with ProbeWorker(config, probe_timeout=probe_timeout, fresh_each_probe=True,
                     **_stall(jit)) as worker:

        def trial(b: int) -> Trial:
            p = worker.probe(b)
            probes.append(p)
            if on_probe is not None:
                on_probe(p)
            return Trial(batch_size=b, fits=p.fits, peak_bytes=p.peak_bytes)

        history = run_search(policy, trial, max_probes=1 << 30)
    return policy.best(history), probes, time.perf_counter() - t0


def fit_rates(model: Any, memory: str | int, sizes: list[int], *, repeats: int = 3,
              steps: int = PROBE_STEPS, data: Any = None, input_shapes: Any = None,
              device: str = "CPU:0", seed: int = 0, probe_timeout: float = 600.0,
              on_probe: Callable[[Probe], None] | None = None,
              jit: bool = False) -> dict[int, list[Probe]]:
    """Probe each size ``repeats`` times, each probe in a fresh process: how sharp is the limit?

    Near a capped allocator's limit whether a size fits is not a property of the size alone
    (which free chunk each tensor lands in depends on the order ops ran and freed memory).
    Rounds go over all sizes in turn (size 1..n, then again), so a drift of the machine
    touches every size alike.

    Returns:
        ``{size: [probe, ...]}``; ``sum(p.fits for p in probes) / len(probes)`` is the rate.

    Example:

    >>> r = fit_rates("batchfit.examples.models:cnn", "128MiB", [200, 220])  # doctest: +SKIP
    >>> {b: sum(p.fits for p in ps) for b, ps in r.items()}                 # doctest: +SKIP
    {200: 3, 220: 1}
    """
    if repeats < 1 or not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"need repeats >= 1 and positive sizes, got {repeats}, {sizes}")
    config = _config(model, memory, data=data, input_shapes=input_shapes, steps=steps,
                     device=device, seed=seed, jit=jit)
    out: dict[int, list[Probe]] = {b: [] for b in sizes}
    with ProbeWorker(config, probe_timeout=probe_timeout, fresh_each_probe=True,
                     **_stall(jit)) as worker:
        for _ in range(repeats):
            for b in sizes:
                probe = worker.probe(b)
                out[b].append(probe)
                if on_probe is not None:
                    on_probe(probe)
    return out
