"""batchfit: measure the batch size to train a Keras 3 / TensorFlow model with.

The public API. Names that need TensorFlow are imported lazily, so ``import batchfit`` is
instant and the results, the pure search logic and the reports work without TensorFlow.

Example:

>>> import batchfit
>>> batchfit.parse_size("512MiB")
536870912
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backend.oom import is_oom_error
from .errors import (
    BatchfitError,
    InvalidInputError,
    ModelLoadError,
    NothingFitsError,
    ProbeFailedError,
    TrainingOutOfMemoryError,
)
from .results import (
    SCHEMA_VERSION,
    MaxBatchResult,
    MemoryModel,
    Probe,
    ThroughputResult,
    TuneResult,
    load_result,
)

__version__ = "0.1.0"

_LAZY = {
    "use_backend": ("batchfit.backend", "use_backend"),
    "find_max_batch_size": ("batchfit.verbs.maxbatch", "find_max_batch_size"),
    "check": ("batchfit.verbs.check", "check"),
    "CheckResult": ("batchfit.results.check", "CheckResult"),
    "fit": ("batchfit.verbs.fit", "fit"),
    "adaptive_batch_size": ("batchfit.verbs.adaptive", "adaptive_batch_size"),
    "AdaptiveBatchState": ("batchfit.verbs.adaptive", "AdaptiveBatchState"),
    "BatchAdjustment": ("batchfit.results.fit", "BatchAdjustment"),
    "HalvingShrink": ("batchfit.core.shrink", "HalvingShrink"),
    "MemoryModelShrink": ("batchfit.core.shrink", "MemoryModelShrink"),
    "ShrinkPolicy": ("batchfit.core.shrink", "ShrinkPolicy"),
    "profile_throughput": ("batchfit.verbs.throughput", "profile_throughput"),
    "tune": ("batchfit.verbs.tune", "tune"),
    "find_max_batch_size_multiworker": ("batchfit.verbs.multiworker",
                                        "find_max_batch_size_multiworker"),
    "fit_multiworker": ("batchfit.verbs.multiworker_fit", "fit_multiworker"),
    "agree_batch_size": ("batchfit.verbs.multiworker", "agree_batch_size"),
    "upstream_fit_works": ("batchfit.verbs.multiworker", "upstream_fit_works"),
    "make_strategy": ("batchfit.verbs.multiworker", "make_strategy"),
    "MultiWorkerHistory": ("batchfit.verbs.multiworker_fit", "MultiWorkerHistory"),
    "MultiWorkerMaxBatchResult": ("batchfit.verbs.multiworker", "MultiWorkerMaxBatchResult"),
    "parse_size": ("batchfit.core.sizes", "parse_size"),
    "format_bytes": ("batchfit.core.sizes", "format_bytes"),
    "estimate_noise_scale": ("batchfit.verbs.noise", "estimate_noise_scale"),
    "estimate_memory": ("batchfit.verbs.estimate", "estimate_memory"),
    "EstimateResult": ("batchfit.results.estimate", "EstimateResult"),
    "NoiseScaleMonitor": ("batchfit.backend.tensorflow.noise", "NoiseScaleMonitor"),
    "NoiseScaleResult": ("batchfit.results.noise", "NoiseScaleResult"),
    "goodput_optimal_batch": ("batchfit.core.noise", "goodput_optimal_batch"),
    "statistical_efficiency": ("batchfit.core.noise", "statistical_efficiency"),
    "scale_learning_rate": ("batchfit.core.noise", "scale_learning_rate"),
    "emulated_device": ("batchfit.emulation", "emulated_device"),
    "EmulatedDevice": ("batchfit.emulation", "EmulatedDevice"),
    "verify_batch_size": ("batchfit.verbs.verify_fit", "verify_batch_size"),
    "VerifyResult": ("batchfit.results.verify", "VerifyResult"),
}

__all__ = [
    "SCHEMA_VERSION",
    "AdaptiveBatchState",
    "BatchAdjustment",
    "BatchfitError",
    "CheckResult",
    "EmulatedDevice",
    "EstimateResult",
    "HalvingShrink",
    "InvalidInputError",
    "MaxBatchResult",
    "MemoryModel",
    "MemoryModelShrink",
    "ModelLoadError",
    "MultiWorkerHistory",
    "MultiWorkerMaxBatchResult",
    "NoiseScaleMonitor",
    "NoiseScaleResult",
    "NothingFitsError",
    "Probe",
    "ProbeFailedError",
    "ShrinkPolicy",
    "ThroughputResult",
    "TrainingOutOfMemoryError",
    "TuneResult",
    "VerifyResult",
    "__version__",
    "adaptive_batch_size",
    "agree_batch_size",
    "check",
    "emulated_device",
    "estimate_memory",
    "estimate_noise_scale",
    "find_max_batch_size",
    "find_max_batch_size_multiworker",
    "fit",
    "fit_multiworker",
    "format_bytes",
    "goodput_optimal_batch",
    "is_oom_error",
    "load_result",
    "make_strategy",
    "parse_size",
    "profile_throughput",
    "scale_learning_rate",
    "statistical_efficiency",
    "tune",
    "upstream_fit_works",
    "use_backend",
    "verify_batch_size",
]

if TYPE_CHECKING:  # pragma: no cover
    from .backend.tensorflow.noise import NoiseScaleMonitor
    from .core.noise import (
        goodput_optimal_batch,
        scale_learning_rate,
        statistical_efficiency,
    )
    from .core.shrink import HalvingShrink, MemoryModelShrink, ShrinkPolicy
    from .core.sizes import format_bytes, parse_size
    from .results.check import CheckResult
    from .results.estimate import EstimateResult
    from .results.fit import BatchAdjustment
    from .results.noise import NoiseScaleResult
    from .verbs.adaptive import AdaptiveBatchState, adaptive_batch_size
    from .verbs.check import check
    from .verbs.estimate import estimate_memory
    from .verbs.fit import fit
    from .verbs.maxbatch import find_max_batch_size
    from .verbs.multiworker import (
        MultiWorkerMaxBatchResult,
        agree_batch_size,
        find_max_batch_size_multiworker,
        make_strategy,
        upstream_fit_works,
    )
    from .verbs.multiworker_fit import MultiWorkerHistory, fit_multiworker
    from .verbs.noise import estimate_noise_scale
    from .verbs.throughput import profile_throughput
    from .verbs.tune import tune


def __getattr__(name: str) -> Any:
    if name == "NoiseScaleMonitor":  # the active backend's callback
        from .backend import noise_monitor_class

        value = noise_monitor_class()
        globals()[name] = value
        return value
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batchfit' has no attribute {name!r}")
