"""Exception types of batchfit.

Every error batchfit raises on purpose derives from :class:`BatchfitError`, and each message
says what is wrong and how to fix it. Errors caused by bad input also derive from
:class:`ValueError`, so ``except ValueError`` keeps working for callers who don't know batchfit.
The CLI maps :class:`InvalidInputError` to exit status 2.
"""

from __future__ import annotations


class BatchfitError(Exception):
    """Base class of every error batchfit raises on purpose."""


class InvalidInputError(BatchfitError, ValueError):
    """The caller passed something batchfit cannot use (a bad size, spec, model or option)."""


class ModelLoadError(InvalidInputError):
    """A model (or data) spec could not be loaded: file missing, factory raised, not a model."""


class LayerBuildError(InvalidInputError):
    """A layer under ``batchfit check`` fails on an ordinary batch, for reasons of its own.

    The message names the layer, where its ``call`` is, the input it got and its own error,
    so the cause is shown rather than hidden behind a batch-size finding.
    """


class NothingFitsError(BatchfitError):
    """Not even the smallest batch fits the memory budget.

    Attributes:
        fixed_bytes: estimated memory that does not depend on the batch (weights, optimizer
            state, workspace), or ``None`` when it could not be measured.
        budget_bytes: the memory budget searched under.
        result: the partial search result (probes made), when available.
    """

    def __init__(self, message: str, *, fixed_bytes: float | None = None,
                 budget_bytes: int | None = None, result: object | None = None) -> None:
        super().__init__(message)
        self.fixed_bytes = fixed_bytes
        self.budget_bytes = budget_bytes
        self.result = result


class ProbeFailedError(BatchfitError):
    """A training step failed for a reason other than memory at the smallest batch size.

    The model cannot train at all as given (shape mismatch, bad loss, a layer that raises), so
    no search can help; the message carries the model's own error.
    """


class TrainingOutOfMemoryError(NothingFitsError):
    """:func:`batchfit.fit` ran out of memory even at a micro-batch of one example.

    No smaller batch exists, so training cannot go on: the memory that does not depend on the
    batch (weights, optimizer state, workspace) does not leave room for one example. The
    message states that fixed memory; ``fixed_bytes`` holds it. Fixes: a smaller model, a
    lighter optimizer (SGD keeps no slots, Adam two per weight), mixed precision, or a
    device with more memory.
    """


class MissingBackendError(InvalidInputError):
    """The Keras backend batchfit needs is not installed, or is not one batchfit supports.

    The message names the backend and the command that installs it (the CLI exits with 2).
    """
