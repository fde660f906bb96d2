"""The model's own JAX training step, compiled (not run) for one batch size, and its memory.

Keras's JAX trainer trains with ``jax.jit(model.train_step, donate_argnums=0)`` over a state
``(trainable, non_trainable, optimizer, metrics)`` of arrays. The same function lowered for
:class:`jax.ShapeDtypeStruct` state and batch (no array exists, nothing runs) and compiled by
XLA gives ``memory_analysis()``: the program's argument, temporary, output and aliased bytes.

How those figures map to :class:`~batchfit.results.estimate.CompiledStepMemory` (measured on
JAX 0.10.2 CPU, ``docs/jax.md``): the state arguments are the model's variables, split by
kind from the state's own structure; the batch is the rest of the arguments; the
temporaries are ``temp_size_in_bytes``; the outputs not aliased to a donated argument are
``output_size_in_bytes - alias_size_in_bytes``. ``peak_memory_in_bytes`` is kept for reference
only: on CPU it is not the step's peak.

Example:

>>> import os; os.environ.get("KERAS_BACKEND")
'jax'
>>> import keras
>>> from batchfit.backend.jax.compiled import compiled_step_memory
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
>>> model.compile(optimizer="adam", loss="mse")
>>> m = compiled_step_memory(model, 16)
>>> m.batch_size, m.weights, m.inputs, int(model.optimizer.iterations.numpy())
(16, 144, 768, 0)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...core.validate import check_int
from ...errors import InvalidInputError, error_line
from ...results.estimate import CompiledStepMemory
from ..keras_common import synthesize_batch


def build_state(model: Any, x: Any, y: Any) -> None:
    """Build the model, its compiled loss and metrics and its optimizer as Keras does before
    its first step, symbolically (nothing runs).

    Calls ``Trainer._symbolic_build(data_batch=(x, y, None))`` (Keras 3.15.1,
    ``keras/src/trainers/trainer.py``; private): ``train_on_batch`` calls it the same way.
    """
    model._symbolic_build(data_batch=(x, y, None))
    opt = getattr(model, "optimizer", None)
    if opt is not None and not opt.built:
        opt.build(model.trainable_variables)


def state_groups(model: Any) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """The variables of the trainer's state, in its order: trainable, non-trainable,
    optimizer, metrics (``JAXTrainer._get_jax_state``)."""
    opt = getattr(model, "optimizer", None)
    return (list(model.trainable_variables), list(model.non_trainable_variables),
            list(getattr(opt, "variables", []) or []), list(model.metrics_variables))


def abstract(tree: Any) -> Any:
    """``tree`` with every array (or variable) replaced by a :class:`jax.ShapeDtypeStruct`."""
    import jax

    def leaf(a: Any) -> Any:
        if a is None:
            return None
        dtype = np.dtype(getattr(a.dtype, "name", a.dtype))
        return jax.ShapeDtypeStruct(tuple(a.shape), jax.dtypes.canonicalize_dtype(dtype))

    return jax.tree_util.tree_map(leaf, tree)


def batch_structs(model: Any, batch_size: int, input_shapes: Any = None,
                  seed: int = 0, example: Any = None) -> tuple[Any, Any, tuple[Any, Any]]:
    """``(x_struct, y_struct, (x1, y1))``: the batch as shapes of ``batch_size`` examples and a
    real batch of one to build with: ``example`` (``(x, y)`` of the user's data) or one
    synthesized from the model's inputs and loss."""
    import jax

    if example is not None:
        x1, y1 = jax.tree_util.tree_map(lambda a: np.asarray(a)[:1], tuple(example))
    else:
        x1, y1 = synthesize_batch(model, 1, input_shapes=input_shapes, seed=seed)

    def grow(a: Any) -> Any:
        # as JAX receives it: float64 is float32 unless x64 is enabled
        a = np.asarray(a)
        return jax.ShapeDtypeStruct((batch_size, *a.shape[1:]),
                                    jax.dtypes.canonicalize_dtype(a.dtype))

    return jax.tree_util.tree_map(grow, x1), jax.tree_util.tree_map(grow, y1), (x1, y1)


def _nbytes(structs: Any) -> int:
    import jax

    return int(sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                   for s in jax.tree_util.tree_leaves(structs)))


def compiled_step_memory(model: Any, batch_size: int, *, input_shapes: Any = None,
                         example: Any = None) -> CompiledStepMemory:
    """Bytes of ``model``'s jitted training step at ``batch_size``, by kind, nothing run.

    Args:
        model: a compiled Keras model (JAX backend).
        batch_size: the batch size to compile for (a positive integer).
        input_shapes: shapes for dynamic (``None``) non-batch dimensions, as for ``max``.
        example: ``(x, y)`` of the user's data whose per-example shapes and dtypes the batch
            takes (default: synthesized from the model).

    Raises:
        InvalidInputError: the step cannot be compiled at this size (the compiler's message).
    """
    import jax

    batch_size = check_int("batch_size", batch_size, minimum=1)
    x_s, y_s, (x1, y1) = batch_structs(model, batch_size, input_shapes, example=example)
    build_state(model, x1, y1)
    groups = state_groups(model)
    state = tuple(abstract(g) for g in groups)
    start = time.perf_counter()
    try:
        lowered = jax.jit(model.train_step, donate_argnums=0).lower(state, (x_s, y_s))
        analysis = lowered.compile().memory_analysis()
    except Exception as exc:  # XLA's and Keras's errors have many classes
        raise InvalidInputError(f"the training step of {model.name!r} cannot be compiled at "
                                f"batch size {batch_size}: {error_line(exc)}") from exc
    seconds = time.perf_counter() - start
    weights, non_trainable, optimizer, metrics = (_nbytes(s) for s in state)
    device = jax.devices()[0]
    return CompiledStepMemory(
        batch_size=batch_size, weights=weights + non_trainable, optimizer_state=optimizer,
        other_state=metrics, inputs=_nbytes((x_s, y_s)),
        temporaries=int(analysis.temp_size_in_bytes),
        outputs=max(0, int(analysis.output_size_in_bytes) - int(analysis.alias_size_in_bytes)),
        compile_seconds=seconds, device=f"{device.platform.upper()}:{device.id}",
        program_arguments=len(jax.tree_util.tree_leaves((state, (x_s, y_s)))))


def memory_analysis(model: Any, batch_size: int, input_shapes: Any = None) -> dict[str, int]:
    """The raw ``memory_analysis()`` figures of the step at ``batch_size`` (for benchmarks)."""
    import jax

    x_s, y_s, (x1, y1) = batch_structs(model, batch_size, input_shapes)
    build_state(model, x1, y1)
    state = tuple(abstract(g) for g in state_groups(model))
    analysis = (jax.jit(model.train_step, donate_argnums=0).lower(state, (x_s, y_s))
                .compile().memory_analysis())
    return {k: int(getattr(analysis, k)) for k in
            ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes", "peak_memory_in_bytes")
            if getattr(analysis, k, None) is not None}
