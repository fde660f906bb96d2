"""Results of :func:`batchfit.check`: findings on custom layers and the batch contract.

Plain frozen dataclasses (standard library only), so a saved ``batchfit check --json`` run
re-renders with ``batchfit report`` on a machine without TensorFlow.

Example:

>>> f = Finding(layer="scale", check="sample_mixing", severity="warning",
...             message="output sample 0 depends on other samples", location="m.py:12")
>>> CheckResult(findings=[f]).has_errors
False
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import errors
from ._base import SCHEMA_VERSION, _Serializable, register_result

#: The checks, in the order they are reported.
CHECKS = (
    "dynamic_batch",   # builds with a None batch; runs at 1, 2, an odd and a large size
    "partial_batch",   # fit on a dataset whose size the batch size does not divide
    "static_shape",    # AST scan of call (and same-module helpers) for static batch reads
    "sample_mixing",   # gradient test: does output sample 0 depend on the other samples?
    "retracing",       # traces over several batch sizes in fit, under tf.function, eagerly
    "export",          # model.export keeps a None batch and serves other sizes
    "batch_limit",     # the layer refuses batches above a limit (clear error) and works below
)

#: Severities, most severe first.
SEVERITIES = ("error", "warning", "info")



def error_line(exc: BaseException | None) -> str:
    """The error's own first sentence, as a finding quotes it (without Keras's frame).

    Keras wraps a layer's error in "Exception encountered when calling ..." and appends
    "Arguments received by ..."; both are dropped, and a long line is cut at its first sentence
    (:func:`batchfit.errors.error_line` with ``keras_frame=True``).

    Example:

    >>> error_line(ValueError("Batch size 129 exceeds maximum allowed 128"))
    'Batch size 129 exceeds maximum allowed 128'
    """
    return errors.error_line(exc, keras_frame=True)


@dataclass(frozen=True)
class Finding(_Serializable):
    """One thing a check found about one layer.

    Args:
        layer: the layer's name (``"(model)"`` for the model as a whole).
        check: one of :data:`CHECKS`.
        severity: ``"error"`` (breaks: exit status 1), ``"warning"`` (changes results or
            costs time) or ``"info"`` (expected behaviour worth knowing).
        message: one line: what was found.
        location: ``file:line`` (the layer's ``call``, or the exact line for a source finding),
            or ``""`` when the source is unknown.
        fix: one line: how to fix it (``""`` for info findings that need none).
    """

    layer: str
    check: str
    severity: str
    message: str
    location: str = ""
    fix: str = ""


@dataclass(frozen=True)
class LayerReport(_Serializable):
    """How one layer fared in each check.

    Args:
        layer: the layer's name.
        class_name: ``module.QualName`` of its class.
        location: ``file:line`` of its ``call``, or ``""``.
        input_shape: shape of one example it was checked with (no batch dimension).
        statuses: check -> ``"ok"``, ``"error"``, ``"warning"``, ``"info"``, or
            ``"skipped: <reason>"``.
        details: check -> a short measurement (trace counts, the limit found...).
        seconds: wall time spent on this layer.
    """

    layer: str
    class_name: str
    location: str = ""
    input_shape: list[Any] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class SkippedLayer(_Serializable):
    """A custom layer of the model that was not checked, and why.

    Args:
        layer: the layer's name.
        class_name: ``module.QualName`` of its class.
        reason: one line: why it was not checked.
    """

    layer: str
    class_name: str
    reason: str


@register_result
@dataclass(frozen=True)
class CheckResult(_Serializable):
    """What :func:`batchfit.check` found.

    Args:
        findings: every finding, grouped by layer in check order.
        layers: one :class:`LayerReport` per layer checked.
        model_name: the model's (or layer's) name.
        seconds: wall time of the whole check.
        notes: plain-language remarks (shapes assumed, arguments left out, ...).
        environment: versions, for reproducing the run.
        skipped: the custom layers not checked, each with the reason: with ``layers``, every
            custom (third-party) layer of the model is accounted for.
    """

    kind: ClassVar[str] = "check"

    findings: list[Finding] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    model_name: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def has_errors(self) -> bool:
        """Whether any finding is an error (the CLI then exits with status 1)."""
        return any(f.severity == "error" for f in self.findings)

    def for_layer(self, layer: str) -> list[Finding]:
        """The findings about one layer, in check order."""
        return [f for f in self.findings if f.layer == layer]

    def counts(self) -> dict[str, int]:
        """Number of findings per severity."""
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["counts"] = self.counts()
        return data
