"""The JAX implementation of the backend seam (Keras 3 with ``KERAS_BACKEND=jax``).

:class:`JaxBackend` implements :class:`batchfit.backend.Backend`: models, data and synthesized
batches through :mod:`batchfit.backend.keras_common` (Keras-generic, shared with TensorFlow);
the model's own ``train_step`` jitted and run on a copy of its state (:mod:`.step`); probes
(:mod:`.probe`: real steps on a GPU, compile-time memory on a CPU), compile-time memory
(:mod:`.compiled`), throughput (:mod:`.throughput`), per-example gradient norms
(:mod:`.noise`), the layer checks (:mod:`.check_layer`) and the resilient fit
(:mod:`.fitting`: no donated state; arrays or datasets, one device or a
``DataParallel``). Multi-worker collectives are not implemented on JAX yet: they raise
:class:`~batchfit.errors.MissingBackendError` saying so. ``KERAS_BACKEND`` must be ``jax``
before Keras is imported (the CLI's ``--backend jax`` and :func:`batchfit.use_backend` set
it); :meth:`JaxBackend.worker_environment` passes it to worker processes.

Example:

>>> from batchfit.backend import get_backend
>>> get_backend("jax").name
'jax'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ...core.settle import LIMIT_MARGIN
from ...errors import InvalidInputError, MissingBackendError
from .. import Backend, BatchFn

MiB = 1 << 20
#: The largest share of a GPU a probe worker's pool takes (the rest: CUDA context, libraries).
MAX_POOL_FRACTION = 0.95


def _not_yet(what: str) -> MissingBackendError:
    return MissingBackendError(f"{what} is not implemented on the jax backend yet; use "
                               f"KERAS_BACKEND=tensorflow (see docs/jax.md)")


def check_keras_backend() -> None:
    """Refuse to measure with Keras on another backend than JAX (imported too early)."""
    import keras

    active = keras.config.backend()
    if active != "jax":
        raise InvalidInputError(
            f"Keras was imported with the {active!r} backend before batchfit chose jax: set "
            f"KERAS_BACKEND=jax before importing keras (or call batchfit.use_backend('jax') "
            f"first)")


class JaxBackend(Backend):
    """Keras 3 on JAX: the model's jitted ``train_step``, XLA's compile-time memory."""

    name = "jax"

    def __init__(self) -> None:
        # JAX preallocates 75% of a GPU when its client starts. This process (the CLI, the
        # user's) must not: the probe workers each preallocate a pool of the budget on the
        # same device. The user's own setting, and a worker's (its environment), win.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    # -- models and data ---------------------------------------------------------------------
    def is_model(self, obj: Any) -> bool:
        return hasattr(obj, "train_on_batch") and hasattr(obj, "variables")

    def check_model(self, model: Any) -> None:
        from ..keras_common import check_model

        check_model(model)

    def load_model(self, spec: str) -> Any:
        from ..keras_common import load_model

        check_keras_backend()
        return load_model(spec)

    def model_from_factory(self, factory: Callable[[], Any], where: str | None = None) -> Any:
        from ..keras_common import model_from_factory

        check_keras_backend()
        return model_from_factory(factory, where)

    def load_data(self, spec: str) -> Any:
        from ..keras_common import load_data

        return load_data(spec)

    def make_batch_fn(self, model: Any, data: Any, input_shapes: Any,
                      seed: int) -> tuple[BatchFn, list[str]]:
        from ..keras_common import batch_fn_for

        return batch_fn_for(model, data, input_shapes, seed, self.load_data)

    def data_sample(self, data: Any) -> Any:
        from ..keras_common import DataSample

        return DataSample.from_data(data)

    # -- probing -------------------------------------------------------------------------------
    def probe_runner(self, model: Any, batch_fn: BatchFn, *, steps: int, device: str,
                     budget_bytes: int | None, limit_margin: float = LIMIT_MARGIN,
                     own_model: bool = False) -> Any:
        from .probe import JaxProbeRunner

        return JaxProbeRunner(model, batch_fn, steps=steps, device=device,
                              budget_bytes=budget_bytes, limit_margin=limit_margin)

    def state_bytes(self, model: Any) -> int:
        opt = getattr(model, "optimizer", None)
        if opt is not None and not opt.built and model.built:
            opt.build(model.trainable_variables)
        seen: dict[int, Any] = {}
        for v in [*model.variables, *(getattr(opt, "variables", []) or []),
                  *model.metrics_variables]:
            seen.setdefault(id(v), v)
        return _bytes(seen.values())

    def weights_bytes(self, model: Any) -> int:
        return _bytes(model.variables)

    def check_device(self, device: str) -> str:
        return check_device(device)

    def default_device(self) -> str:
        import jax

        return "GPU:0" if jax.default_backend() in ("gpu", "cuda", "rocm") else "CPU:0"

    def environment_info(self) -> dict[str, str]:
        import platform
        import sys

        import jax
        import jaxlib
        import keras
        import numpy

        device = jax.devices()[0]
        info = {"python": sys.version.split()[0], "platform": platform.platform(),
                "backend": "jax", "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                "keras": keras.__version__, "numpy": numpy.__version__,
                "device": f"{device.platform}: {getattr(device, 'device_kind', '')}"}
        if device.platform == "cpu":
            info["memory_source"] = ("compile-time (XLA memory_analysis of the compiled "
                                     "train_step): no step ran under the budget")
        return info

    def check_environment(self) -> dict[str, str]:
        return self.environment_info()

    # -- worker processes ------------------------------------------------------------------------
    def worker_environment(self, device: str, budget_bytes: int | None) -> dict[str, str]:
        """``KERAS_BACKEND=jax``; on a GPU with a budget, XLA's preallocated pool sized to it
        (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device's memory, read through NVML)."""
        env = {"KERAS_BACKEND": "jax", "PYTHONWARNINGS": "ignore", "PYTHONHASHSEED": "0",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        if device.upper().startswith("CPU"):
            env["JAX_PLATFORMS"] = "cpu"
            return env
        env.update(gpu_budget_environment(budget_bytes))
        return env

    def use_compile_cache(self, directory: str) -> None:
        """JAX's persistent compilation cache in ``directory``, for every program (JAX keeps
        only those that took a second to compile by default; a probe's step compiles in
        less on small models), unless the user set a cache directory of their own."""
        import jax

        if jax.config.jax_compilation_cache_dir:
            return
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    def preload(self) -> None:
        import jax  # noqa: F401
        import keras  # noqa: F401

        from . import probe  # noqa: F401

    def configure_worker(self, device: str, budget_bytes: int | None) -> None:
        """The budget is set by the environment (the pool's size): nothing to do here."""
        check_keras_backend()

    def framework_module(self) -> str:
        return "jax"

    def uncapped_reason(self, device: str) -> str | None:
        from .probe import device_kind

        if device_kind(device) == "gpu":
            return None
        return ("JAX caps no memory on a CPU, so a run there could not run out of memory and "
                "would prove nothing. Use a GPU, or the tensorflow backend on CPU "
                "(`--backend tensorflow`), whose allocator is capped at the budget")

    def own_fit(self, model: Any, batch_fn: BatchFn, batch_size: int, *, epochs: int,
                steps: int, device: str) -> dict[str, Any]:
        from .own_fit import own_fit

        return own_fit(model, batch_fn, batch_size, epochs=epochs, steps=steps, device=device)

    # -- noise -----------------------------------------------------------------------------------
    def example_sampler(self, data: Any, *, max_examples: int, seed: int) -> Any:
        from ..keras_common.sampler import ExampleSampler

        return ExampleSampler(data, max_examples=max_examples, seed=seed)

    def gradient_norm_pairs(self, model: Any, sampler: Any, *, small: int, big: int,
                            count: int) -> tuple[Any, Any]:
        from .noise import gradient_norm_pairs

        return gradient_norm_pairs(model, sampler, small=small, big=big, count=count)

    def mixes_examples(self, model: Any) -> bool:
        import keras

        from ..keras_common import sublayers

        try:
            layers = sublayers(model) or []
        except Exception:  # noqa: BLE001 - a private API; the note is optional
            return False
        return any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)

    # -- distribution: keras.distribution.DataParallel over this host's devices -------------
    def resolve_distribute(self, distribute: Any, model: Any = None) -> Any:
        from .distribute import resolve_distribution

        return resolve_distribution(distribute, model)

    def is_multiworker(self, strategy: Any) -> bool:
        return False

    def num_replicas(self, strategy: Any) -> int:
        from .distribute import num_replicas

        return num_replicas(strategy)

    def distribute_name(self, strategy: Any) -> str:
        return "" if strategy is None else "data_parallel"

    def probe_device(self, strategy: Any) -> str:
        return self.default_device()

    def smallest_device_memory(self, strategy: Any) -> tuple[int | None, str]:
        from .distribute import smallest_device_memory

        return smallest_device_memory(strategy)

    def make_strategy(self, timeout_seconds: float | None = None) -> Any:
        raise _not_yet("multi-worker training")

    def worker_position(self, strategy: Any) -> tuple[int, int]:
        return 0, 1

    def all_gather(self, strategy: Any, values: list[float], timeout: float | None) -> Any:
        import numpy as np

        if strategy is None:
            return np.asarray([values], dtype=float)
        raise _not_yet("multi-worker training")

    def upstream_fit_works(self, strategy: Any, *, timeout: float = 120.0) -> bool:
        raise _not_yet("multi-worker training")

    def upstream_fit_failure(self, strategy: Any) -> str:
        return ""

    # -- throughput ----------------------------------------------------------------------------
    def timing_device(self, device: str | None) -> str:
        return check_device(device) if device else self.default_device()

    def measure_throughput(self, model: Any, batch_fn: BatchFn, sizes: list[int], plan: Any, *,
                           device: str, gpu_metrics: bool) -> tuple[list[Any], float]:
        from .distribute import resolve_distribution
        from .throughput import measure_throughput

        return measure_throughput(model, batch_fn, sizes, plan, device=device,
                                  gpu_metrics=gpu_metrics,
                                  distribution=resolve_distribution(None, model))

    # -- fit: the resilient fit (see .fitting) --------------------------------------------------
    def check_fit_model(self, model: Any) -> None:
        from .fitting import check_fit_model

        check_fit_model(model)

    def fit_strategy(self, distribute: Any, model: Any) -> Any:
        from .distribute import resolve_distribution

        return resolve_distribution(distribute, model)

    def fit_inputs(self, x: Any, batch_size: int | None) -> tuple[Any, int | None]:
        from .fitting import fit_inputs

        return fit_inputs(x, batch_size)

    def run_fit(self, model: Any, x: Any, y: Any, *, control: Any, strategy: Any,
                fit_batch: int | None, logger: Any, fit_kwargs: dict[str, Any]
                ) -> tuple[Any, int]:
        from .fitting import run_fit

        return run_fit(model, x, y, control=control, strategy=strategy, fit_batch=fit_batch,
                       logger=logger, fit_kwargs=fit_kwargs)

    def fit_multiworker_session(self, model: Any, strategy: Any, timeout: float | None) -> Any:
        raise _not_yet("multi-worker training")

    # -- compile-time memory -------------------------------------------------------------------
    def compiled_step_memory(self, model: Any, batch_size: int, *,
                             input_shapes: Any = None) -> Any:
        from .compiled import compiled_step_memory

        return compiled_step_memory(model, batch_size, input_shapes=input_shapes)

    def step_jit_compiled(self, model: Any) -> bool:
        return bool(getattr(model, "jit_compile", True)) and not model.run_eagerly

    # -- check ---------------------------------------------------------------------------------
    def load_checkable(self, spec: str) -> Any:
        from ..keras_common import load_checkable

        check_keras_backend()
        return load_checkable(spec)

    def check_targets(self, obj: Any, input_shape: Any, sample: Any, notes: list[str],
                      skipped: list[tuple[str, str, str]] | None = None,
                      ) -> tuple[str, list[tuple[Any, Any]]]:
        from ..keras_common import check_targets

        return check_targets(obj, input_shape, sample, notes, skipped)

    def is_custom_layer(self, layer: Any) -> bool:
        from ..keras_common import is_custom_layer

        return is_custom_layer(layer)

    def custom_layers(self, model: Any) -> list[Any]:
        from ..keras_common import custom_layers

        return custom_layers(model)

    def layer_probe(self, layer: Any, layer_input: Any) -> Any:
        from .check_layer import JaxLayerProbe

        return JaxLayerProbe(layer, layer_input)

    def layer_checks(self) -> tuple[str, ...]:
        """None of TensorFlow's: SavedModel export and tf.function traces are not JAX's (the
        partial batch's second compiled program is reported by ``partial_batch``)."""
        return ()


def check_device(device: str) -> str:
    """``device`` normalized (``'GPU:0'``), refused when JAX does not see it.

    Raises:
        InvalidInputError: a GPU asked for on a JAX without one (exit 2).
    """
    import jax

    d = device.upper()
    if d in ("CPU", "GPU"):
        d += ":0"
    if d.startswith("GPU") and jax.default_backend() not in ("gpu", "cuda", "rocm"):
        raise InvalidInputError(
            f"--device {device}: JAX sees no GPU here (its devices: "
            f"{', '.join(str(x) for x in jax.devices())}); install jax[cuda12] on a machine "
            f"with an NVIDIA GPU, or use --device CPU:0")
    return d


def gpu_budget_environment(budget_bytes: int | None,
                           total_bytes: int | None = None) -> dict[str, str]:
    """XLA's GPU pool preallocated at ``budget_bytes``: JAX takes the pool's size only as a
    fraction of the device's total (``XLA_PYTHON_CLIENT_MEM_FRACTION``), read through NVML.

    Raises:
        InvalidInputError: a budget, and the device's total unknown (no NVML).

    Example:

    >>> gpu_budget_environment(8 << 30, total_bytes=80 << 30)["XLA_PYTHON_CLIENT_MEM_FRACTION"]
    '0.1000'
    """
    from ..memory import gpu_total_bytes

    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    if budget_bytes is None:
        return env
    total = total_bytes if total_bytes is not None else gpu_total_bytes(0)[0]
    if not total:
        raise InvalidInputError(
            "a GPU budget on JAX is a share of the device's memory, and its total is unknown "
            "here: install nvidia-ml-py (pip install 'batchfit[gpu]') so NVML can read it")
    if budget_bytes > total:
        raise InvalidInputError(f"the budget ({budget_bytes} bytes) exceeds the GPU's memory "
                                f"({total} bytes)")
    # At most 95%: the CUDA context and libraries take their share outside the pool.
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(MAX_POOL_FRACTION, budget_bytes / total):.4f}"
    return env


def _bytes(variables: Any) -> int:
    import numpy as np

    total = 0
    for v in variables:
        total += int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize
    return total
