"""The memory of the model's own training step compiled by XLA, read without running it.

The step is Keras's ``model.train_step`` (the model's optimizer, loss, layers), wrapped in a
``tf.function(jit_compile=True)`` and compiled for symbolic inputs (``tf.TensorSpec`` of the
batch size): ``experimental_get_compiler_ir(...)(stage="optimized_hlo_proto_serialized")``
gives the optimized HLO module with XLA's buffer assignment, and each buffer allocation is
classified (:func:`classify_allocations`). Nothing is executed: the weights and the
optimizer's counter are unchanged afterwards (the model's state is built as Keras builds it
before its first step, symbolically).

What the step allocates outside the compiled program, measured on TensorFlow 2.21's CPU
allocator with allocation traces (``docs/estimate.md``): every variable of the model lives
outside it (the program receives them as arguments and writes the updated values in place),
and so does the batch; the program's temporaries are one allocation. The predicted peak is
what the allocator counts in use: the process's allocations (the variables in creation order
with their initializers' temporaries and resource handles, the batch, the constants tracing
keeps, the step's buffers) replayed through a model of TensorFlow's BFC allocator
(:mod:`batchfit.core.bfc`), which adds to the bytes the 256-byte rounding and the chunks it
hands out whole (up to twice a request): ``allocator_overhead``.

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
    counted = (sum(state.values()) + parts["captured"] + parts["inputs"] + parts["temporaries"]
               + parts["outputs"] + parts["rounding"])
    gpu = bool(tf.config.list_physical_devices("GPU"))
    # On a GPU the allocator holds one region and the traced constants are host memory (not
    # measured here: no GPU with TensorFlow was lent; the CPU layout is the measured one).
    overhead = allocator_peak(
        model, proto.buffer_assignment.buffer_allocations, n_args,
        [] if gpu else shape_constant_bytes(concrete.graph),
        regions=GPU_REGIONS if gpu else CPU_WORKER_REGIONS) - counted
    return CompiledStepMemory(
        batch_size=int(batch_size), weights=state["weights"],
        optimizer_state=state["optimizer_state"],
        other_state=state["other_state"] + parts["captured"],
        inputs=parts["inputs"], temporaries=parts["temporaries"], outputs=parts["outputs"],
        constants=parts["constants"], rounding=parts["rounding"] + state["rounding"],
        compile_seconds=round(seconds, 3),
        device="GPU:0" if gpu else "CPU:0",
        program_arguments=parts["arguments"], allocator_overhead=int(overhead))


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


#: The regions of TensorFlow's CPU BFC allocator in batchfit's capped workers: the first 2 MiB
#: region it made for its first tensors, then the rest of the budget as one region
#: (``TensorFlowBackend.configure_worker``); the second is taken as unbounded here.
CPU_WORKER_REGIONS = (2 << 20, 1 << 40)
#: A GPU's allocator without ``allow_growth`` (TensorFlow's default): one region, its memory.
GPU_REGIONS = (1 << 40,)


def allocator_peak(model: Any, allocations: Any, n_args: int, shape_constants: list[int],
                   regions: tuple[int, ...] = CPU_WORKER_REGIONS) -> int:
    """The BFC allocator's peak of the step, replaying how the process allocated its memory.

    The model's variables in the order they were created, each with its initializer's
    temporaries (:func:`~batchfit.core.bfc.variable_events`), the batch, the constants that
    tracing the step keeps (``shape_constants``, :func:`shape_constant_bytes`), then the
    compiled step's allocations and the metrics' variables, whose updates come back in new
    buffers (measured: the loss tracker's two scalars at every step, the old ones freed as the
    step starts; the other variables are updated in place), through a model of the allocator (:class:`~batchfit.core.bfc.
    BFCModel`): the chunks it hands out, rounding and whole-chunk hand-outs included.
    """
    from ...core.bfc import BFCModel, orthogonal_events, replay, step_events, variable_events

    events: list[tuple[str, str, int]] = []
    reallocated: list[tuple[str, int]] = []
    variables = _in_creation_order(model)
    orthogonal = _orthogonal_variables(model)
    for i, (kind, v) in enumerate(variables):
        size = _nbytes(v)
        if id(v) in orthogonal and len(v.shape) >= 2:
            rows = int(np.prod(v.shape[:-1], dtype=np.int64))
            cols = int(v.shape[-1])
            k = min(rows, cols)
            events += orthogonal_events(f"v{i}", size, k * k * (size // max(1, rows * cols)),
                                        rows < cols)
        else:
            events += variable_events(f"v{i}", size, _is_random(v))
        if kind == "other_state":
            reallocated.append((f"v{i}", size))
    program = []
    for a in allocations:
        size = int(a.size)
        if a.is_entry_computation_parameter:
            if a.parameter_number < n_args:  # the batch: one tensor each, a copy or a fill
                events += variable_events(f"x{a.parameter_number}", size, False)[:-1]
            continue
        if a.is_constant or a.is_thread_local or size == 0:
            continue
        program.append((size, bool(a.maybe_live_out)))
    events += [("a", f"c{i}", n) for i, n in enumerate(shape_constants)]
    bfc = BFCModel(*regions)
    first = bfc.allocate(256)  # what the worker's allocator holds before the model
    bfc.allocate(256)
    bfc.free(first)
    where: dict[str, int] = {}
    replay(events, bfc, where)
    bfc.reset_peak()
    replay(step_events(program, reallocated), bfc, where)
    return int(bfc.peak)


#: For each TensorFlow op, the inputs its shape function reads as constant tensors (a reshape's
#: shape, a reduction's axes, a slice's bounds, ...); ``-1``: the last input.
_SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Sum": (1,), "Mean": (1,), "Prod": (1,), "Max": (1,), "Min": (1,),
    "All": (1,), "Any": (1,), "StridedSlice": (1, 2, 3), "StridedSliceGrad": (0, 1, 2, 3),
    "Tile": (1,), "Transpose": (1,), "InvertPermutation": (0,), "Range": (0, 1, 2),
    "ExpandDims": (1,), "BroadcastTo": (1,), "ConcatV2": (-1,), "GatherV2": (2,),
    "Fill": (0,), "Pad": (1,), "PadV2": (1,), "MirrorPad": (1,), "Slice": (1, 2),
    "Split": (0,), "SplitV": (1, 2), "Cumsum": (1,), "OneHot": (1,), "ArgMax": (1,),
    "ArgMin": (1,), "UnsortedSegmentSum": (2,), "Conv2DBackpropInput": (0,),
    "Conv2DBackpropFilter": (1,), "DepthwiseConv2dNativeBackpropInput": (0,),
    "DepthwiseConv2dNativeBackpropFilter": (1,), "AvgPoolGrad": (0,),
    "BroadcastGradientArgs": (0, 1), "ResizeBilinear": (1,), "ReverseV2": (1,),
}


def shape_constant_bytes(graph: Any) -> list[int]:
    """Bytes of each constant that tracing the step leaves in the allocator.

    Building the traced graph, TensorFlow's shape inference evaluates the constant inputs an
    op's shape depends on (:data:`_SHAPE_INPUTS`) into host tensors in the CPU allocator, kept
    as long as the traced function: one small chunk each. Measured by allocation traces (TF
    2.21): 142 such tensors for the example Transformer, 1,250 for ResNet50, counted here as
    142 and 1,242.
    """
    out = []
    for op in graph.get_operations():
        wanted = _SHAPE_INPUTS.get(op.type)
        if not wanted:
            continue
        last = len(op.inputs) - 1
        for i, t in enumerate(op.inputs):
            if t.op.type == "Const" and (i in wanted or (i == last and -1 in wanted)):
                n = int(np.prod(t.shape.as_list() or [1], dtype=np.int64)) * t.dtype.size
                if n > 0:
                    out.append(n)
    return out


def _orthogonal_variables(model: Any) -> set[int]:
    """``id`` of each variable a layer made with Keras's ``Orthogonal`` initializer.

    The layer keeps its initializers (``kernel_initializer``, ``recurrent_initializer``, ...);
    the variable is the one named after it (``recurrent_initializer``: ``recurrent_kernel``).
    """
    from .keras_compat import sublayers

    out: set[int] = set()
    for layer in sublayers(model) or list(getattr(model, "layers", [])):
        for attr, init in vars(layer).items():
            if not attr.endswith("_initializer") or type(init).__name__ != "Orthogonal":
                continue
            stem = attr[: -len("_initializer")]
            names = {stem, f"{stem}_kernel"}
            for v in getattr(layer, "_trainable_variables", []) + \
                    getattr(layer, "_non_trainable_variables", []):
                if getattr(v, "name", "").split("/")[-1] in names:
                    out.add(id(v))
    return out


def _in_creation_order(model: Any) -> list[tuple[str, Any]]:
    """``(kind, variable)`` for every variable, in the order the process created them.

    A functional model lists its layers in graph order, not in the order their weights were
    made (ResNet50's shortcut convolution is made before the block's first); each eager
    variable's resource handle carries TensorFlow's increasing tensor id, which gives the
    creation order. Kinds: ``weights``, ``non_trainable``, ``optimizer_state``,
    ``other_state``.
    """
    seen: set[int] = set()
    trainable = {id(v) for v in getattr(model, "trainable_variables", [])}
    out = []
    for kind, group in _variable_groups(model):
        for v in group:
            if id(v) in seen:
                continue
            seen.add(id(v))
            if kind == "weights" and id(v) not in trainable:
                kind_v = "non_trainable"
            else:
                kind_v = kind
            out.append((kind_v, v))

    def created(item: tuple[str, Any]) -> int:
        handle = getattr(_tf_variable(item[1]), "handle", None)
        return int(getattr(handle, "_id", 0))

    return sorted(out, key=created)  # stable: the listed order where ids are missing


def _nbytes(v: Any) -> int:
    return int(np.prod(v.shape, dtype=np.int64)) * np.dtype(_np_dtype(v)).itemsize


def _is_random(v: Any) -> bool:
    """Whether ``v``'s initial value was drawn (not one repeated value: zeros, ones)."""
    a = np.asarray(v).reshape(-1)
    if a.size <= 1:
        return False
    head = a[:4096]  # a drawn weight differs within its first values; only constants read on
    return bool(np.any(head != a[0])) or bool(np.any(a != a[0]))


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
