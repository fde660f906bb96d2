"""The noise scale monitor's framework-free part: when to measure, the window, the logs.

:class:`MonitorBase` holds a Keras callback's hooks without importing Keras (importing
this module loads no framework); a backend's ``NoiseScaleMonitor`` is
``class NoiseScaleMonitor(MonitorBase, keras.callbacks.Callback)`` with
:meth:`MonitorBase._pairs` (the squared gradient norms at the current weights, leaving the
model as it was) and, where it has one, a TensorBoard writer (:meth:`MonitorBase._write`). ``batchfit.NoiseScaleMonitor`` is the
active backend's (TensorFlow: :mod:`batchfit.backend.tensorflow.noise`; JAX:
:mod:`batchfit.backend.jax.noise`).

Example:

>>> MonitorBase.__name__
'MonitorBase'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.noise import (
    MAX_EXAMPLES,
    check_pair_sizes,
    estimate_from_pairs,
    noise_scale_of_means,
    pair_estimates,
)
from ...core.validate import check_int
from .sampler import ExampleSampler


class MonitorBase:
    """Measure pairs every ``every`` steps, pool the last ``window``, log at each epoch's end
    (see ``batchfit.NoiseScaleMonitor`` for the arguments and the logged values). A mixin
    placed before ``keras.callbacks.Callback``, whose ``__init__`` it calls."""

    model: Any

    def __init__(self, data: Any, *, small: int = 16, big: int = 128, every: int = 50,
                 pairs_per_measurement: int = 1, window: int = 16,
                 log_dir: str | None = None, seed: int = 0,
                 max_examples: int = MAX_EXAMPLES) -> None:
        super().__init__()
        check_pair_sizes(small, big)
        for name, v in (("every", every), ("pairs_per_measurement", pairs_per_measurement),
                        ("window", window)):
            check_int(name, v, minimum=1)
        self.sampler = ExampleSampler(data, max_examples=max_examples, seed=seed)
        self.small, self.big = int(small), int(big)
        self.every = int(every)
        self.pairs_per_measurement = int(pairs_per_measurement)
        self.window = int(window)
        self.log_dir = log_dir
        self.seed = seed
        self.records: list[dict[str, float]] = []
        self._small_sq: list[float] = []
        self._big_sq: list[float] = []
        self._step = 0
        self._measured_this_epoch = False

    # -- what a backend provides ----------------------------------------------------------------
    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """``pairs_per_measurement`` pairs at the current weights; the model left unchanged."""
        raise NotImplementedError

    def _write(self, values: dict[str, float], step: int, *, per_step: bool) -> None:
        """Write finite ``values`` to TensorBoard (``log_dir``), where the backend can."""

    def _close(self) -> None:
        """Release the TensorBoard writer, if any."""

    # -- Keras hooks --------------------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._measured_this_epoch = False

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._step += 1
        if self._step % self.every == 0:
            self._measure()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._measured_this_epoch:
            self._measure()
        values = self._summarize(bootstrap=True)
        if logs is not None:
            logs.update(values)
        self.records.append({"epoch": float(epoch), "step": float(self._step),
                             "pairs": float(len(self._small_sq)), **values})
        self._write(values, epoch, per_step=False)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._close()

    # -- internals -----------------------------------------------------------------------------
    def _measure(self) -> None:
        s, b = self._pairs()
        self._measured_this_epoch = True
        self._small_sq = (self._small_sq + s.tolist())[-self.window:]
        self._big_sq = (self._big_sq + b.tolist())[-self.window:]
        if self.log_dir is not None:
            running = self._summarize(bootstrap=False)["noise_scale"]
            self._write({"noise_scale_step": running}, self._step, per_step=True)

    def _summarize(self, *, bootstrap: bool) -> dict[str, float]:
        small, big = self._small_sq, self._big_sq
        if bootstrap and len(small) >= 2:
            est = estimate_from_pairs(small, big, self.small, self.big, seed=self.seed)
            return {"noise_scale": est.b_simple, "noise_scale_low": est.low,
                    "noise_scale_high": est.high, "grad_sq_norm": est.gradient_sq_norm,
                    "grad_trace": est.trace_sigma}
        g2, trace = pair_estimates(small, big, self.small, self.big)
        g2m, trm = float(np.mean(g2)), float(np.mean(trace))
        nan = float("nan")
        return {"noise_scale": noise_scale_of_means(g2m, trm), "noise_scale_low": nan,
                "noise_scale_high": nan, "grad_sq_norm": g2m, "grad_trace": trm}
