"""The child side of an emulated device: configure the framework the moment it is imported.

A process started by ``batchfit run`` (or re-executed by :func:`batchfit.emulated_device`)
carries :data:`ENV_VAR`, a JSON object ``{"module", "device", "budget_bytes"}``, and has the
directory of this package's ``site/sitecustomize.py`` first on ``PYTHONPATH``. Python imports
that ``sitecustomize`` at start-up (for ``python script.py``, ``python -m pkg``, ``python -c``
alike), which calls :func:`install`: a one-shot import hook that, when ``module`` (the
framework, e.g. ``tensorflow``) has finished importing, calls the backend's
``configure_worker(device, budget_bytes)``, exactly as a probe worker does after its import.
Nothing here imports a framework by name; a command that is not Python ignores all of it.

Example:

>>> import json
>>> json.loads(encode("tensorflow", "CPU:0", 1 << 29))["budget_bytes"]
536870912
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any

#: The environment variable naming what to emulate (JSON; see :func:`encode`).
ENV_VAR = "BATCHFIT_EMULATE"

__all__ = ["ENV_VAR", "decode", "encode", "install"]


def encode(module: str, device: str, budget_bytes: int) -> str:
    """The value of :data:`ENV_VAR` for a device of ``budget_bytes`` emulated on ``device``."""
    return json.dumps({"module": module, "device": device, "budget_bytes": int(budget_bytes)})


def decode(value: str | None) -> dict[str, Any] | None:
    """The parsed :data:`ENV_VAR` value, or ``None`` when absent or malformed."""
    if not value:
        return None
    try:
        spec = json.loads(value)
        return {"module": str(spec["module"]), "device": str(spec["device"]),
                "budget_bytes": int(spec["budget_bytes"])}
    except (ValueError, KeyError, TypeError):
        return None


def _configure(device: str, budget_bytes: int) -> None:
    try:
        from ..backend import get_backend

        get_backend().configure_worker(device, budget_bytes)
    except Exception as exc:  # noqa: BLE001 - the user's program goes on, told plainly
        print(f"batchfit: could not configure the emulated device {device} "
              f"({type(exc).__name__}: {exc}); only the allocator cap applies",
              file=sys.stderr, flush=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``action`` once, right after the top-level ``module`` has been executed."""

    def __init__(self, module: str, action: Callable[[], None]) -> None:
        self.module, self.action = module, action

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.module:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)   # one shot; and find the real spec without us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, action = spec.loader, self.action
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            action()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install(environ: Any = None) -> bool:
    """Install the hook :data:`ENV_VAR` asks for; ``False`` when it asks for nothing.

    When the framework is already imported, it is configured at once.
    """
    spec = decode((os.environ if environ is None else environ).get(ENV_VAR))
    if spec is None:
        return False
    module = spec["module"]

    def action() -> None:
        _configure(spec["device"], spec["budget_bytes"])

    if module in sys.modules:
        action()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(module, action))
    return True
