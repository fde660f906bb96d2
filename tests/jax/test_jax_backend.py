"""The JAX backend's plumbing: chosen by KERAS_BACKEND, models and batches through the shared
Keras module, clear refusals (a GPU that is not there, a verb not implemented on JAX yet), and
the seed's layers rewritten with keras.ops training in a jitted step."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from batchfit.backend import SUPPORTED_BACKENDS, get_backend, use_backend
from batchfit.backend.jax import JaxBackend
from batchfit.errors import InvalidInputError, MissingBackendError
from batchfit.examples import models, portable


def test_the_configured_backend_is_the_jax_implementation() -> None:
    backend = get_backend()
    assert isinstance(backend, JaxBackend) and backend.name == "jax"
    assert get_backend("jax") is backend and "jax" in SUPPORTED_BACKENDS
    info = backend.environment_info()
    assert info["backend"] == "jax" and info["jax"] and info["keras"] == keras.__version__
    assert "no step ran under the budget" in info["memory_source"]  # CPU: compile-time
    assert backend.default_device() == "CPU:0"


def test_a_spec_loads_synthesizes_and_trains_through_the_shared_keras_module() -> None:
    backend = get_backend()
    model = backend.load_model("batchfit.examples.models:demo_model")
    assert any(isinstance(layer, portable.MyCustomLayer) for layer in model.layers)
    batch_fn, notes = backend.make_batch_fn(model, None, None, seed=0)
    x, y = batch_fn(4)
    assert x.shape == (4, 32, 32, 3) and y.shape == (4, 1)
    assert any("image" in n for n in notes)
    assert np.isfinite(model.train_on_batch(x, y))
    assert backend.state_bytes(model) > backend.weights_bytes(model) > 0


def test_a_gpu_that_jax_does_not_see_is_bad_input() -> None:
    backend = get_backend()
    with pytest.raises(InvalidInputError, match="JAX sees no GPU") as info:
        backend.check_device("GPU:0")
    assert "--device CPU:0" in str(info.value)
    assert backend.check_device("cpu") == "CPU:0"


def test_switching_keras_backend_after_import_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="already imported with the 'jax' backend"):
        use_backend("tensorflow")
    assert use_backend("jax") == "jax"


@pytest.mark.parametrize("call", [
    lambda b: b.upstream_fit_works(None),
    lambda b: b.make_strategy(),
])
def test_what_is_not_on_jax_yet_says_so(call) -> None:
    with pytest.raises(MissingBackendError, match="not implemented on the jax backend yet"):
        call(get_backend())


def test_the_memory_aware_seed_layer_checks_the_batch_inside_the_jitted_step() -> None:
    """The keras.ops rewrite of the seed's Python ``if``: on JAX the batch size is a Python int
    in the compiled step, so the check works there (TensorFlow needs run_eagerly)."""
    model = models.seed_memory_aware(limit=8)
    assert not model.run_eagerly
    ones = np.ones((8, 16), "float32")
    assert np.isfinite(model.train_on_batch(ones, np.ones((8, 1), "float32")))
    with pytest.raises(ValueError, match="Batch size 9 exceeds maximum allowed 8"):
        model.train_on_batch(np.ones((9, 16), "float32"), np.ones((9, 1), "float32"))


@pytest.mark.parametrize("name", ["seed_mlp", "seed_sequence", "transformer"])
def test_the_example_models_train_on_jax(name) -> None:
    backend = get_backend()
    model = backend.load_model(f"batchfit.examples.models:{name}")
    x, y = backend.make_batch_fn(model, None, None, seed=0)[0](3)
    assert np.isfinite(model.train_on_batch(x, y))


def test_a_gpu_worker_gets_a_pool_of_the_budget_and_this_process_none() -> None:
    import os

    from batchfit.backend.jax import gpu_budget_environment

    backend = get_backend()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # set by the backend here
    env = gpu_budget_environment(8 << 30, total_bytes=80 << 30)
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "true",
                   "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1000"}
    # the whole device (memory= not given): at most 95%, the CUDA context needs the rest
    assert gpu_budget_environment(80 << 30, total_bytes=80 << 30)[
        "XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9500"
    with pytest.raises(InvalidInputError, match="exceeds the GPU"):
        gpu_budget_environment(90 << 30, total_bytes=80 << 30)
    # No NVML on this machine: a GPU budget cannot be sized, said instead of guessed
    with pytest.raises(InvalidInputError, match="nvidia-ml-py"):
        backend.worker_environment("GPU:0", 1 << 30)
    assert backend.worker_environment("CPU:0", 1 << 30)["JAX_PLATFORMS"] == "cpu"


@pytest.mark.timeout(300)
def test_fresh_probe_processes_load_the_step_an_earlier_one_compiled() -> None:
    from pathlib import Path

    from batchfit.workers.worker import ModelSource, ProbeWorker, WorkerConfig

    worker = ProbeWorker(WorkerConfig(ModelSource.from_model("batchfit.examples.models:cnn")),
                         fresh_each_probe=True)
    try:
        worker.start()
        cache = Path(worker.config.compile_cache)
        assert worker.probe(16).fits and worker.probe(16).fits
        compiled = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
        assert compiled, "no compiled program was kept"
        assert worker.probe(16).fits  # a third fresh process loads, compiles and writes nothing
        assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == compiled
    finally:
        worker.close()
    assert not cache.exists()
