"""The memory of the model's own training step compiled by XLA, read without running it.

The step is Keras's ``model.train_step`` (the model's optimizer, loss, layers), wrapped in a
``tf.function(jit_compile=True)`` and compiled for symbolic inputs (``tf.TensorSpec`` of the
batch size): ``experimental_get_compiler_ir(...)(stage="optimized_hlo_proto_serialized")``
gives the optimized HLO module with XLA's buffer assignment, and each buffer allocation is
classified (:func:`classify_allocations`). Nothing is executed: the weights and the
optimizer's counter are unchanged afterwards (the model's state is built as Keras builds it
before its first step, symbolically).

What the step allocates outside the compiled program, measured on TensorFlow 2.21's CPU
allocator (``docs/estimate.md``): every variable of the model lives outside it (the program
receives them as arguments and writes the updated values in place), and so does the batch;
the program's temporaries are one allocation. The predicted peak is therefore the variables'
bytes, the batch, the temporaries and the outputs not written in place, each allocation
rounded up to the allocator's 256 bytes.

Example:

>>> import keras
>>> from batchfit.backend.tensorflow.compiled import compiled_step_memory
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
>>> model.compile(optimizer="adam", loss="mse")
>>> m = compiled_step_memory(model, 16)
>>> m.batch_size, m.temporaries > 0, int(model.optimizer.iterations.numpy())
(16, True, 0)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...core.validate import check_int
from ...errors import InvalidInputError, error_line
from ...results.estimate import CompiledStepMemory
from .keras_compat import hlo_proto_class, symbolic_build

#: TensorFlow's BFC allocator rounds every allocation up to a multiple of this.
ALLOCATION_ROUNDING = 256
#: Ops XLA cannot compile, as TensorFlow names them in its errors, and what they come from.
_UNCOMPILABLE_HINTS = {
    "EagerPyFunc": "tf.py_function", "PyFunc": "tf.numpy_function / tf.py_function",
    "StringFormat": "a string op", "StringJoin": "a string op", "AsString": "a string op",
    "StringToNumber": "a string op", "RegexReplace": "a string op",
}


def compiled_step_memory(model: Any, batch_size: int, *,
                         input_shapes: Any = None) -> CompiledStepMemory:
    """Bytes of ``model``'s XLA-compiled training step at ``batch_size``, by kind.

    Args:
        model: a compiled Keras model (TensorFlow backend).
        batch_size: the batch size to compile for (a positive integer).
        input_shapes: shapes for dynamic (``None``) non-batch dimensions, as for ``max``.

    Raises:
        InvalidInputError: a layer cannot be compiled by XLA (``supports_jit=False``, a
            ``tf.py_function``, string ops), or the inputs have dynamic dimensions not given.
    """
    import tensorflow as tf

    batch_size = int(check_int("batch_size", batch_size))  # type: ignore[arg-type]
    _refuse_unjittable_layers(model)
    x_spec, y_spec = _batch_specs(model, batch_size, input_shapes)
    fn = tf.function(lambda x, y: model.train_step((x, y)), jit_compile=True,
                     reduce_retracing=False)
    start = time.perf_counter()
    try:
        concrete = fn.get_concrete_function(x_spec, y_spec)
        serialized = fn.experimental_get_compiler_ir(x_spec, y_spec)(
            stage="optimized_hlo_proto_serialized")
    except Exception as exc:  # XLA's errors have many classes; the message names the layer
        raise _compile_error(model, exc) from exc
    seconds = time.perf_counter() - start
    proto = hlo_proto_class()()
    proto.ParseFromString(serialized)
    n_args = len(tf.nest.flatten((x_spec, y_spec)))
    kinds = _variable_kinds(model)
    by_param = [kinds.get(id(t), "captured") for t in concrete.captured_inputs]
    parts = classify_allocations(proto.buffer_assignment.buffer_allocations, n_args, by_param)
    state = _state_bytes(model)
    return CompiledStepMemory(
        batch_size=int(batch_size), weights=state["weights"],
        optimizer_state=state["optimizer_state"],
        other_state=state["other_state"] + parts["captured"],
        inputs=parts["inputs"], temporaries=parts["temporaries"], outputs=parts["outputs"],
        constants=parts["constants"], rounding=parts["rounding"] + state["rounding"],
        compile_seconds=round(seconds, 3),
        device="GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0",
        program_arguments=parts["arguments"])


def step_jit_compiled(model: Any) -> bool:
    """Whether Keras would XLA-compile ``model``'s training step in this process.

    ``jit_compile="auto"`` is resolved as Keras resolves it: on when a GPU is visible and no
    ``tf.distribute`` strategy is set (and every layer supports it).
    """
    import tensorflow as tf

    setting = getattr(model, "jit_compile", False)
    if setting == "auto":
        from .keras_compat import model_distribute_strategy

        return bool(tf.config.list_physical_devices("GPU")) and \
            model_distribute_strategy(model) is None
    return bool(setting)


def classify_allocations(allocations: Any, n_args: int, captured_kinds: list[str]
                         ) -> dict[str, int]:
    """Bytes of XLA buffer allocations by kind.

    ``allocations``: ``HloProto.buffer_assignment.buffer_allocations``. The program's first
    ``n_args`` parameters are the batch; parameter ``n_args + i`` is the ``i``-th captured
    input of the concrete function, of kind ``captured_kinds[i]`` (``"captured"``: a tensor
    that is not one of the model's variables, counted in ``captured``; the variables' own
    bytes are read from the model, all of which stay resident). Constants and thread-local
    buffers are not allocated by the step; live-out buffers that are not parameters are its
    outputs; the rest are temporaries. ``rounding`` is what rounding the step's allocations
    up to :data:`ALLOCATION_ROUNDING` adds.
    """
    out = {"inputs": 0, "arguments": 0, "temporaries": 0, "outputs": 0, "constants": 0,
           "rounding": 0, "captured": 0}
    for a in allocations:
        size = int(a.size)
        if a.is_entry_computation_parameter:
            out["arguments"] += size
            if a.parameter_number < n_args:
                out["inputs"] += size
                out["rounding"] += _round_up(size) - size
            elif a.parameter_number - n_args < len(captured_kinds) and \
                    captured_kinds[a.parameter_number - n_args] == "captured":
                out["captured"] += size
            continue
        if a.is_constant:
            out["constants"] += size
            continue
        if a.is_thread_local or size == 0:
            continue
        key = "outputs" if a.maybe_live_out else "temporaries"
        out[key] += size
        out["rounding"] += _round_up(size) - size
    return out


def _round_up(size: int) -> int:
    return -(-size // ALLOCATION_ROUNDING) * ALLOCATION_ROUNDING


def _refuse_unjittable_layers(model: Any) -> None:
    from .keras_compat import sublayers

    layers = sublayers(model) or list(getattr(model, "layers", []))
    for layer in layers:
        if getattr(layer, "supports_jit", True) is False:
            raise InvalidInputError(
                f"layer {layer.name!r} ({type(layer).__name__}) sets supports_jit=False: XLA "
                f"cannot compile this model's step, so there is no compile-time estimate; "
                f"measure it with 'batchfit max' (real probes) instead")


def _batch_specs(model: Any, batch_size: int, input_shapes: Any) -> tuple[Any, Any]:
    """``(x_spec, y_spec)``: ``tf.TensorSpec`` structures of one batch, the model's state built.

    The shapes and dtypes come from the input synthesis (one example); the model, its loss,
    metrics and optimizer are built symbolically as Keras does before its first step.
    """
    import tensorflow as tf

    from .synth import synthesize_batch

    x1, y1 = synthesize_batch(model, 1, input_shapes=input_shapes)
    symbolic_build(model, (x1, y1))
    opt = getattr(model, "optimizer", None)
    if opt is not None and not getattr(opt, "built", True):
        opt.build(model.trainable_variables)

    def spec(a: Any) -> Any:
        arr = np.asarray(a)
        return tf.TensorSpec((int(batch_size),) + tuple(arr.shape[1:]), tf.as_dtype(arr.dtype))

    return tf.nest.map_structure(spec, x1), tf.nest.map_structure(spec, y1)


def _tf_variable(v: Any) -> Any:
    return getattr(v, "value", v) if not hasattr(v, "handle") else v


def _variable_kinds(model: Any) -> dict[int, str]:
    """``id(resource handle) -> kind`` for every variable the step may capture."""
    kinds: dict[int, str] = {}
    for kind, group in _variable_groups(model):
        for v in group:
            tv = _tf_variable(v)
            handle = getattr(tv, "handle", None)
            if handle is not None:
                kinds.setdefault(id(handle), kind)
    return kinds


def _variable_groups(model: Any) -> list[tuple[str, list[Any]]]:
    opt = getattr(model, "optimizer", None)
    metrics = [v for m in getattr(model, "metrics", []) or [] for v in getattr(m, "variables", [])]
    return [("weights", list(model.variables)),
            ("optimizer_state", list(getattr(opt, "variables", []) or [])),
            ("other_state", metrics)]


def _state_bytes(model: Any) -> dict[str, int]:
    """Bytes of every variable by kind (each once), and what 256-byte rounding adds to them."""
    seen: set[int] = set()
    out = {"weights": 0, "optimizer_state": 0, "other_state": 0, "rounding": 0}
    for kind, group in _variable_groups(model):
        for v in group:
            if id(v) in seen:
                continue
            seen.add(id(v))
            size = int(np.prod(v.shape, dtype=np.int64)) * np.dtype(_np_dtype(v)).itemsize
            out[kind] += size
            out["rounding"] += _round_up(size) - size
    return out


def _np_dtype(v: Any) -> Any:
    dtype = str(getattr(v, "dtype", "float32"))
    return {"bfloat16": "float16"}.get(dtype, dtype)


def _compile_error(model: Any, exc: BaseException) -> InvalidInputError:
    text = str(exc)
    ops = [op for op in _UNCOMPILABLE_HINTS if op in text]
    if ops:
        what = _UNCOMPILABLE_HINTS[ops[0]]
        layer = _layer_in_message(model, text)
        where = f" in layer {layer!r}" if layer else ""
        return InvalidInputError(
            f"XLA cannot compile this model's training step: {what} ({ops[0]}){where}. There "
            f"is no compile-time estimate for it; measure it with 'batchfit max' (real probes)")
    return InvalidInputError(
        f"XLA could not compile this model's training step ({error_line(exc)}); there is no "
        f"compile-time estimate for it; measure it with 'batchfit max' (real probes)")


def _layer_in_message(model: Any, text: str) -> str | None:
    from .keras_compat import sublayers

    names = [layer.name for layer in (sublayers(model) or list(getattr(model, "layers", [])))]
    found = [n for n in names if f"/{n}/" in text or f"{n}_1/" in text or f"'{n}" in text]
    return max(found, key=len) if found else None
