"""The backend seam: every operation that touches a Keras backend goes through :class:`Backend`.

The verbs (:mod:`batchfit.verbs`) orchestrate; they ask :func:`get_backend` for the active
implementation and never import TensorFlow (or another backend) themselves. Two implementations
exist, :class:`batchfit.backend.tensorflow.TensorFlowBackend` and
:class:`batchfit.backend.jax.JaxBackend` (Keras-generic logic they share:
:mod:`batchfit.backend.keras_common`); a PyTorch backend of Keras 3 would be a new subpackage
implementing the same methods, named in :data:`SUPPORTED_BACKENDS` and ``_IMPLEMENTATIONS``.

What a backend provides, grouped by who needs it:

- **models and data**: build or load a model (in this process or a worker), check it is a
  compiled Keras model, load a data spec, make a batch function (the user's sample or batches
  synthesized from the model's input specs and loss);
- **probing**: a runner that trains N real steps at one batch size and reads the peak, the
  bytes of the model's state, the out-of-memory predicate, the default device, the environment
  a capped worker needs, and a description of the versions measured with;
- **noise**: per-example gradient norms for the gradient noise scale (a sampler of the
  user's examples, pairs of squared gradient norms at two batch sizes, the model left
  unchanged);
- **distribution**: resolving ``distribute=`` to the backend's strategy, its replicas and their
  devices and memory, the scope a model is built in;
- **throughput**: the device steps are timed on, and the timed windows of the model's own
  training step at several batch sizes (the statistics are pure, in :mod:`batchfit.core`);
- **check** (``batchfit check``): what to check in a model or a layer, and a probe of one
  layer that calls, traces, fits and exports it; the checks that only make sense on one
  framework (SavedModel export, ``tf.function`` traces) are that backend's;
- **compile-time memory**: the memory of a training step without running it (the next issue;
  raises :class:`~batchfit.errors.MissingBackendError` where a backend cannot).

Device memory that does not need a backend (a GPU's total through NVML, the host's available
RAM, a budget) lives in :mod:`batchfit.backend.memory`; the out-of-memory predicate, which
recognises errors by their class names and text, in :mod:`batchfit.backend.oom`.

Example:

>>> from batchfit.backend import backend_name
>>> backend_name("tensorflow")
'tensorflow'
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.settle import LIMIT_MARGIN
from ..errors import MissingBackendError
from .oom import is_oom_error

#: Keras backends batchfit has an implementation for.
SUPPORTED_BACKENDS: tuple[str, ...] = ("tensorflow", "jax")
#: What installs each supported backend's framework.
INSTALL_HINTS: dict[str, str] = {
    "tensorflow": "pip install 'batchfit[cpu]' (or 'batchfit[cuda]' on an NVIDIA GPU)",
    "jax": "pip install 'batchfit[jax]' (jax[cpu]; on an NVIDIA GPU also 'jax[cuda12]')",
}
#: The Python module each backend's framework is imported as.
_FRAMEWORK_MODULE: dict[str, str] = {"tensorflow": "tensorflow", "jax": "jax"}
#: Where each backend's implementation lives (module, class).
_IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "tensorflow": ("batchfit.backend.tensorflow", "TensorFlowBackend"),
    "jax": ("batchfit.backend.jax", "JaxBackend"),
}

BatchFn = Callable[[int], "tuple[Any, Any]"]
#: Seconds one collective of a multi-worker training step may wait before it fails (a worker
#: that died or diverged then stops the others instead of hanging them).
DEFAULT_COLLECTIVE_TIMEOUT = 300.0


class Backend(abc.ABC):
    """What batchfit needs from a Keras backend. Verbs call these methods and nothing else.

    Implementations import their framework lazily, inside methods, so constructing one is
    cheap and a worker process pays the import once.
    """

    #: Keras's name for the backend (``keras.config.backend()``).
    name: str = ""

    # -- models and data ---------------------------------------------------------------------
    @abc.abstractmethod
    def is_model(self, obj: Any) -> bool:
        """Whether ``obj`` is a Keras model object (not a factory or a spec string)."""

    @abc.abstractmethod
    def check_model(self, model: Any) -> None:
        """Raise :class:`~batchfit.errors.InvalidInputError` unless ``model`` is compiled."""

    @abc.abstractmethod
    def load_model(self, spec: str) -> Any:
        """A compiled model from ``'file.py:factory'``, ``'pkg.mod:factory'`` or a saved file."""

    @abc.abstractmethod
    def model_from_factory(self, factory: Callable[[], Any], where: str | None = None) -> Any:
        """Call a zero-argument factory and check what it returns is a compiled model."""

    def resolve_model(self, model: Any) -> Any:
        """A model object from a model, a zero-argument factory or a spec string.

        The one resolver the verbs share: a spec is loaded, a factory called (its errors become
        :class:`~batchfit.errors.ModelLoadError`), a model checked and returned as it is.
        """
        if isinstance(model, str):
            return self.load_model(model)
        if self.is_model(model):
            self.check_model(model)
            return model
        if callable(model):
            return self.model_from_factory(model)
        from ..errors import InvalidInputError

        raise InvalidInputError(
            f"model must be a compiled keras.Model, a function returning one, or a spec "
            f"'file.py:factory' / 'package.module:factory' / 'model.keras'; got "
            f"{type(model).__name__}")

    @abc.abstractmethod
    def load_data(self, spec: str) -> Any:
        """The data a ``'file.py:function'`` spec returns."""

    @abc.abstractmethod
    def make_batch_fn(self, model: Any, data: Any, input_shapes: Any,
                      seed: int) -> tuple[BatchFn, list[str]]:
        """``(batch_fn, notes)``: ``batch_fn(b)`` gives ``(x, y)`` of ``b`` examples."""

    # -- probing -------------------------------------------------------------------------------
    @abc.abstractmethod
    def probe_runner(self, model: Any, batch_fn: BatchFn, *, steps: int, device: str,
                     budget_bytes: int | None, limit_margin: float = LIMIT_MARGIN,
                     own_model: bool = False) -> Any:
        """A runner whose ``run(b)`` trains ``steps`` real steps at ``b`` and returns a
        :class:`~batchfit.results.Probe` (peak, timing, outcome), leaving the model unchanged.
        A peak within ``limit_margin`` of the budget does not count as fitting.
        ``own_model``: the model is this process's own (a probe worker's), so nothing need be
        built before the first step merely to be restored exactly afterwards."""

    @abc.abstractmethod
    def state_bytes(self, model: Any) -> int:
        """Bytes of the model's weights, optimizer state and metric state."""

    def is_oom_error(self, exc: BaseException | None) -> bool:
        """Whether ``exc`` is (or wraps) the backend's out-of-memory error."""
        return is_oom_error(exc)

    def check_device(self, device: str) -> str:
        """``device`` as the backend names it; refuses (exit 2) one it cannot use."""
        return device

    def uncapped_reason(self, device: str) -> str | None:
        """Why a budget cannot be imposed on ``device`` (so a run there cannot run out of
        memory and proves nothing), or ``None`` when it can. ``verify`` and ``run`` refuse such
        a device."""
        return None

    @abc.abstractmethod
    def default_device(self) -> str:
        """``'GPU:0'`` when the backend sees an accelerator, else ``'CPU:0'``."""

    @abc.abstractmethod
    def environment_info(self) -> dict[str, str]:
        """Versions measured with (Python, platform, the framework, Keras, NumPy)."""

    # -- worker processes (batchfit.workers calls these; the child side in the worker) ---------
    @abc.abstractmethod
    def data_sample(self, data: Any) -> Any:
        """A picklable sample of the user's ``data`` for a worker process."""

    @abc.abstractmethod
    def weights_bytes(self, model: Any) -> int:
        """Bytes of the model's own variables (no optimizer state)."""

    @abc.abstractmethod
    def worker_environment(self, device: str, budget_bytes: int | None) -> dict[str, str]:
        """Environment variables a worker needs before the framework is imported (the cap)."""

    def use_compile_cache(self, directory: str) -> None:
        """In a fresh worker, before anything is compiled: keep compiled XLA programs in
        ``directory`` and load them from there (the processes of one search compile the same
        step at the same sizes). Nothing by default."""

    @abc.abstractmethod
    def preload(self) -> None:
        """Import what every worker needs, starting no runtime (the fork server runs this)."""

    @abc.abstractmethod
    def configure_worker(self, device: str, budget_bytes: int | None) -> None:
        """In a fresh worker, before the model is built: make the device look like the budget."""

    def default_settings(self, device: str, budget_bytes: int | None) -> str | None:
        """How the framework runs by default on ``device`` where that differs from a
        worker's settings (:meth:`configure_worker`), in words; ``None`` where it does not.

        Where it differs, ``safe_batch_size`` is also confirmed under the defaults
        (:mod:`batchfit.verbs.safe_check`).
        """
        return None

    def configure_default(self, device: str, budget_bytes: int | None) -> None:
        """In a fresh worker, before the model is built: the budget's cap only, the
        framework's default settings otherwise (see :meth:`default_settings`)."""
        self.configure_worker(device, budget_bytes)

    @abc.abstractmethod
    def own_fit(self, model: Any, batch_fn: Any, batch_size: int, *, epochs: int, steps: int,
                device: str) -> dict[str, Any]:
        """Train ``model`` with its own ``fit`` at ``batch_size`` and report what happened.

        ``steps`` batches per epoch for ``epochs`` epochs from ``batch_fn``, then a validation
        pass of one batch at the same size, as a user's training does. Returns ``{"outcome":
        "fit" | "oom" | "error", "peak_bytes": int | None, "message": str}``: the allocator's
        peak on ``device`` over ``fit``, and the error's first line when it failed.
        """

    @abc.abstractmethod
    def framework_module(self) -> str:
        """The top-level module whose import starts the framework (``"tensorflow"``).

        An emulated process (``batchfit run``, :func:`batchfit.emulated_device`) gets
        :meth:`worker_environment` before it starts and :meth:`configure_worker` right after
        this module is first imported, as a probe worker does.
        """

    # -- noise (per-example gradient norms, for the gradient noise scale) ----------------------
    @abc.abstractmethod
    def example_sampler(self, data: Any, *, max_examples: int, seed: int) -> Any:
        """A sampler of the user's examples (``data``, or a ``'file.py:function'`` spec).

        It has ``num_examples``, ``notes`` (what reading the data found) and ``draw(size)``,
        which gives ``(x, y)`` of ``size`` examples drawn uniformly with replacement.

        Raises:
            InvalidInputError: no data, variable-shape examples, or fewer than 2 examples.
        """

    @abc.abstractmethod
    def gradient_norm_pairs(self, model: Any, sampler: Any, *, small: int, big: int,
                            count: int) -> tuple[Any, Any]:
        """``count`` pairs ``(mean |G_small|^2, |G_big|^2)`` of squared gradient norms.

        Each pair draws ``big`` examples from ``sampler`` and computes the gradient of the
        model's compiled loss on ``big / small`` micro-batches in training mode; returns two
        NumPy arrays. Every variable of ``model`` (weights, optimizer, BatchNorm statistics,
        seed states, metrics) holds its value from before the call afterwards.
        """

    @abc.abstractmethod
    def mixes_examples(self, model: Any) -> bool:
        """Whether a layer of ``model`` mixes a batch's examples in training (BatchNorm)."""

    # -- distribution --------------------------------------------------------------------------
    # A "strategy" here is the backend's own distribution object (a ``tf.distribute.Strategy``
    # on TensorFlow), or ``None`` for one device; every method takes ``None`` without
    # importing the framework.
    @abc.abstractmethod
    def resolve_distribute(self, distribute: Any, model: Any = None) -> Any:
        """The backend's strategy for ``distribute=`` (or the one ``model`` was built under)."""

    @abc.abstractmethod
    def is_multiworker(self, strategy: Any) -> bool:
        """Whether ``strategy`` spans several worker processes (hosts)."""

    @abc.abstractmethod
    def num_replicas(self, strategy: Any) -> int:
        """Replicas in sync under ``strategy`` (1 for ``None``)."""

    @abc.abstractmethod
    def distribute_name(self, strategy: Any) -> str:
        """``"mirrored"``, ``"multiworker"``, another strategy's class name, or ``""``."""

    @abc.abstractmethod
    def probe_device(self, strategy: Any) -> str:
        """The one device a per-replica probe runs on: ``"GPU:0"`` or ``"CPU:0"``."""

    @abc.abstractmethod
    def smallest_device_memory(self, strategy: Any) -> tuple[int | None, str]:
        """``(bytes, note)``: the memory of the smallest replica device on this host."""

    def distribute_scope(self, strategy: Any) -> contextlib.AbstractContextManager[Any]:
        """The context a model is built in to live under ``strategy`` (none for ``None``)."""
        return contextlib.nullcontext() if strategy is None else strategy.scope()

    # multi-worker collectives: what workers need to agree (every worker calls each of these)
    @abc.abstractmethod
    def make_strategy(self, timeout_seconds: float | None = None) -> Any:
        """A multi-worker strategy (from the environment) whose collectives time out.

        ``timeout_seconds``: the longest one collective may wait (``None``: the backend's
        default, 300 s on TensorFlow).
        """

    @abc.abstractmethod
    def worker_position(self, strategy: Any) -> tuple[int, int]:
        """``(this worker's index, number of workers)``; ``(0, 1)`` for one process."""

    @abc.abstractmethod
    def all_gather(self, strategy: Any, values: list[float], timeout: float | None) -> Any:
        """Every replica's ``values`` as a NumPy array ``(replicas, len(values))``, replicas
        ordered worker by worker; waits at most ``timeout`` seconds for the others."""

    @abc.abstractmethod
    def upstream_fit_works(self, strategy: Any, *, timeout: float = 120.0) -> bool:
        """Whether Keras's own ``model.fit`` trains under ``strategy`` on every worker (probed
        with one step of a one-unit model, agreed across workers, cached per strategy)."""

    @abc.abstractmethod
    def upstream_fit_failure(self, strategy: Any) -> str:
        """The error :meth:`upstream_fit_works`'s probe caught on this worker (``""`` if none)."""

    # -- throughput ----------------------------------------------------------------------------
    @abc.abstractmethod
    def timing_device(self, device: str | None) -> str:
        """The device throughput is timed on: ``device``, else the accelerator if any."""

    @abc.abstractmethod
    def measure_throughput(self, model: Any, batch_fn: BatchFn, sizes: list[int], plan: Any, *,
                           device: str, gpu_metrics: bool) -> tuple[list[Any], float]:
        """Time ``model``'s own training step at each size, leaving the model as it was.

        Args:
            model: the compiled model (under a strategy, sizes are global batches).
            batch_fn: ``batch_fn(b) -> (x, y)``.
            sizes: the batch sizes, ascending.
            plan: a :class:`~batchfit.core.throughput.TimingPlan` (windows, warm-up).
            device: where the steps run (see :meth:`timing_device`).
            gpu_metrics: sample the GPU's utilization and memory during the windows.

        Returns:
            ``(points, trace_seconds)``: a :class:`~batchfit.results.ThroughputPoint` per size
            in ``sizes`` order, and the seconds spent tracing (excluded from the timing).
        """

    # -- fit: the resilient fit's execution (decisions: batchfit.core.fit_control) -------------
    @abc.abstractmethod
    def check_fit_model(self, model: Any) -> None:
        """Refuse (:class:`~batchfit.errors.InvalidInputError`) a model ``fit`` cannot train."""

    @abc.abstractmethod
    def fit_strategy(self, distribute: Any, model: Any) -> Any:
        """The strategy ``fit`` trains under (``None``: one device), or a clear refusal."""

    @abc.abstractmethod
    def fit_inputs(self, x: Any, batch_size: int | None) -> tuple[Any, int | None]:
        """``(x, batch_size for the framework's fit)``: a dataset re-batched, arrays checked."""

    @abc.abstractmethod
    def run_fit(self, model: Any, x: Any, y: Any, *, control: Any, strategy: Any,
                fit_batch: int | None, logger: Any, fit_kwargs: dict[str, Any]
                ) -> tuple[Any, int]:
        """Train with the framework's ``fit`` loop, executing ``control``'s decisions.

        Returns ``(history, largest)``: the framework's history and the largest training
        batch that ran without the controller seeing it (0 when none).
        """

    @abc.abstractmethod
    def fit_multiworker_session(self, model: Any, strategy: Any, timeout: float | None) -> Any:
        """What ``fit_multiworker`` runs on: the model checked and built, a per-step trainer,
        the data helpers and the allocator's peak (see
        :class:`batchfit.backend.tensorflow.fit_multiworker.MultiWorkerSession`)."""

    # -- compile-time memory (the estimate issue) ---------------------------------------------
    def compiled_step_memory(self, model: Any, batch_size: int, *,
                             input_shapes: Any = None) -> Any:
        """The compiled training step's memory at ``batch_size``, by kind, without running it.

        Returns a :class:`~batchfit.results.estimate.CompiledStepMemory`: the model's variables
        (weights, optimizer state, other state, all resident outside the program), the batch,
        the program's temporaries (activations, gradients, workspace) and outputs not written
        in place. TensorFlow reads XLA's buffer assignment of ``train_step`` under
        ``tf.function(jit_compile=True)``; a JAX backend would read
        ``jax.jit(step).lower(...).compile().memory_analysis()`` (arguments split by their
        pytree, ``temp_size_in_bytes``, ``output_size_in_bytes - alias_size_in_bytes``).
        Nothing runs: the model's variables are unchanged.

        Raises:
            InvalidInputError: the step cannot be compiled (a layer XLA cannot compile, dynamic
                dimensions not given in ``input_shapes``).
            MissingBackendError: the backend cannot compile ahead of time.
        """
        raise MissingBackendError(
            f"compile-time memory is not implemented for the {self.name} backend yet")

    def step_jit_compiled(self, model: Any) -> bool:
        """Whether ``model``'s own training step would be XLA-compiled here (``"auto"``
        resolved as the framework resolves it)."""
        return False

    def set_step_jit(self, model: Any) -> bool:
        """Make ``model``'s training step XLA-compiled (``max --jit``, in a probe worker, before
        any step); return whether it now is (a layer may refuse)."""
        return False

    # -- check: the batch contract of layers (``batchfit check``) -----------------------------
    # The checks themselves (what is a finding, in which order they run) are
    # :mod:`batchfit.verbs.check`'s; a backend loads what to check and runs each operation.
    # Checks that only make sense on one framework are that backend's (:meth:`layer_checks`).

    def load_checkable(self, spec: str) -> Any:
        """A model or a layer from a spec (a factory may return either; compiling optional)."""
        raise MissingBackendError(f"batchfit check is not implemented for the {self.name} "
                                  "backend yet")

    def check_targets(self, obj: Any, input_shape: Any, sample: Any, notes: list[str],
                      skipped: list[tuple[str, str, str]] | None = None,
                      ) -> tuple[str, list[tuple[Any, Any]]]:
        """``(name, [(layer, layer_input), ...])``: the layers of ``obj`` (a model or a layer)
        to check, each with the input it gets, descending into nested functional and
        Sequential models; ``input_shape`` may name the model's inputs
        (``{"token_ids": (128,)}``) and reaches nested layers. Remarks go to ``notes``; each
        custom layer that cannot be checked goes to ``skipped`` as ``(name, class, reason)``."""
        raise MissingBackendError(f"batchfit check is not implemented for the {self.name} "
                                  "backend yet")

    def is_custom_layer(self, layer: Any) -> bool:
        """Whether ``layer``'s class is the user's (not the framework's own)."""
        raise MissingBackendError(f"batchfit check is not implemented for the {self.name} "
                                  "backend yet")

    def custom_layers(self, model: Any) -> list[Any]:
        """The custom layers of ``model``, inside nested functional/Sequential models too."""
        raise MissingBackendError(f"batchfit check is not implemented for the {self.name} "
                                  "backend yet")

    def layer_probe(self, layer: Any, layer_input: Any) -> Any:
        """The operations the checks run on one layer: calls at a batch size, the build with a
        ``None`` batch, a traced run, trace counts, the sample-mixing measurement, ``fit`` on a
        partial batch, and ``keep_state()`` (the layer restored afterwards)."""
        raise MissingBackendError(f"batchfit check is not implemented for the {self.name} "
                                  "backend yet")

    def layer_checks(self) -> tuple[str, ...]:
        """The framework-specific checks this backend runs (``batchfit check`` reports the
        others as not applicable): none by default."""
        return ()

    def quiet_check_logs(self) -> Any:
        """A context manager that silences the framework's retracing warnings."""
        import contextlib

        return contextlib.nullcontext()

    def check_environment(self) -> dict[str, str]:
        """Versions a check result records (Python, the framework, Keras, platform)."""
        return self.environment_info()


def configured_backend() -> str:
    """The Keras backend the user configured, read without importing Keras.

    ``KERAS_BACKEND`` first, then ``"backend"`` in ``$KERAS_HOME/keras.json`` (default
    ``~/.keras/keras.json``), then Keras's default, ``"tensorflow"``.
    """
    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name.strip().lower()
    home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    try:
        config = json.loads((Path(home) / "keras.json").read_text(encoding="utf-8"))
        name = config.get("backend") if isinstance(config, dict) else None
    except (OSError, ValueError):
        name = None
    return str(name).strip().lower() if name else "tensorflow"


def backend_name(name: str | None = None) -> str:
    """The supported backend ``name`` (default: :func:`configured_backend`), checked.

    Raises:
        MissingBackendError: the backend is one batchfit has no implementation for.
    """
    chosen = (name or configured_backend()).strip().lower()
    if chosen not in SUPPORTED_BACKENDS:
        where = "" if name else " (set by KERAS_BACKEND or keras.json)"
        raise MissingBackendError(
            f"the Keras backend {chosen!r}{where} is not supported by batchfit yet: it measures "
            f"with {', '.join(SUPPORTED_BACKENDS)}; set "
            f"{' or '.join(f'KERAS_BACKEND={n}' for n in SUPPORTED_BACKENDS)} "
            f"(the CLI: --backend NAME)")
    return chosen


def require_backend(name: str | None = None) -> str:
    """Check the backend's framework is installed, without importing it; returns its name.

    Raises:
        MissingBackendError: it is not installed (the message gives the install command).
    """
    chosen = backend_name(name)
    module = _FRAMEWORK_MODULE[chosen]
    if importlib.util.find_spec(module) is None:
        raise MissingBackendError(
            f"batchfit needs {module} for the Keras {chosen} backend, and it is not installed: "
            f"{INSTALL_HINTS[chosen]}")
    return chosen


def use_backend(name: str) -> str:
    """Make ``name`` the Keras backend of this process (and of the workers it starts).

    Sets ``KERAS_BACKEND``, which Keras reads once, when it is first imported: call this
    before importing ``keras`` (the CLI's ``--backend`` does).

    Raises:
        MissingBackendError: ``name`` is not supported (exit 2).
        InvalidInputError: Keras was already imported with another backend.

    Example:

    >>> import os
    >>> use_backend(os.environ.get("KERAS_BACKEND") or "tensorflow") in SUPPORTED_BACKENDS
    True
    """
    import sys

    chosen = backend_name(name)
    keras = sys.modules.get("keras")
    config = getattr(keras, "config", None)
    active = config.backend() if config is not None else None
    if active is not None and active != chosen:
        from ..errors import InvalidInputError

        raise InvalidInputError(
            f"Keras was already imported with the {active!r} backend: set "
            f"KERAS_BACKEND={chosen} before importing keras (or before batchfit imports it)")
    os.environ["KERAS_BACKEND"] = chosen
    return chosen


_INSTANCES: dict[str, Backend] = {}


#: Where each backend's ``NoiseScaleMonitor`` (a Keras callback) lives.
_NOISE_MONITORS = {"tensorflow": "batchfit.backend.tensorflow.noise",
                   "jax": "batchfit.backend.jax.noise_monitor"}


def noise_monitor_class() -> type:
    """The active backend's ``NoiseScaleMonitor`` (public as ``batchfit.NoiseScaleMonitor``)."""
    return importlib.import_module(  # type: ignore[no-any-return]
        _NOISE_MONITORS[require_backend(None)]).NoiseScaleMonitor


def get_backend(name: str | None = None) -> Backend:
    """The implementation of the active (or named) Keras backend.

    Args:
        name: ``"tensorflow"`` or ``"jax"``; default: the configured backend
            (:func:`configured_backend`).

    Raises:
        MissingBackendError: the backend is unsupported or its framework is not installed.
    """
    chosen = require_backend(name)
    if chosen not in _INSTANCES:
        module, cls = _IMPLEMENTATIONS[chosen]
        _INSTANCES[chosen] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[chosen]


__all__ = ["SUPPORTED_BACKENDS", "Backend", "backend_name", "configured_backend",
           "get_backend", "is_oom_error", "require_backend", "use_backend"]
