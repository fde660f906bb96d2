"""Device memory without a Keras backend: a GPU's total through NVML, the host's free RAM, budgets.

Nothing here imports TensorFlow; the verbs and the backends share it.

Example:

>>> from batchfit.backend.memory import resolve_budget
>>> resolve_budget("512MiB", "CPU:0")
(536870912, 'user', '')
"""

from __future__ import annotations

import os
from typing import Any

from ..core.sizes import format_bytes, parse_size
from ..errors import InvalidInputError

HOST_RESERVE_BYTES = 1 << 30  # left to the OS and this process when the budget is "all of RAM"

def host_available_bytes() -> int | None:
    """Memory the kernel says is available for new allocations (``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_total_bytes(index: int = 0) -> tuple[int | None, str]:
    """``(total bytes, name)`` of a GPU through NVML (``nvidia-ml-py``), ``(None, "")`` without it."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None, ""
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or driver mismatch: unknown, not fatal
        return None, ""



def resolve_budget(memory: Any, device: str) -> tuple[int | None, str, str]:
    """``(budget bytes or None, source, note)`` for a ``memory=`` argument on ``device``."""
    if memory is not None:
        return parse_size(memory), "user", ""
    if device.upper().startswith("GPU"):
        total, _ = gpu_total_bytes()
        if total is None:
            return None, "device", ("GPU total memory unknown (install nvidia-ml-py to read it): "
                                    "the search runs until the device refuses")
        return total, "device", ""
    avail = host_available_bytes()
    if avail is None:
        raise InvalidInputError("cannot read this machine's available memory; pass memory= "
                                "(e.g. memory='8GiB')")
    budget = max(avail - HOST_RESERVE_BYTES, avail // 2)
    return budget, "device", (f"CPU: budget is this machine's available memory less a reserve "
                              f"({format_bytes(budget)})")

