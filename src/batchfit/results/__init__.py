"""Results as plain, frozen, JSON-serializable data.

Every measurement batchfit makes ends up in one of these dataclasses. They import nothing but the
standard library, so a saved run (``--json``) can be loaded and re-rendered on a machine without
TensorFlow. Each top-level result carries ``schema_version`` and ``result_kind``;
:func:`load_result` reads any of them back from JSON. One module per feature; each top-level
result class is decorated with :func:`register_result` and imported here.

Example:

>>> from batchfit.results import Probe
>>> p = Probe(batch_size=64, fits=True, outcome="fits", peak_bytes=2**20, seconds=0.5)
>>> Probe.from_dict(p.to_dict()) == p
True
"""

from ._base import SCHEMA_VERSION, check_schema_version, load_result, register_result
from .check import CHECKS, SEVERITIES, CheckResult, Finding, LayerReport, SkippedLayer
from .estimate import CardFit, CompiledStepMemory, EstimateResult, LinearFit
from .maxbatch import PROBE_OUTCOMES, Band, MaxBatchResult, MemoryModel, Probe
from .noise import NoisePair, NoiseScaleResult
from .tune import (
                   Recommendation,
                   TargetPlan,
                   ThroughputPoint,
                   ThroughputResult,
                   TuneResult,
                   Verdict,
)
from .verify import RUN_OUTCOMES, VerifyResult, VerifyRun

__all__ = [
                   "CHECKS",
                   "PROBE_OUTCOMES",
                   "RUN_OUTCOMES",
                   "SCHEMA_VERSION",
                   "SEVERITIES",
                   "Band",
                   "CardFit",
                   "CheckResult",
                   "CompiledStepMemory",
                   "EstimateResult",
                   "Finding",
                   "LayerReport",
                   "LinearFit",
                   "MaxBatchResult",
                   "MemoryModel",
                   "NoisePair",
                   "NoiseScaleResult",
                   "Probe",
                   "Recommendation",
                   "SkippedLayer",
                   "TargetPlan",
                   "ThroughputPoint",
                   "ThroughputResult",
                   "TuneResult",
                   "Verdict",
                   "VerifyResult",
                   "VerifyRun",
                   "check_schema_version",
                   "load_result",
                   "register_result",
]
