"""GPU utilization and memory through NVML (``nvidia-ml-py``), sampled while steps run.

On a machine without an NVIDIA GPU or without ``nvidia-ml-py`` nothing is sampled and
:func:`nvml_status` says why, so reports state "not available" instead of guessing.
"""

from __future__ import annotations

import threading
from typing import Any


def _pynvml() -> Any:
    import pynvml  # provided by nvidia-ml-py

    return pynvml


def nvml_status(device: str, index: int = 0) -> tuple[bool, str]:
    """``(available, why)``: whether GPU metrics can be recorded for ``device``."""
    if not device.upper().startswith("GPU"):
        return False, f"not available: measured on {device}, NVML reports NVIDIA GPUs only"
    try:
        nv = _pynvml()
    except ImportError:
        return False, "not available: install nvidia-ml-py (pip install 'batchfit[gpu]')"
    try:
        nv.nvmlInit()
        try:
            nv.nvmlDeviceGetHandleByIndex(index)
        finally:
            nv.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - driver missing or mismatched: say so
        return False, f"not available: NVML failed ({type(exc).__name__}: {exc})"
    return True, "nvml"


class GpuSampler:
    """Samples one GPU's utilization (%) and used memory in a background thread.

    Use as a context manager around the timed steps; read :attr:`mean_utilization` and
    :attr:`peak_memory_bytes` afterwards. Does nothing (both stay ``None``) when NVML is not
    available.

    Args:
        enabled: sample at all (pass the first element of :func:`nvml_status`).
        index: the NVML device index.
        interval: seconds between samples.
    """

    def __init__(self, enabled: bool, index: int = 0, interval: float = 0.05) -> None:
        self.enabled = enabled
        self.index = index
        self.interval = interval
        self._util: list[float] = []
        self._mem: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:  # noqa: PYI034
        if self.enabled:
            nv = _pynvml()
            nv.nvmlInit()
            handle = nv.nvmlDeviceGetHandleByIndex(self.index)

            def loop() -> None:
                while not self._stop.is_set():
                    try:
                        self._util.append(float(nv.nvmlDeviceGetUtilizationRates(handle).gpu))
                        self._mem.append(int(nv.nvmlDeviceGetMemoryInfo(handle).used))
                    except Exception:  # noqa: BLE001, S110 - a missed sample is not an error
                        pass
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=loop, name="batchfit-nvml", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2.0)
            _pynvml().nvmlShutdown()

    @property
    def mean_utilization(self) -> float | None:
        return sum(self._util) / len(self._util) if self._util else None

    @property
    def peak_memory_bytes(self) -> int | None:
        return max(self._mem) if self._mem else None
