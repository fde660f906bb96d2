"""The TensorFlow implementation of the backend seam, and the only package that imports it.

:class:`TensorFlowBackend` implements :class:`batchfit.backend.Backend` by delegating to the
modules of this package: :mod:`.loader` (specs, factories, saved models), :mod:`.synth`
(batches synthesized from a model's input specs and loss), :mod:`.data` (batches from the
user's sample), :mod:`.probe` (training steps measured at one batch size, the model restored
after), :mod:`.noise` (per-example gradient norms, the noise-scale callback),
:mod:`.distribute` (``tf.distribute`` strategies), :mod:`.collective` (what workers need to
agree) and :mod:`.throughput` (the model's own training step timed at several batch sizes).
Constructing it imports nothing; each method imports what it needs.

Example:

>>> from batchfit.backend import get_backend
>>> get_backend().name
'tensorflow'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ...core.settle import LIMIT_MARGIN
from .. import Backend, BatchFn

MiB = 1 << 20


class TensorFlowBackend(Backend):
    """Keras 3 on TensorFlow: probes through ``train_on_batch`` and TensorFlow's allocator."""

    name = "tensorflow"

    # -- models and data ---------------------------------------------------------------------
    def is_model(self, obj: Any) -> bool:
        return hasattr(obj, "train_on_batch") and hasattr(obj, "variables")

    def check_model(self, model: Any) -> None:
        from .loader import check_model

        check_model(model)

    def load_model(self, spec: str) -> Any:
        from .loader import load_model

        return load_model(spec)

    def model_from_factory(self, factory: Callable[[], Any], where: str | None = None) -> Any:
        from .loader import model_from_factory

        return model_from_factory(factory, where)

    def load_data(self, spec: str) -> Any:
        from .loader import load_data

        return load_data(spec)

    def make_batch_fn(self, model: Any, data: Any, input_shapes: Any,
                      seed: int) -> tuple[BatchFn, list[str]]:
        from .synth import batch_fn_for

        return batch_fn_for(model, data, input_shapes, seed, self.load_data)

    def data_sample(self, data: Any) -> Any:
        """A picklable sample of ``data`` (arrays, a ``tf.data.Dataset``...) for a worker."""
        from .data import DataSample

        return DataSample.from_data(data)

    # -- probing -------------------------------------------------------------------------------
    def probe_runner(self, model: Any, batch_fn: BatchFn, *, steps: int, device: str,
                     budget_bytes: int | None, limit_margin: float = LIMIT_MARGIN,
                     own_model: bool = False) -> Any:
        from .probe import ProbeRunner

        return ProbeRunner(model, batch_fn, steps=steps, device=device,
                           budget_bytes=budget_bytes, limit_margin=limit_margin,
                           own_model=own_model)

    def state_bytes(self, model: Any) -> int:
        from .probe import state_bytes

        return state_bytes(model)

    def weights_bytes(self, model: Any) -> int:
        """Bytes of the model's own variables (no optimizer state)."""
        from .probe import weights_bytes

        return weights_bytes(model)

    def default_device(self) -> str:
        import tensorflow as tf

        return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"

    def environment_info(self) -> dict[str, str]:
        import platform
        import sys

        import keras
        import numpy
        import tensorflow as tf

        return {"python": sys.version.split()[0], "platform": platform.platform(),
                "backend": "tensorflow", "tensorflow": tf.__version__,
                "keras": keras.__version__, "numpy": numpy.__version__}

    # -- worker processes ------------------------------------------------------------------------
    def worker_environment(self, device: str, budget_bytes: int | None) -> dict[str, str]:
        """Environment variables the worker needs before importing TensorFlow.

        On CPU with a budget: the BFC allocator cap (oneDNN off, since with oneDNN on the step after
        an OOM can segfault; see the project's memory notes). GPUs are hidden from a CPU worker.
        Python's hash seed is fixed (with the address-space layout, see :func:`_fix_layout_and_reexec`): the
        order in which a traced step's ops run, and so its peak memory, follows set and dict order.
        """
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore", "PYTHONHASHSEED": "0"}
        if device.upper().startswith("CPU"):
            env["CUDA_VISIBLE_DEVICES"] = "-1"
            # The BFC allocator also keeps the statistics probes read; the default CPU allocator
            # keeps none on some machines.
            env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
            if budget_bytes is not None:
                mib = max(1, budget_bytes // MiB)
                env.update({"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPU_BFC_MEM_LIMIT_IN_MB": str(mib),
                            # One thread per op (and one op at a time, set in the worker): with
                            # the default thread pool the same size near the cap fitted in one
                            # fresh process and not in the next over a band of ~4% (seed_wide at
                            # 64 MiB: 238-248); with one thread, ~1% (240 fitted 3/3, 241 2/3,
                            # 242 and above 0/3), measured.
                            "TF_NUM_INTRAOP_THREADS": "1"})
        return env

    def use_compile_cache(self, directory: str) -> None:
        """TensorFlow's persistent XLA cache (``TF_XLA_FLAGS=--tf_xla_persistent_cache_
        directory``), read when XLA first compiles, so it takes effect after the import too.
        A directory the user's own ``TF_XLA_FLAGS`` names is kept.

        Measured (the example CNN under 128 MiB, ``max --jit``): a process's first step at a
        size another process had compiled took 0.5 s instead of 2.9 s; the executable is
        loaded, not compiled again, so its buffers are the same.
        """
        flags = os.environ.get("TF_XLA_FLAGS", "")
        if "tf_xla_persistent_cache_directory" not in flags:
            os.environ["TF_XLA_FLAGS"] = (
                f"{flags} --tf_xla_persistent_cache_directory={directory}").strip()

    def preload(self) -> None:
        """Import what every worker needs, starting no runtime (the fork server runs this)."""
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        from . import probe  # noqa: F401

    def configure_worker(self, device: str, budget_bytes: int | None) -> None:
        """In a fresh worker, before the model is built: make the device look like the budget.

        A GPU gets a logical device of ``budget_bytes``. A capped CPU runs one op at a time, as a
        GPU's single compute stream does: with several inter-op threads, an allocation refused
        near the cap waits (up to 10 s) for a concurrent op to free memory, so whether a size
        fits depends on thread timing (measured: the same size fitting in one process and not in
        the next, and probes of 60-130 s near the limit); and its allocator holds its whole
        budget as one region (:func:`_reserve_single_region`).
        """
        import tensorflow as tf

        if device.upper().startswith("GPU"):
            gpus = tf.config.list_physical_devices("GPU")
            if budget_bytes is not None and gpus:
                tf.config.set_logical_device_configuration(
                    gpus[0], [tf.config.LogicalDeviceConfiguration(
                        memory_limit=max(1, budget_bytes // MiB))])
        if device.upper().startswith("CPU") and budget_bytes is not None:
            tf.config.threading.set_inter_op_parallelism_threads(1)
            _reserve_single_region(tf, budget_bytes)

    def default_settings(self, device: str, budget_bytes: int | None) -> str | None:
        if not device.upper().startswith("CPU") or budget_bytes is None:
            return None
        return ("TensorFlow's default CPU settings (ops side by side, several threads each, "
                "the allocator growing region by region)")

    def configure_default(self, device: str, budget_bytes: int | None) -> None:
        """The cap only (set in the environment): TensorFlow's own thread pools (the worker
        environment's one intra-op thread is dropped before the runtime starts) and region
        growth."""
        os.environ.pop("TF_NUM_INTRAOP_THREADS", None)

    def framework_module(self) -> str:
        return "tensorflow"

    def own_fit(self, model: Any, batch_fn: BatchFn, batch_size: int, *, epochs: int,
                steps: int, device: str) -> dict[str, Any]:
        from .own_fit import own_fit

        return own_fit(model, batch_fn, batch_size, epochs=epochs, steps=steps, device=device)

    # -- noise (per-example gradient norms, for the gradient noise scale) ----------------------
    def example_sampler(self, data: Any, *, max_examples: int, seed: int) -> Any:
        from .noise import ExampleSampler

        return ExampleSampler(data, max_examples=max_examples, seed=seed)

    def gradient_norm_pairs(self, model: Any, sampler: Any, *, small: int, big: int,
                            count: int) -> tuple[Any, Any]:
        from .noise import gradient_norm_pairs

        return gradient_norm_pairs(model, sampler, small=small, big=big, count=count)

    def mixes_examples(self, model: Any) -> bool:
        from .noise import mixes_examples

        return mixes_examples(model)

    # -- distribution --------------------------------------------------------------------------
    def resolve_distribute(self, distribute: Any, model: Any = None) -> Any:
        from .distribute import resolve_strategy

        return resolve_strategy(distribute, model)

    def is_multiworker(self, strategy: Any) -> bool:
        if strategy is None:
            return False
        from .distribute import is_multiworker

        return is_multiworker(strategy)

    def num_replicas(self, strategy: Any) -> int:
        if strategy is None:
            return 1
        from .distribute import num_replicas

        return num_replicas(strategy)

    def distribute_name(self, strategy: Any) -> str:
        if strategy is None:
            return ""
        from .distribute import distribute_name

        return distribute_name(strategy)

    def probe_device(self, strategy: Any) -> str:
        from .distribute import probe_device

        return probe_device(strategy)

    def smallest_device_memory(self, strategy: Any) -> tuple[int | None, str]:
        from .distribute import smallest_device_memory

        return smallest_device_memory(strategy)

    # multi-worker collectives
    def make_strategy(self, timeout_seconds: float | None = None) -> Any:
        from .distribute import DEFAULT_TIMEOUT, make_strategy

        return make_strategy(DEFAULT_TIMEOUT if timeout_seconds is None else timeout_seconds)

    def worker_position(self, strategy: Any) -> tuple[int, int]:
        from .collective import worker_position

        return worker_position(strategy)

    def all_gather(self, strategy: Any, values: list[float], timeout: float | None) -> Any:
        from .collective import all_gather

        return all_gather(strategy, values, timeout)

    def upstream_fit_works(self, strategy: Any, *, timeout: float = 120.0) -> bool:
        from .collective import upstream_fit_works

        return upstream_fit_works(strategy, timeout=timeout)

    def upstream_fit_failure(self, strategy: Any) -> str:
        from .collective import upstream_fit_failure

        return upstream_fit_failure(strategy)

    # -- throughput ----------------------------------------------------------------------------
    def timing_device(self, device: str | None) -> str:
        from .probe import memory_device

        return memory_device(device)

    def measure_throughput(self, model: Any, batch_fn: BatchFn, sizes: list[int], plan: Any, *,
                           device: str, gpu_metrics: bool) -> tuple[list[Any], float]:
        from .throughput import measure_throughput

        return measure_throughput(model, batch_fn, sizes, plan, device=device,
                                  gpu_metrics=gpu_metrics)

    # -- check: the batch contract of layers ---------------------------------------------------
    def load_checkable(self, spec: str) -> Any:
        from .check_targets import load_checkable

        return load_checkable(spec)

    def check_targets(self, obj: Any, input_shape: Any, sample: Any, notes: list[str],
                      skipped: list[tuple[str, str, str]] | None = None,
                      ) -> tuple[str, list[tuple[Any, Any]]]:
        from .check_targets import check_targets

        return check_targets(obj, input_shape, sample, notes, skipped)

    def is_custom_layer(self, layer: Any) -> bool:
        from .check_targets import is_custom_layer

        return is_custom_layer(layer)

    def custom_layers(self, model: Any) -> list[Any]:
        from .check_targets import custom_layers

        return custom_layers(model)

    def layer_probe(self, layer: Any, layer_input: Any) -> Any:
        from .check_layer import LayerProbe

        return LayerProbe(layer, layer_input)

    def layer_checks(self) -> tuple[str, ...]:
        """``export`` (SavedModel) and ``retracing`` (tf.function traces)."""
        return ("export", "retracing")

    def quiet_check_logs(self) -> Any:
        from .check_layer import quiet_retracing_warnings

        return quiet_retracing_warnings()

    def check_environment(self) -> dict[str, str]:
        import platform

        import keras
        import tensorflow as tf

        return {"python": platform.python_version(), "backend": "tensorflow",
                "tensorflow": tf.__version__, "keras": keras.__version__,
                "platform": platform.platform()}


    # -- fit: the resilient fit's execution (decisions: batchfit.core.fit_control) -------------
    def check_fit_model(self, model: Any) -> None:
        from .fitting import check_fit_model

        check_fit_model(model)

    def fit_strategy(self, distribute: Any, model: Any) -> Any:
        from .fitting import fit_strategy

        return fit_strategy(distribute, model)

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
        from .fit_multiworker import MultiWorkerSession

        return MultiWorkerSession(model, strategy, timeout)

    # -- compile-time memory -------------------------------------------------------------------
    def compiled_step_memory(self, model: Any, batch_size: int, *,
                             input_shapes: Any = None) -> Any:
        from .compiled import compiled_step_memory

        return compiled_step_memory(model, batch_size, input_shapes=input_shapes)

    def step_jit_compiled(self, model: Any) -> bool:
        from .compiled import step_jit_compiled

        return step_jit_compiled(model)

    def set_step_jit(self, model: Any) -> bool:
        from .compiled import step_jit_compiled

        model.jit_compile = True  # Keras resets its train function; a refusing layer warns
        return step_jit_compiled(model)


def _reserve_single_region(tf: Any, budget_bytes: int) -> None:  # pragma: no cover - subprocess
    """Make the capped CPU allocator hold its whole budget as one region, as a GPU does.

    TensorFlow's CPU BFC allocator grows by regions (2 MiB, then doubling) and never merges
    them, so which batch fits would depend on which sizes ran before (a big tensor cannot span
    two regions). A GPU's allocator (``allow_growth`` off, TensorFlow's default) reserves its
    memory as one region at start. Allocating, then freeing, one tensor of nearly the whole
    budget gives the CPU allocator that same single region before the model is built.
    """
    free = budget_bytes
    try:
        free = budget_bytes - int(tf.config.experimental.get_memory_info("CPU:0")["current"])
    except (ValueError, RuntimeError):
        pass
    size = max(0, free - (4 << 20))
    if size:
        with tf.device("CPU:0"):
            block = tf.zeros([size], dtype=tf.uint8)
        del block

