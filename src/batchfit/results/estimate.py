"""Results of :func:`batchfit.estimate_memory`: the compiled step's memory, without running it.

:class:`CompiledStepMemory` is what a backend reads from its compiler for one batch size (the
:meth:`~batchfit.backend.Backend.compiled_step_memory` hook): bytes by kind. It is shaped so that
TensorFlow's XLA buffer assignment (``HloProto.buffer_assignment``) and JAX's
``jax.jit(step).lower(...).compile().memory_analysis()`` both fill it: the program's arguments
split into the model's variables and the batch, its temporaries, and its outputs that do not
alias an argument.

Example:

>>> from batchfit.results.estimate import CompiledStepMemory
>>> m = CompiledStepMemory(batch_size=32, weights=4_000, optimizer_state=8_000, other_state=16,
...                        inputs=400, temporaries=90_000, outputs=8)
>>> m.total_bytes
102424
>>> CompiledStepMemory.from_dict(m.to_dict()) == m
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._base import SCHEMA_VERSION, _Serializable, register_result


@dataclass(frozen=True)
class CompiledStepMemory(_Serializable):
    """The memory of one compiled training step at one batch size, by kind (bytes).

    The predicted peak (:attr:`total_bytes`) is what is live while the step runs: every
    variable of the model (held by the framework, outside the program), the batch, the
    program's temporaries and its outputs that are not written in place.

    Args:
        batch_size: the batch size compiled for.
        weights: the model's variables (trainable and not).
        optimizer_state: the optimizer's variables (slots, counters, learning rate).
        other_state: other variables live during the step (metrics, seed generators).
        inputs: the batch (inputs, targets, sample weights) as the program receives it.
        temporaries: the program's temporary buffers: activations kept for the backward pass,
            gradients, and the compiler's workspace. The compiler does not say which is which:
            gradients are temporaries inside the program.
        outputs: buffers the program returns that do not alias an argument (losses, metric
            values); updated variables written in place are not counted again.
        constants: the program's constants (in the executable, not in the allocator; shown,
            not counted in the total).
        rounding: bytes the allocator adds by rounding each allocation up (256 bytes on
            TensorFlow's BFC allocator).
        compile_seconds: wall time of the compilation.
        device: the device the compiler targeted, e.g. ``"CPU:0"``.
        program_arguments: the arguments of the program as the compiler lists them (the
            variables the step uses and the batch): for reference.
        allocator_overhead: what the allocator's layout adds beyond the rounded sizes: each
            variable's resource handle, chunks handed out whole (up to twice a request) and
            the buffers of variables the step re-allocates, from a replay of the process's
            allocations through a model of the allocator (:mod:`batchfit.core.bfc`).
    """

    batch_size: int
    weights: int = 0
    optimizer_state: int = 0
    other_state: int = 0
    inputs: int = 0
    temporaries: int = 0
    outputs: int = 0
    constants: int = 0
    rounding: int = 0
    compile_seconds: float = 0.0
    device: str = "CPU:0"
    program_arguments: int = 0
    allocator_overhead: int = 0

    @property
    def state_bytes(self) -> int:
        """Bytes of the variables (weights, optimizer state, other state): independent of b."""
        return self.weights + self.optimizer_state + self.other_state

    @property
    def total_bytes(self) -> int:
        """Predicted peak: state, batch, temporaries, outputs, rounding, allocator layout."""
        return (self.state_bytes + self.inputs + self.temporaries + self.outputs
                + self.rounding + self.allocator_overhead)


@dataclass(frozen=True)
class LinearFit(_Serializable):
    """``bytes(b) = fixed_bytes + per_sample_bytes * b`` fitted by least squares.

    Args:
        fixed_bytes: the intercept (the model's state and batch-independent workspace).
        per_sample_bytes: the slope.
        r_squared: coefficient of determination (``1.0`` when exact or with two points).
        max_residual_fraction: the largest ``|fitted - compiled| / compiled`` over the sizes.
        points: how many sizes the fit used.
    """

    fixed_bytes: float
    per_sample_bytes: float
    r_squared: float = 1.0
    max_residual_fraction: float = 0.0
    points: int = 0

    def predict(self, batch_size: float) -> float:
        """Predicted bytes at ``batch_size``."""
        return self.fixed_bytes + self.per_sample_bytes * batch_size


@dataclass(frozen=True)
class CardFit(_Serializable):
    """The largest batch predicted to fit on one accelerator of a common size.

    Args:
        name: the card's label, e.g. ``"80 GB"``.
        memory_bytes: the card's memory.
        usable_bytes: what the step may use after the stated reserve.
        max_batch_size: the largest batch predicted to fit (0: none).
    """

    name: str
    memory_bytes: int
    usable_bytes: int
    max_batch_size: int


@register_result
@dataclass(frozen=True)
class EstimateResult(_Serializable):
    """What :func:`batchfit.estimate_memory` found.

    Args:
        model_name: the model's name.
        sizes: per compiled batch size, the step's memory by kind.
        fit: the line fitted over ``sizes`` (``None`` with one size).
        memory_budget_bytes: the budget asked about (``None``: none given).
        max_batch_size: the largest batch predicted to fit the budget (``None``: no budget).
        cards: the largest batch per common card size.
        usable_share: the share of a card's memory assumed usable by the step.
        card_reserve_bytes: bytes assumed taken on every card before the share applies
            (the CUDA context and the framework's own reserve).
        device: the device the compilation targeted.
        step_jit: the model's own ``jit_compile`` setting as it would train here
            (``True``/``False``; ``"auto"`` resolved): when ``False`` the estimate is XLA's and
            the model's executor path can differ.
        seconds: wall time of the whole estimate.
        notes: plain-language remarks (the caveats, how inputs were synthesized).
        environment: versions and platform.
        schema_version: the results format version.
    """

    kind: ClassVar[str] = "estimate"

    model_name: str
    sizes: list[CompiledStepMemory] = field(default_factory=list)
    fit: LinearFit | None = None
    memory_budget_bytes: int | None = None
    max_batch_size: int | None = None
    cards: list[CardFit] = field(default_factory=list)
    usable_share: float = 0.9
    card_reserve_bytes: int = 0
    device: str = "CPU:0"
    step_jit: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
