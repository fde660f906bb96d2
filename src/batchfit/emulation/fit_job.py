"""A fresh process under the emulated device that runs the model's own ``fit`` once.

Started by :func:`batchfit.emulation.run_fit_job` as ``python -c`` :data:`ENTRY` ``JOB OUT``
with the emulated environment (:func:`batchfit.emulation.emulation_environment`): it reads
the pickled job (model source, data, batch size, epochs, steps, seed), builds the model as a
probe worker does (the framework's import configures the device, through the start-up hook),
calls the backend's ``own_fit`` and writes the outcome as JSON to ``OUT``. Nothing here
imports a framework by name.

Example:

>>> "batchfit.emulation.fit_job" in ENTRY
True
"""

from __future__ import annotations

import json
import pickle
import sys
import warnings
from typing import Any

#: The job's command (``python -c ENTRY JOB OUT``).
ENTRY = "import sys; from batchfit.emulation.fit_job import main; main(sys.argv[1], sys.argv[2])"

__all__ = ["ENTRY", "main"]


def _run(job: dict[str, Any]) -> dict[str, Any]:
    from ..backend import get_backend
    from ..workers.child import build_model

    backend = get_backend()
    model = build_model(job["source"])
    batch_fn, notes = backend.make_batch_fn(model, job["data"], job["input_shapes"],
                                            job["seed"])
    out = backend.own_fit(model, batch_fn, job["batch_size"], epochs=job["epochs"],
                          steps=job["steps"], device=job["device"])
    out["notes"] = list(notes)
    return out


def main(job_path: str, out_path: str) -> None:  # pragma: no cover - in the child process
    """Run the job at ``job_path``; write its outcome to ``out_path``."""
    warnings.simplefilter("ignore")
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    try:
        out = _run(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        from ..backend import is_oom_error
        from ..errors import error_line

        out = {"outcome": "oom" if is_oom_error(exc) else "error", "peak_bytes": None,
               "message": f"{type(exc).__name__}: {error_line(exc, limit=300)}",
               "notes": []}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)
    sys.stdout.flush()
