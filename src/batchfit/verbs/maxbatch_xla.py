"""``max`` on an XLA-compiled training step: the compile-time memory leads the search.

When the step is XLA-compiled (the model's ``jit_compile=True``, or ``jit=True`` / ``--jit``),
the first probe worker compiles the step at a few sizes before any step runs
(:func:`batchfit.workers.child.prepare_xla`, through
:meth:`~batchfit.backend.Backend.compiled_step_memory`): the parent imports no framework. The
sizes give a line (:mod:`batchfit.core.estimate`); the guided search starts at the boundary it
predicts under the probes' margin, and keeps the line's slope while the probes correct its
intercept (:class:`~batchfit.core.search.GuidedPolicy`'s ``prior``). Real probes under the real
budget decide the answer, and the confirmations in fresh processes follow as for any search.

A step XLA cannot compile (a ``tf.py_function``, a layer with ``supports_jit=False``) leaves the
model's own step in place, probed without a prediction; a note names the layer.

Example:

>>> xla_worker_config("guided", 64 << 20, jit=True)
{'jit_compile': True, 'compile_sizes': (16, 64)}
>>> xla_worker_config("binsearch", 64 << 20, jit=False)
{'jit_compile': False, 'compile_sizes': ()}
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.estimate import TEMPORARIES_ROOM, fit_line, guided_start
from ..core.sizes import format_bytes
from ..results.estimate import CompiledStepMemory

#: The sizes the first worker compiles (then one more at the answer they predict).
COMPILE_SIZES = (16, 64)
#: What the worker compiles for a search that does not use the line: one small size, to find
#: out whether XLA can compile the step at all before a probe fails on it.
CHECK_SIZES = (8,)


def xla_worker_config(search: str, budget: int | None, *, jit: bool) -> dict[str, Any]:
    """The :class:`~batchfit.workers.worker.WorkerConfig` fields of the first probe worker."""
    if search == "guided" and budget is not None:
        sizes: tuple[int, ...] = COMPILE_SIZES
    else:
        sizes = CHECK_SIZES if jit else ()
    return {"jit_compile": bool(jit), "compile_sizes": sizes}


#: How long an XLA step's probe may sit quiet inside a step before it counts as waiting on
#: memory (the non-XLA steps': 1 s). Measured (session 17, ``bench/bench_xla_quiet.py``: the
#: worker watching without stopping, ``max --jit`` on the example CNN under 128 MiB, the
#: Transformer under 64 MiB and demo_model under 96 MiB): 21 of 21 probes that ran (20 fits, one
#: ``at_limit``) were never quiet inside a step; the two out of memory sat quiet 9.9 s
#: (TensorFlow's wait) before they failed.
XLA_STALL_SECONDS = 3.0


def settle_worker(worker: Any, info: dict[str, Any], *, jit: bool) -> None:
    """After the first worker reported: later processes compile nothing, and XLA-compile the
    step only where it compiled; the process that compiled is not probed in (its allocator
    and caches would differ from a fresh training process's). The stall watch waits
    :data:`XLA_STALL_SECONDS` for an XLA step (off until session 17: measured on the CPU
    then, demo_model under 96 MiB, an XLA step's worker sat quiet for a second in its warm-up
    at batch 1, which is not watched, and at sizes that fit). Nor does an XLA step reuse a
    process for the next, larger fit (see :class:`~batchfit.workers.worker.ProbeWorker`'s
    ``reuse_fits``): every size runs in a fresh process."""
    if worker is None:
        return
    if info.get("step_jit"):
        if worker.stall_seconds is not None:
            worker.stall_seconds = max(worker.stall_seconds, XLA_STALL_SECONDS)
        # Every size in a fresh process: the example CNN at 128 MiB fitted 43 in a process
        # that had run 41 and 42, and ran out of memory at 43 in every fresh one (10 of 10).
        worker.reuse_fits = False
    if not worker.config.compile_sizes:
        return
    worker.config = dataclasses.replace(
        worker.config, compile_sizes=(), jit_compile=bool(jit and info.get("step_jit")))
    if info.get("step_jit") or jit:
        worker.kill()


@dataclasses.dataclass(frozen=True)
class XlaPrior:
    """What the compile-time line gives the search: where it starts, what must fit, and what
    a probe's peak will read."""

    start: int                       # the first size to probe: the predicted boundary
    need: tuple[float, float]        # (fixed, per sample): what must fit in the budget
    peak: tuple[float, float]        # (fixed, per sample): what a probe's peak reads
    sizes: tuple[int, ...]




def xla_prior(info: dict[str, Any], budget: int | None, granularity: int, upper: int,
              margin: float, steps: int, notes: list[str]) -> XlaPrior | None:
    """The lines from the first worker's compiled sizes, and where the search starts (a note
    says so); ``None`` without two compiled sizes or a budget, or with a line that does not
    grow.

    What a probe's peak reads: XLA's total (variables, one batch, temporaries, outputs) plus
    the ``steps`` batches a probe holds. What must fit: that, with the temporaries counted
    :data:`TEMPORARIES_ROOM` times.
    """
    compiled = [CompiledStepMemory.from_dict(d) for d in info.get("compiled") or []]
    if budget is None or len({m.batch_size for m in compiled}) < 2:
        return None
    peak = fit_line([(m.batch_size, m.total_bytes + steps * m.inputs) for m in compiled])
    need = fit_line([(m.batch_size, m.total_bytes + steps * m.inputs
                      + (TEMPORARIES_ROOM - 1) * m.temporaries) for m in compiled])
    if not (peak.per_sample_bytes > 0 and need.per_sample_bytes > 0):
        return None
    start = min(guided_start(need, budget, margin=margin, granularity=granularity),
                (upper // granularity) * granularity)
    plain = guided_start(fit_line([(m.batch_size, m.total_bytes) for m in compiled]), budget,
                         margin=margin, granularity=granularity)
    sizes = tuple(m.batch_size for m in compiled)
    seconds = sum(m.compile_seconds or 0.0 for m in compiled)
    notes.append(
        f"XLA step: its compile-time memory at {', '.join(map(str, sizes))} ({seconds:.1f} s "
        f"of compiling, nothing run) predicted {start} under the probes' margin ({plain} from "
        f"XLA's total alone; the temporaries counted {TEMPORARIES_ROOM} times, as measured on "
        f"TensorFlow's allocator; {format_bytes(max(0.0, need.fixed_bytes))} + "
        f"{format_bytes(need.per_sample_bytes)} per sample); the search started there, real "
        f"probes under the budget decided")
    return XlaPrior(start=start, need=(need.fixed_bytes, need.per_sample_bytes),
                    peak=(peak.fixed_bytes, peak.per_sample_bytes), sizes=sizes)


__all__ = [
    "CHECK_SIZES",
    "COMPILE_SIZES",
    "XLA_STALL_SECONDS",
    "XlaPrior",
    "settle_worker",
    "xla_prior",
    "xla_worker_config",
]
