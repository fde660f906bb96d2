"""Put a user's own training under exactly the device the probes ran on.

A probe worker gets the backend's :meth:`~batchfit.backend.Backend.worker_environment` before
its framework starts (on CPU: the BFC allocator capped at the budget, oneDNN off, one
intra-op thread, a fixed hash seed) and :meth:`~batchfit.backend.Backend.configure_worker`
right after the framework is imported (one op at a time, the budget reserved as one region),
in a process whose address-space layout is fixed. Both steps belong to the backend; this
module only launches: ``batchfit run --memory 512MiB -- python train.py`` (:func:`run_emulated`)
and :func:`emulated_device` give the user's process the same environment, and the same
configure step through an import hook (:mod:`batchfit.emulation.bootstrap`, installed by a
``sitecustomize`` that this module puts first on the child's ``PYTHONPATH``), so it also
works for ``python -m ...`` and leaves a command that is not Python with the environment only.

Example:

>>> env = emulation_environment("256MiB")
>>> env["TF_CPU_BFC_MEM_LIMIT_IN_MB"], env["TF_NUM_INTRAOP_THREADS"]
('256', '1')
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.sizes import parse_size
from ..errors import InvalidInputError
from .bootstrap import ENV_VAR, decode, encode, install

#: The directory holding the ``sitecustomize.py`` an emulated Python process starts with.
SITE_DIR = Path(__file__).resolve().parent / "site"

_DEVICE = re.compile(r"^(CPU|GPU):\d+$", re.IGNORECASE)
_ADDR_NO_RANDOMIZE = 0x0040000

__all__ = ["ENV_VAR", "SITE_DIR", "EmulatedDevice", "emulated_device", "emulation_environment",
           "run_emulated", "run_fit_job"]


@dataclass(frozen=True)
class EmulatedDevice:
    """What :func:`emulated_device` set up.

    Attributes:
        device: the device emulated, e.g. ``"CPU:0"``.
        budget_bytes: its memory.
        how: ``"inherited"`` (this process was started emulated: ``batchfit run`` or a
            re-exec), or ``"in-process"`` (environment and hook set here; the hash seed and
            address-space layout of the probes are not, see :func:`emulated_device`).
        environment: the variables set for the framework.
    """

    device: str
    budget_bytes: int
    how: str
    environment: dict[str, str] = field(default_factory=dict)


def _check(memory: str | int, device: str) -> tuple[int, str]:
    budget = parse_size(memory)
    if not isinstance(device, str) or not _DEVICE.match(device.strip()):
        raise InvalidInputError(f"device {device!r}: expected CPU:N or GPU:N, e.g. CPU:0")
    return budget, device.strip().upper()


def emulation_environment(memory: str | int, device: str = "CPU:0",
                          base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process that runs under the emulated device.

    The backend's worker environment for ``device`` and ``memory``, :data:`ENV_VAR` (read by
    the start-up hook) and ``PYTHONPATH`` with :data:`SITE_DIR` first; only the variables to
    set, or ``base`` updated with them when given.

    Raises:
        InvalidInputError: ``memory`` is not a size, or ``device`` not ``CPU:N``/``GPU:N``.
    """
    from ..backend import get_backend

    budget, device = _check(memory, device)
    backend = get_backend()
    if (reason := backend.uncapped_reason(device)) is not None:
        raise InvalidInputError(f"cannot emulate {device} with {memory} on this backend: "
                                f"{reason}")
    env = dict(backend.worker_environment(device, budget))
    env[ENV_VAR] = encode(backend.framework_module(), device, budget)
    source = os.environ if base is None else base
    path = [str(SITE_DIR)] + [p for p in source.get("PYTHONPATH", "").split(os.pathsep)
                              if p and p != str(SITE_DIR)]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env if base is None else {**base, **env}


def _fix_address_layout() -> bool:  # pragma: no cover - Linux only, affects later execs
    """Turn address-space randomization off for programs this process executes from now on
    (as the probe workers do; Linux ``personality``). ``False`` where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        current = libc.personality(0xFFFFFFFF)
        if current == -1:
            return False
        return bool(current & _ADDR_NO_RANDOMIZE) or libc.personality(
            current | _ADDR_NO_RANDOMIZE) != -1
    except (OSError, AttributeError):
        return False


def run_emulated(command: Sequence[str], memory: str | int, device: str = "CPU:0") -> int:
    """Run ``command`` under the emulated device; returns its exit status.

    What ``batchfit run --memory MEMORY -- COMMAND`` does. A signal that ends the command
    gives ``128 + signal``, as a shell reports it.

    Raises:
        InvalidInputError: no command, a command that cannot be started, a bad size or device.
    """
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InvalidInputError("no command to run: give it after --, e.g. "
                                "batchfit run --memory 512MiB -- python train.py")
    env = emulation_environment(memory, device, base=os.environ)
    _fix_address_layout()
    try:
        rc = subprocess.call(command, env=env)
    except (FileNotFoundError, PermissionError) as exc:
        raise InvalidInputError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
    return 128 - rc if rc < 0 else rc


def run_fit_job(job: dict[str, Any], memory: str | int, device: str = "CPU:0", *,
                timeout: float = 900.0) -> dict[str, Any]:
    """Run the model's own ``fit`` once in a fresh process under the emulated device.

    ``job`` holds ``source`` (a :class:`~batchfit.workers.worker.ModelSource`), ``data``,
    ``input_shapes``, ``batch_size``, ``epochs``, ``steps`` and ``seed`` (see
    :mod:`batchfit.emulation.fit_job`). Returns the job's outcome (``outcome``,
    ``peak_bytes``, ``message``, ``notes``) with ``seconds``; a process that dies or runs
    past ``timeout`` is an ``"error"`` whose message quotes the end of its output.
    """
    from .fit_job import ENTRY

    _, device = _check(memory, device)
    env = emulation_environment(memory, device, base=os.environ)
    _fix_address_layout()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="batchfit-verify-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.pkl"), os.path.join(tmp, "out.json")
        with open(job_path, "wb") as f:
            pickle.dump({**job, "device": device}, f)
        try:
            proc = subprocess.run([sys.executable, "-c", ENTRY, job_path, out_path], env=env, check=False,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, errors="replace", timeout=timeout)
            tail, code = proc.stderr.strip().splitlines()[-3:], proc.returncode
        except subprocess.TimeoutExpired:
            tail, code = [f"still running after {timeout:.0f} s"], None
        if code == 0 and os.path.exists(out_path):
            with open(out_path, encoding="utf-8") as f:
                out = json.load(f)
        else:
            why = ("timed out" if code is None else f"exited with status {code}" if code > 0
                   else f"was killed by {_signal_name(-code)}")
            out = {"outcome": "error", "peak_bytes": None, "notes": [],
                   "message": f"the process {why}: " + " | ".join(tail)[-400:]}
    out["seconds"] = time.perf_counter() - t0
    return out


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _can_reexec() -> bool:
    argv = getattr(sys, "orig_argv", None)
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or "ipykernel" in sys.modules
    return bool(argv) and not interactive and bool(sys.argv and sys.argv[0])


def emulated_device(memory: str | int = "512MiB", device: str = "CPU:0", *,
                    reexec: bool = True) -> EmulatedDevice:
    """Run the rest of this program under exactly the device the probes ran on.

    Call it at the top of a training script, before TensorFlow or Keras is imported. The
    process re-executes itself (same interpreter and arguments) with the emulated
    environment, as ``batchfit run --memory MEMORY -- python ...`` would start it; in the
    re-executed process the call returns at once. Where re-executing is not possible (an
    interactive session, ``reexec=False``) the environment and the configure hook are set in
    this process instead: the allocator cap and threads apply, the fixed hash seed and
    address-space layout of the probes do not (``how == "in-process"``).

    Args:
        memory: the device's memory, e.g. ``"512MiB"``.
        device: the device to emulate, ``"CPU:0"`` (or ``"GPU:0"``: a logical GPU of that size).
        reexec: re-execute the program (default) rather than set up in-process.

    Returns:
        An :class:`EmulatedDevice`.

    Raises:
        InvalidInputError: the framework is already imported (its allocator settings are read
            once, at import), or a bad size or device.

    Example:

    >>> import batchfit
    >>> batchfit.emulated_device("512MiB")  # doctest: +SKIP
    EmulatedDevice(device='CPU:0', budget_bytes=536870912, how='inherited', ...)
    """
    from ..backend import get_backend

    budget, device = _check(memory, device)
    module = get_backend().framework_module()
    current = decode(os.environ.get(ENV_VAR))
    if current == {"module": module, "device": device, "budget_bytes": budget}:
        install()  # a no-op when the start-up hook already ran
        return EmulatedDevice(device, budget, "inherited", {})
    if module in sys.modules:
        size = f"{budget >> 20}MiB" if budget % (1 << 20) == 0 else str(budget)
        raise InvalidInputError(
            f"batchfit.emulated_device({size!r}) must run before {module} is imported (its "
            f"allocator reads the cap once, at import): call it first in the script, or run "
            f"the script with batchfit run --memory {size} -- python SCRIPT")
    env = emulation_environment(budget, device)
    if reexec and _can_reexec():
        sys.stdout.flush()
        sys.stderr.flush()
        _fix_address_layout()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})
    env.pop("PYTHONPATH")
    os.environ.update(env)
    install()
    return EmulatedDevice(device, budget, "in-process", env)
