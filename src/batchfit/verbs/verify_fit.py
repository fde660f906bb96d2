"""``batchfit verify``: does training at this batch size fit the device, every time?

Each run is a fresh process under the emulated device (:mod:`batchfit.emulation`, what
``batchfit run --memory ...`` gives a user's own script) that builds the model and calls its
own ``model.fit``: ``steps`` batches per epoch and a validation pass at the same batch size.
A size the search answered should train in every run; one out-of-memory error in ``repeats``
runs says the answer is not safe to train with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..backend import get_backend
from ..core.settle import PROBE_STEPS
from ..core.sizes import parse_size
from ..core.validate import check_int
from ..errors import InvalidInputError, ModelLoadError
from ..results.verify import VerifyResult, VerifyRun
from .resolve import validate_model_arg

__all__ = ["verify_batch_size"]


def _label(model: Any) -> str:
    if isinstance(model, str):
        return model
    return str(getattr(model, "__qualname__", None) or getattr(model, "name", None)
               or type(model).__name__)


def _job(model: Any, batch_size: int, *, data: Any, input_shapes: Any, epochs: int,
         steps: int, seed: int) -> dict[str, Any]:
    from ..workers.worker import ModelSource

    validate_model_arg(model)
    try:
        source = ModelSource.from_model(model)
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(
            f"the model cannot be sent to a fresh process ({type(exc).__name__}: {exc}); pass "
            f"a module-level factory function or a spec 'file.py:factory'") from exc
    payload = data
    if data is not None and not isinstance(data, str):
        payload = get_backend().data_sample(data)
    return {"source": source, "data": payload, "input_shapes": input_shapes,
            "batch_size": batch_size, "epochs": epochs, "steps": steps, "seed": seed}


#: epochs a verification trains by default, of :data:`VERIFY_BATCHES` batches (30 steps): a
#: step's peak creeps up for ~15 steps before it settles (see :mod:`batchfit.core.settle`), so
#: one epoch of 4 batches passed sizes that longer training does not (ResNet50 at 22 under 512
#: MiB: 2 of 3 with 4 batches, out of memory in 2 of 2 probes of 8 steps)
VERIFY_EPOCHS = 6
#: batches per epoch: as many as a probe's epoch (4 until session 15). The data go in as arrays,
#: held whole in the capped allocator (see :mod:`batchfit.backend.tensorflow.own_fit`), so more
#: batches would cost memory the probes did not count (16 batches of the CNN of the examples at
#: 140 are 26 MiB of a 128 MiB cap); and with fewer than 5 the data pipeline stops fetching
#: beside the step, which then needs less (see :data:`batchfit.core.settle.PROBE_STEPS`).
VERIFY_BATCHES = PROBE_STEPS


def verify_batch_size(model: Any, batch_size: int, memory: str | int = "512MiB", *,
                      data: Any = None, input_shapes: Any = None, epochs: int = VERIFY_EPOCHS,
                      steps: int = VERIFY_BATCHES, repeats: int = 3, device: str = "CPU:0",
                      seed: int = 0, timeout: float = 900.0,
                      on_run: Callable[[VerifyRun], None] | None = None) -> VerifyResult:
    """Train with the model's own ``fit`` at ``batch_size`` in ``repeats`` fresh processes.

    Every process runs under the device the probes emulate (the allocator capped at
    ``memory``, the probes' thread and region settings: see :func:`batchfit.emulated_device`),
    builds the model, and calls ``model.fit`` for ``epochs`` epochs of ``steps`` batches with
    ``validation_data`` of one batch at the same size.

    Args:
        model: a spec (``"file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``),
            a module-level factory, or a compiled model (sent to the process pickled).
        batch_size: the size to train with.
        memory: the device's memory, e.g. ``"512MiB"``.
        data: ``(x, y)``, a ``tf.data.Dataset`` or a ``"file.py:function"`` spec; ``None``
            synthesizes data from the model's inputs and loss, as the probes do.
        input_shapes: lengths of ``None`` dimensions when synthesizing (as for ``max``).
        epochs: epochs per run (default :data:`VERIFY_EPOCHS`, 6).
        steps: training batches per epoch (default :data:`VERIFY_BATCHES`, 5).
        repeats: fresh processes.
        device: the device to emulate.
        seed: the seed of synthesized data.
        timeout: seconds one run may take.
        on_run: called with each run as it ends.

    Returns:
        A :class:`~batchfit.results.verify.VerifyResult`: ``fitted`` of ``len(runs)``, each
        run's peak, and the margin to the budget.

    Raises:
        InvalidInputError: a bad argument, or a model that cannot be sent to a process.
        ModelLoadError: the model could not be built in the fresh process.

    Example:

    >>> r = verify_batch_size("batchfit.examples.models:seed_mlp", 32, "64MiB",
    ...                       repeats=1)  # doctest: +SKIP
    >>> r.all_fit, r.fitted  # doctest: +SKIP
    (True, 1)
    """
    from ..emulation import run_fit_job

    batch_size = int(check_int("batch_size", batch_size))  # type: ignore[arg-type]
    epochs = int(check_int("epochs", epochs))  # type: ignore[arg-type]
    steps = int(check_int("steps", steps))  # type: ignore[arg-type]
    repeats = int(check_int("repeats", repeats))  # type: ignore[arg-type]
    budget = parse_size(memory)
    if (reason := get_backend().uncapped_reason(device)) is not None:
        raise InvalidInputError(f"cannot verify on {device}: {reason}")
    job = _job(model, batch_size, data=data, input_shapes=input_shapes, epochs=epochs,
               steps=steps, seed=seed)
    t0 = time.perf_counter()
    runs: list[VerifyRun] = []
    notes: list[str] = []
    for _ in range(repeats):
        out = run_fit_job(job, budget, device, timeout=timeout)
        if out["outcome"] == "error" and out["message"].startswith("ModelLoadError"):
            raise ModelLoadError(out["message"].partition(": ")[2])
        notes = notes or list(out.get("notes") or [])
        run = VerifyRun(outcome=out["outcome"], peak_bytes=out.get("peak_bytes"),
                        seconds=float(out["seconds"]), message=out.get("message", ""))
        runs.append(run)
        if on_run is not None:
            on_run(run)
    if data is None:
        notes.insert(0, "synthetic data from the model's inputs and loss (as the probes use); "
                        "pass data for your own")
    return VerifyResult(model=_label(model), batch_size=batch_size, memory_budget_bytes=budget,
                        device=device.strip().upper(), epochs=epochs, runs=runs, steps=steps,
                        synthetic_data=data is None, notes=notes,
                        seconds=time.perf_counter() - t0)
