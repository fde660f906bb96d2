"""Imported by Python at start-up in a process under ``batchfit run`` (this directory is first
on its ``PYTHONPATH``): installs :mod:`batchfit.emulation.bootstrap`'s import hook, then runs
the ``sitecustomize`` this one shadows, if any. Does nothing without ``BATCHFIT_EMULATE``."""

import os
import sys


def _bootstrap() -> None:
    if not os.environ.get("BATCHFIT_EMULATE"):
        return
    try:
        from batchfit.emulation.bootstrap import install
    except ImportError:
        # Another interpreter than batchfit's: find batchfit next to this file.
        sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))))
        try:
            from batchfit.emulation.bootstrap import install
        except ImportError as exc:
            print(f"batchfit run: cannot import batchfit in this interpreter ({exc}); "
                  "only the allocator cap applies", file=sys.stderr)
            return
    install()


def _chain() -> None:
    """Run the next ``sitecustomize`` on the path (the one this file shadows)."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_bootstrap()
_chain()
