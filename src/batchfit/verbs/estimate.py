"""``batchfit.estimate_memory``: the memory of a training step from its compilation, nothing run.

The model's own training step (its optimizer, loss, layers) is compiled by XLA at a few batch
sizes through the backend (:meth:`~batchfit.backend.Backend.compiled_step_memory`); each size
gives the step's memory by kind, the sizes give a line (:mod:`batchfit.core.estimate`), and the
line gives the largest batch for a budget and for common accelerator sizes. Seconds per size,
no training step, no out-of-memory error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..backend import get_backend
from ..core.estimate import (
    BEND_TOLERANCE,
    CARD_RESERVE_BYTES,
    COMMON_CARDS_GB,
    TEMPORARIES_ROOM,
    USABLE_SHARE,
    budget_batch,
    card_assumption,
    card_table,
    check_batch_sizes,
    line_points,
    upper_line,
)
from ..core.sizes import format_bytes, parse_size
from ..core.validate import check_fraction
from ..errors import InvalidInputError, NothingFitsError
from ..results.estimate import CompiledStepMemory, EstimateResult
from .resolve import resolve

__all__ = ["DEVICE_CAVEAT", "EXECUTOR_CAVEAT", "estimate_memory"]

#: What a CPU-compiled prediction means for a GPU.
DEVICE_CAVEAT = (
    "compiled for the host CPU: XLA's GPU compiler fuses, lays out and schedules differently "
    "(and cuDNN/cuBLAS take workspaces), so for a GPU these figures are an approximation; "
    "confirm with 'batchfit max' on the card")
#: What an XLA estimate means for a step Keras does not compile with XLA (docs/estimate.md).
EXECUTOR_CAVEAT = (
    "this model's own training step is not XLA-compiled here (jit_compile is False, or 'auto' "
    "without a GPU): the figures are XLA's, and TensorFlow's op-by-op executor path can need "
    "more or less (its peak, measured on CPU, ran {executor}); compile with jit_compile=True to "
    "train what was estimated, or measure the executor path with 'batchfit max'")
#: The executor's measured peak against XLA's on the example models (bench/bench_estimate.py).
EXECUTOR_FIGURES = ("from 58% below XLA's (a small CNN) to 31% above (a small Transformer) on "
                    "batchfit's example models, MobileNetV2 9-10% below, ResNet50 14-18% "
                    "below in two runs; docs/estimate.md")


def estimate_memory(model: Any, batch_sizes: Sequence[int] | str = (32, 64, 128),
                    memory: int | str | None = None, *, input_shapes: Any = None,
                    usable_share: float = USABLE_SHARE,
                    card_reserve: int | str = CARD_RESERVE_BYTES,
                    progress: Callable[[CompiledStepMemory], None] | None = None
                    ) -> EstimateResult:
    """Predict the memory of ``model``'s training step from its XLA compilation; run nothing.

    Args:
        model: a compiled ``keras.Model``, a zero-argument function returning one, or a spec
            (``"file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``).
        batch_sizes: the sizes to compile (positive integers, or ``"32,64,128"``); two or
            more give the line ``fixed + per_sample * b``.
        memory: a budget (bytes or ``"16GiB"``): the largest batch predicted to fit it.
        input_shapes: shapes for dynamic non-batch dimensions (as for ``max``).
        usable_share: share of a card's memory, after ``card_reserve``, the step may use.
        card_reserve: bytes taken on every card before the step (CUDA context, libraries).
        progress: called with each size's figures as it is compiled.

    Returns:
        An :class:`~batchfit.results.estimate.EstimateResult`.

    Raises:
        InvalidInputError: the model is not compiled, a size is not a positive integer, a
            dynamic dimension is not given, or a layer cannot be compiled by XLA.
        NothingFitsError: ``memory`` is below the fixed cost plus one sample (the message
            says the fixed cost; the result is attached as ``exc.result``).

    Example:

    >>> import keras, batchfit
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> r = batchfit.estimate_memory(model, batch_sizes=(16, 32), memory="1MiB")
    >>> r.fit.per_sample_bytes > 0, r.max_batch_size > 32, int(model.optimizer.iterations)
    (True, True, 0)
    """
    sizes = check_batch_sizes(batch_sizes)
    budget = _budget(memory)
    share = check_fraction("usable_share", usable_share, include_high=True)
    reserve = parse_size(card_reserve) if isinstance(card_reserve, str) else int(card_reserve)
    start = time.perf_counter()
    resolved = resolve(model, build=True)
    if resolved.replicas > 1:
        raise InvalidInputError(
            "estimate compiles one device's training step: build the model without a "
            "distribution strategy (the per-replica batch is what one device holds)")
    backend = get_backend()
    compiled = []
    for b in sizes:
        m = backend.compiled_step_memory(resolved.model, b, input_shapes=input_shapes)
        compiled.append(m)
        if progress is not None:
            progress(m)
    line = upper_line(line_points(compiled))
    step_jit = backend.step_jit_compiled(resolved.model)
    result = EstimateResult(
        model_name=str(getattr(resolved.model, "name", "")), sizes=compiled, fit=line,
        memory_budget_bytes=budget, max_batch_size=None,
        cards=card_table(line, COMMON_CARDS_GB, reserve_bytes=reserve, share=share),
        usable_share=share, card_reserve_bytes=reserve, device=compiled[0].device,
        step_jit=step_jit, seconds=round(time.perf_counter() - start, 3),
        notes=_notes(compiled, line, step_jit, reserve, share),
        environment=backend.environment_info())
    if budget is None:
        return result
    try:
        best = budget_batch(line, budget)
    except NothingFitsError as exc:
        exc.result = result
        raise
    from dataclasses import replace

    return replace(result, max_batch_size=best,
                   notes=[*result.notes, _budget_note(best, backend.name)])


def _budget_note(best: int, backend_name: str) -> str:
    """What the budget's batch means: an upper bound, and (on TensorFlow) by how much."""
    head = f"{best} is where the step's peak reaches the budget, an upper bound on what trains"
    if backend_name != "tensorflow":
        return (f"{head}: the device's allocator needs room to spare around the program's "
                f"buffers; `batchfit max` confirms with real steps on a GPU")
    return (f"{head}: under TensorFlow's capped CPU allocator what fitted was about where the "
            f"total with the temporaries counted {TEMPORARIES_ROOM}x reaches it (demo model at "
            f"96 MiB: 135 trained where this line says 279; the program's temporaries need one "
            f"free chunk); `batchfit max --jit` starts from this line and confirms with real "
            f"steps")


def _budget(memory: int | str | None) -> int | None:
    if memory is None:
        return None
    budget = parse_size(memory) if isinstance(memory, str) else memory
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise InvalidInputError(f"memory must be a positive size such as '16GiB'; got {memory!r}")
    return int(budget)


def _notes(compiled: list[CompiledStepMemory], line: Any, step_jit: bool, reserve: int,
           share: float) -> list[str]:
    notes = []
    if compiled[0].device.upper().startswith("CPU"):
        notes.append(DEVICE_CAVEAT)
    if not step_jit:
        notes.append(EXECUTOR_CAVEAT.format(executor=EXECUTOR_FIGURES))
    if len(compiled) == 1:
        notes.append("one size compiled: the per-sample figure is that size's total divided "
                     "by the batch (an upper bound); give two or more sizes for a line")
    elif line.points < len(compiled):
        notes.append(f"the line goes through the {line.points} largest of the {len(compiled)} "
                     f"compiled sizes: XLA chose other algorithms or layouts at the smaller, "
                     f"which were off the line by more than {BEND_TOLERANCE:.0%}")
    if len(compiled) > 1 and line.max_residual_fraction > BEND_TOLERANCE:
        notes.append(f"the compiled sizes are not on one line (largest residual "
                     f"{line.max_residual_fraction:.1%}): XLA chose other algorithms or layouts "
                     f"at some sizes, so sizes far from those compiled are less sure; compile "
                     f"sizes near the budget's answer to confirm it")
    notes.append("gradients are temporaries inside the compiled program: XLA does not report "
                 "them apart from activations and workspace")
    notes.append(card_assumption(reserve, share))
    fixed = max(0.0, line.fixed_bytes)
    notes.append(f"fixed cost {format_bytes(fixed)}; per sample "
                 f"{format_bytes(max(0.0, line.per_sample_bytes))}")
    return notes
