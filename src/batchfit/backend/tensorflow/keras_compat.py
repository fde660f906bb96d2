"""Every private Keras and TensorFlow API batchfit uses, one function each.

batchfit measures and trains the user's own model with Keras's own step, so in a few places it
reads (or, for the optimizer, patches) attributes Keras keeps private: the layer graph, the
step-function factory, the optimizer's raw counter and accumulators. Each such use lives here,
behind a named function, so that when Keras changes one of them this is the one file to open.

Written against Keras 3.15.1 on TensorFlow 2.21 (``constraints.txt``). Each docstring says what
the function reads, what public API is near it and why that is not enough, and what breaks in
batchfit if Keras changes it. ``tests/integration`` exercises every function through the code that
calls it (fit, check, noise, synth, data); a Keras upgrade that breaks one fails those tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "accumulated_gradients",
    "build_shapes",
    "call_has_training_arg",
    "communication_options_of",
    "compile_loss",
    "compiled_step_function",
    "compute_loss_fn",
    "current_learning_rate_fn",
    "drop_new_nodes",
    "fit_epoch_iterator",
    "hlo_proto_class",
    "inbound_nodes",
    "is_keras2_object",
    "keras_history_layer",
    "learning_rate_value",
    "make_step_function",
    "model_distribute_strategy",
    "node_counts",
    "optimizer_iterations",
    "optimizer_trainable_variables",
    "optimizer_variable_index",
    "restore_current_learning_rate_fn",
    "set_accumulated_gradients",
    "set_current_learning_rate_fn",
    "sublayers",
    "symbolic_build",
    "unscale_loss_for_distribution",
    "upstream_dataset",
]

# Modules of Keras 2 classes: the tf_keras package and Keras 3's bundled copy of legacy code.
_KERAS2_MODULES = ("tf_keras", "keras.src.legacy")


# --- layers and the functional graph ---------------------------------------------------------
def sublayers(layer: Any, *, include_self: bool = False) -> list[Any] | None:
    """Every layer nested in ``layer`` (recursively), or ``None`` when it cannot say.

    Reads ``Layer._flatten_layers(include_self=..., recursive=True)`` (Keras 3.15.1,
    ``keras/src/layers/layer.py``). The public ``Model.layers`` lists only the top level; this
    also finds layers inside custom layers (a BatchNormalization or an Embedding held by a block).
    If Keras renames it, this returns ``None`` and the callers fall back to ``model.layers`` (or
    the layer itself): nested BatchNorm/Embedding layers go unseen, so ``noise`` may miss its
    "mixes examples" note, ``check`` the BatchNorm hint, and synthesized integer inputs their
    vocabulary bound.
    """
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return None
    return list(flatten(include_self=include_self, recursive=True))


def is_graph_model(layer: Any) -> bool:
    """Whether ``layer`` is a functional or Sequential model: a graph of layers, whose ``call``
    is Keras's own (a subclass such as a KerasHub backbone included).

    Reads ``keras.src.models.functional.Functional`` (Keras 3.15.1): a model built with
    ``keras.Model(inputs, outputs)``, or a subclass that calls ``super().__init__(inputs=...,
    outputs=...)``, is an instance of it; there is no public name. If Keras moves it, only
    Sequential models are recognised: ``check`` then takes a nested functional model for a
    layer of its own again.
    """
    import keras

    if isinstance(layer, keras.Sequential):
        return True
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - a Keras that moved it
        return False
    return isinstance(layer, Functional)


def inbound_nodes(layer: Any) -> list[Any]:
    """The nodes where ``layer`` was called on symbolic inputs (``[]`` when none or unknown).

    Reads ``Operation._inbound_nodes`` (Keras 3.15.1, ``keras/src/ops/operation.py``); each node
    has ``arguments`` (the call's args/kwargs) and ``input_tensors``. No public API lists a
    layer's calls in a functional model. If Keras changes it, ``check`` can no longer find the
    input a custom layer gets inside the model (it asks for ``input_shape=``), and synthesized
    integer inputs no longer follow the graph to their Embedding.
    """
    return getattr(layer, "_inbound_nodes", []) or []


def node_counts(layer: Any) -> tuple[int, int]:
    """How many inbound and outbound nodes ``layer`` has (to undo new calls later).

    Reads ``Operation._inbound_nodes`` and ``_outbound_nodes`` (Keras 3.15.1). See
    :func:`drop_new_nodes`.
    """
    return (len(getattr(layer, "_inbound_nodes", [])),
            len(getattr(layer, "_outbound_nodes", [])))


def drop_new_nodes(layer: Any, counts: tuple[int, int]) -> None:
    """Drop the nodes added to ``layer`` since :func:`node_counts` returned ``counts``.

    Truncates ``Operation._inbound_nodes`` and ``_outbound_nodes`` in place (Keras 3.15.1).
    ``check`` calls a layer on new symbolic inputs; each call appends a node to the layer that
    belongs to the user's model. If Keras stores nodes differently, this does nothing (the lists
    are not lists any more) and the checked layer keeps extra nodes, harmless to training but
    visible in ``model.summary()``-like graph walks.
    """
    for attr, n in zip(("_inbound_nodes", "_outbound_nodes"), counts):
        nodes = getattr(layer, attr, None)
        if isinstance(nodes, list) and len(nodes) > n:
            del nodes[n:]


def keras_history_layer(tensor: Any) -> Any:
    """The layer (operation) that produced the symbolic ``tensor``, or ``None``.

    Reads ``KerasTensor._keras_history.operation`` (Keras 3.15.1, ``keras/src/ops/node.py``).
    Used only to name a model's unnamed ``keras.Input`` by its input layer; if Keras changes
    it, data error messages name inputs ``keras_tensor_N`` instead.
    """
    return getattr(getattr(tensor, "_keras_history", None), "operation", None)


def build_shapes(layer: Any) -> dict[str, Any] | None:
    """The arguments ``layer.build`` was called with, by name (``None`` when unknown).

    Reads ``Layer._build_shapes_dict`` (Keras 3.15.1, set by the build wrapper in
    ``keras/src/layers/layer.py``). A built subclassed layer or model has no public input shape;
    this is where Keras keeps it. If Keras changes it, batchfit no longer infers the input shape
    of a built subclassed layer (``check``) or model (synthesized data) and asks for it.
    """
    return getattr(layer, "_build_shapes_dict", None)


def call_has_training_arg(model: Any) -> bool:
    """Whether ``model.call`` takes a ``training`` argument (``True`` when unknown).

    Reads ``Layer._call_has_training_arg`` (Keras 3.15.1), the flag Keras's own train step uses
    to decide whether to pass ``training=True``. If Keras drops it, batchfit passes
    ``training=True`` always (the noise measurement, the multi-worker fit's step).
    """
    return bool(getattr(model, "_call_has_training_arg", True))


# --- the model: compiled loss, strategy, step function -----------------------------------------
def compile_loss(model: Any) -> Any:
    """The loss object ``model.compile`` made (``None`` when not compiled with a loss).

    Reads ``Trainer._compile_loss`` (Keras 3.15.1, ``keras/src/trainers/trainer.py``); the public
    ``model.loss`` is what the user passed, which may be ``None`` for a model that adds its own
    losses. If Keras renames it, ``fit_multiworker`` refuses every model as "not compiled".
    """
    return getattr(model, "_compile_loss", None)


def compute_loss_fn(model: Any) -> Callable[..., Any]:
    """The function that computes the model's training loss, as Keras's own step does.

    Returns ``Trainer._compute_loss`` (Keras 3.15.1), the wrapper ``train_step`` calls (it honours
    a user's override of the public ``compute_loss`` and its older signature), else the public
    ``model.compute_loss``. If Keras renames it, batchfit calls ``compute_loss`` directly, which
    is the same for models that do not override it.
    """
    return getattr(model, "_compute_loss", None) or model.compute_loss


def unscale_loss_for_distribution(value: Any) -> Any:
    """``value`` times the replicas in sync: undo the scaling ``compute_loss`` does in a strategy.

    Calls ``keras.src.losses.loss.unscale_loss_for_distribution`` (Keras 3.15.1). Keras's loss
    divides by the replicas because its own step relies on the optimizer's SUM all-reduce; the
    multi-worker fit weighs micro-batches itself. If the function moves, the value is returned
    as it is (a Keras that no longer scales by replicas); if Keras still scales but moved the
    function, the multi-worker fit's gradients are divided by the replicas (a smaller step).
    """
    try:
        from keras.src.losses.loss import unscale_loss_for_distribution as unscale
    except ImportError:  # pragma: no cover - a Keras that no longer scales by replicas
        return value
    return unscale(value)


def model_distribute_strategy(model: Any) -> Any:
    """The ``tf.distribute`` strategy the model was built under, or ``None`` if Keras kept none.

    Reads ``Trainer._distribute_strategy`` (Keras 3.15.1). The public ``model.distribute_strategy``
    falls back to the current default strategy, so it cannot tell "built under no strategy"
    apart. If Keras renames it, batchfit finds the strategy from the model's distributed
    variables (``distribute.model_strategy``) and ``fit_multiworker`` refuses replicated models
    as "not built under this strategy's scope".
    """
    return getattr(model, "_distribute_strategy", None)


def make_step_function(model: Any, step: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``step`` compiled as Keras compiles its train/test step (``tf.function``, strategy, XLA).

    Calls ``TensorFlowTrainer._make_function(step)`` (Keras 3.15.1,
    ``keras/src/backend/tensorflow/trainer.py``): it wraps a one-batch step in the model's
    ``jit_compile``, ``steps_per_execution`` and ``strategy.run`` handling, which
    ``make_train_function`` does only for ``train_step`` itself. If Keras changes it,
    :func:`batchfit.fit` cannot build its guarded step and fails at the first batch.
    """
    return model._make_function(step)


def fit_epoch_iterator(model: Any, x: Any, y: Any, *, batch_size: int, shuffle: bool) -> Any:
    """The epoch iterator ``model.fit`` (or, with ``shuffle=False``, ``evaluate``) builds.

    Builds ``TFEpochIterator`` (Keras 3.15.1, ``keras/src/backend/tensorflow/trainer.py``) as
    ``fit`` does: ``x``/``y`` through Keras's data adapter (for arrays: the whole arrays as one
    tensor, a gather per batch, ``prefetch(AUTOTUNE)``), distributed by the model's strategy,
    grouped by ``model.steps_per_execution``. Iterating it yields ``(begin, end, iterator)``;
    ``model.train_function(iterator)`` / ``model.test_function(iterator)`` run one execution
    (``steps_per_execution`` steps in one ``tf.while_loop``), exactly as ``fit``'s loop calls
    them; they raise ``StopIteration`` when the data runs out (``catch_stop_iteration()``).
    There is no public way to run ``fit``'s data path and compiled function without ``fit``'s
    callbacks, history and progress bar. If Keras moves or changes it, memory probes fail
    with the model's first probe (``refused``, an ``ImportError``/``TypeError`` in the
    detail): every max search stops at its first probe, so tests/integration/test_probe.py
    fails at once.
    """
    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    return TFEpochIterator(x=x, y=y, batch_size=batch_size, shuffle=shuffle,
                           distribute_strategy=model.distribute_strategy,
                           steps_per_execution=model.steps_per_execution)


def epoch_dataset(epochs: Any) -> Any:
    """The ``tf.data`` dataset (or distributed dataset) behind a :func:`fit_epoch_iterator`.

    Reads ``TFEpochIterator._get_iterator()`` (Keras 3.15.1, the dataset ``fit`` iterates,
    prefetch included). If Keras changes it, the warm-up falls back to tracing at two sizes
    (:func:`batchfit.backend.tensorflow.probe.trace_fit_path`), which costs one more trace.
    """
    return epochs._get_iterator()


def compiled_step_function(function: Any) -> Any:
    """The ``tf.function`` behind ``model.train_function`` / ``test_function`` (``None``: none).

    Reads the closure of the plain Python function ``_make_function`` returns (Keras 3.15.1,
    ``keras/src/backend/tensorflow/trainer.py``: ``function(iterator)`` calling the
    ``tf.function`` ``multi_step_on_iterator``), so that its graph can be traced for a batch
    shape before any step runs (:meth:`batchfit.backend.tensorflow.probe.ProbeRunner.prepare`).
    If Keras changes it, or the model runs eagerly, this returns ``None`` and nothing is traced
    ahead: the first step traces, as it always did.
    """
    code, closure = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or not closure:
        return None
    cell = dict(zip(code.co_freevars, closure)).get("multi_step_on_iterator")
    try:
        inner = cell.cell_contents if cell is not None else None
    except ValueError:  # an empty cell
        return None
    return inner if hasattr(inner, "get_concrete_function") else None


# --- the optimizer ----------------------------------------------------------------------------
def optimizer_iterations(opt: Any) -> Any:
    """The optimizer's raw step counter (a variable, counting micro-steps while accumulating).

    Reads ``BaseOptimizer._iterations`` (Keras 3.15.1, ``keras/src/optimizers/base_optimizer.py``).
    The public ``opt.iterations`` divides by ``gradient_accumulation_steps`` and is not the
    variable, so it cannot be assigned or shadowed. If Keras changes it, :func:`batchfit.fit`
    cannot switch accumulation at a batch boundary nor restore the counter after an OOM.
    """
    return opt._iterations


def learning_rate_value(opt: Any) -> Any:
    """What the optimizer holds as its learning rate: a ``LearningRateSchedule`` or a variable.

    Reads ``BaseOptimizer._learning_rate`` (Keras 3.15.1); the public ``opt.learning_rate``
    evaluates a schedule instead of returning it. If Keras changes it, a schedule is evaluated
    at the raw micro-step counter while :func:`batchfit.fit` accumulates (a faster decay).
    """
    return opt._learning_rate


def current_learning_rate_fn(opt: Any) -> Callable[[], Any]:
    """The optimizer's own ``_get_current_learning_rate`` (bound method), to wrap.

    Reads ``BaseOptimizer._get_current_learning_rate`` (Keras 3.15.1), which ``apply`` calls to
    get the learning rate of this update. See :func:`set_current_learning_rate_fn`.
    """
    return opt._get_current_learning_rate


def set_current_learning_rate_fn(opt: Any, fn: Callable[[], Any]) -> None:
    """Make ``opt`` use ``fn`` for its current learning rate (on this instance only).

    Sets ``_get_current_learning_rate`` on the instance (Keras 3.15.1), so the optimizer's config
    and saved models are unchanged. If Keras stops calling it, the patch is silently unused and
    a schedule decays per micro-step while :func:`batchfit.fit` accumulates.
    """
    opt._get_current_learning_rate = fn


def restore_current_learning_rate_fn(opt: Any) -> None:
    """Undo :func:`set_current_learning_rate_fn` (nothing when the instance has no patch)."""
    if "_get_current_learning_rate" in vars(opt):
        del opt._get_current_learning_rate


def optimizer_trainable_variables(opt: Any) -> list[Any]:
    """The variables the optimizer was built for, in its slot order.

    Reads ``BaseOptimizer._trainable_variables`` (Keras 3.15.1), set by ``build``. No public
    attribute lists them (``opt.variables`` holds the slots). If Keras changes it,
    :func:`batchfit.fit`'s gradient accumulation (one accumulator per variable) cannot be set up.
    """
    return opt._trainable_variables


def optimizer_variable_index(opt: Any, variable: Any) -> int:
    """The position of ``variable`` in :func:`optimizer_trainable_variables`.

    Calls ``BaseOptimizer._get_variable_index`` (Keras 3.15.1; it keys by the variable's path).
    If Keras changes it, batchfit's own accumulation under a strategy fails when tracing.
    """
    return int(opt._get_variable_index(variable))


def accumulated_gradients(opt: Any) -> list[Any] | None:
    """The optimizer's gradient accumulators (``None`` when it has none).

    Reads ``BaseOptimizer._accumulated_gradients`` (Keras 3.15.1): one variable per trainable
    variable, made by ``build`` when ``gradient_accumulation_steps`` was set at construction.
    If Keras renames it, :func:`batchfit.fit` cannot accumulate on one device (Keras's
    ``apply`` would find no accumulators when ``gradient_accumulation_steps`` is set).
    """
    return getattr(opt, "_accumulated_gradients", None)


def set_accumulated_gradients(opt: Any, accumulators: list[Any]) -> None:
    """Give ``opt`` the gradient ``accumulators`` without tracking them (not saved).

    Sets ``BaseOptimizer._accumulated_gradients`` with ``object.__setattr__`` (Keras 3.15.1), so
    Keras's tracker does not add them to the optimizer's variables (a checkpoint keeps the
    variable count of the user's own optimizer). See :func:`accumulated_gradients`.
    """
    object.__setattr__(opt, "_accumulated_gradients", accumulators)


# --- TensorFlow: tf.distribute and tf.data ----------------------------------------------------
def communication_options_of(strategy: Any) -> Any:
    """The ``CommunicationOptions`` a strategy was created with, or ``None``.

    Reads ``strategy.extended._communication_options`` (TensorFlow 2.21,
    ``CollectiveAllReduceExtended``). No public API returns them. If TensorFlow renames it,
    ``fit_multiworker`` always notes that the strategy's collectives have no timeout.
    """
    return getattr(getattr(strategy, "extended", None), "_communication_options", None)


def upstream_dataset(ds: Any) -> Any:
    """The dataset ``ds`` was made from (the first one for zip/concatenate), or ``None``.

    Reads ``DatasetV2._input_dataset`` (unary transformations) and ``_datasets`` (zip,
    concatenate) (TensorFlow 2.21, ``tensorflow/python/data/ops``). No public API walks a
    pipeline. If TensorFlow changes them, batchfit can no longer tell from the pipeline whether
    a dataset is already batched (``data._dataset_batched`` answers "unknown").
    """
    nxt = getattr(ds, "_input_dataset", None)
    if nxt is None:
        inner = getattr(ds, "_datasets", None)
        if isinstance(inner, (list, tuple)) and inner:
            nxt = inner[0]
    return nxt


# --- what is not a Keras 3 object -------------------------------------------------------------
def is_keras2_object(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 2 object (``tf_keras``, or Keras 3's legacy copy of Keras 2).

    Reads the class's ``__module__`` against Keras 3.15.1's private module layout
    (``keras.src.legacy``) and the ``tf_keras`` package. If Keras moves its legacy code, a Keras 2
    model is reported as "not a Keras model" instead of "a Keras 2 model" (a vaguer message).
    """
    mod = type(obj).__module__ or ""
    return mod.startswith(_KERAS2_MODULES) or \
        any(c.__module__.startswith("tf_keras") for c in type(obj).__mro__)


# --- compile-time memory (batchfit estimate) ------------------------------------------------
def symbolic_build(model: Any, data_batch: Any) -> None:
    """Build the model, its loss, metrics and optimizer as Keras does before its first step.

    Calls ``TensorFlowTrainer._maybe_symbolic_build(data_batch=(x, y, None))`` (Keras 3.15.1,
    ``keras/src/backend/tensorflow/trainer.py``): symbolic (``compute_output_spec``), nothing
    runs, no weight changes. ``model.build`` alone leaves the compiled metrics and the optimizer
    unbuilt, and tracing ``train_step`` cannot create them inside an XLA function. If Keras
    changes it, :func:`batchfit.estimate_memory` fails for a model that never trained.
    """
    x, y = data_batch
    model._maybe_symbolic_build(data_batch=(x, y, None))


def hlo_proto_class() -> Any:
    """The ``HloProto`` message class that parses TensorFlow's serialized optimized HLO.

    Imports ``tensorflow.compiler.xla.service.hlo_pb2`` (TensorFlow 2.21; XLA's protos are not
    public API, and the module has moved between ``tensorflow.compiler.xla`` and ``xla`` /
    ``local_xla`` across releases, so each known path is tried). If none is found,
    :func:`batchfit.estimate_memory` cannot read the buffer assignment and says so.
    """
    import importlib

    from ...errors import MissingBackendError

    for path in ("tensorflow.compiler.xla.service.hlo_pb2", "xla.service.hlo_pb2",
                 "local_xla.xla.service.hlo_pb2"):
        try:
            return importlib.import_module(path).HloProto
        except (ImportError, AttributeError):
            continue
    raise MissingBackendError(
        "this TensorFlow has no XLA HloProto module (tensorflow.compiler.xla.service.hlo_pb2): "
        "batchfit estimate cannot read the compiled step's buffer assignment")
