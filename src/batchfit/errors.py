"""Exception types of batchfit.

Every error batchfit raises on purpose derives from :class:`BatchfitError`, and each message
says what is wrong and how to fix it. Errors caused by bad input also derive from
:class:`ValueError`, so ``except ValueError`` keeps working for callers who don't know batchfit.
The CLI maps :class:`InvalidInputError` to exit status 2.

:func:`error_line` is the one place where an exception (batchfit's or the user's, Keras-wrapped
or not) becomes the short line a message quotes. It lives here, beside the exception types, because
this module imports nothing of batchfit: every layer (results, workers, verbs, the backend) can
use it without an import cycle and without TensorFlow.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Lines of Keras's frame around a layer's own error (``keras_frame=True`` skips them).
_KERAS_WRAPPER = ("Exception encountered when calling", "Could not automatically infer",
                  "Traceback", "File ")


def error_line(exc: BaseException | None, *, limit: int | None = 300, with_type: bool = False,
               prefer: str | None = None, prefer_last: str | None = None,
               keras_frame: bool = False) -> str:
    """The one line of an exception's message that a batchfit message quotes.

    The message's lines are taken without ANSI colour codes (Keras bolds the layer's own error)
    and without surrounding blanks; empty lines are skipped. The line chosen is, in order: the
    first line that ``prefer`` matches, the last line that ``prefer_last`` matches, the first line.

    Args:
        exc: the exception (``None`` gives ``""``).
        limit: the most characters of the line kept (the type name prefix is not counted);
            ``None`` keeps all of it.
        with_type: put ``"TypeName: "`` before the line.
        prefer: a regular expression (``re.search``); the first line it matches is chosen,
            e.g. ``"OOM|exceeds"`` to quote the out-of-memory line of a long TensorFlow error.
        prefer_last: a regular expression; when ``prefer`` matches no line, the last line it
            matches is chosen.
        keras_frame: quote the error as a finding does, without Keras's frame: the text from
            "Arguments received by" on is dropped, so are the wrapper lines ("Exception
            encountered when calling ...", tracebacks), and a line over 160 characters is cut at
            its first sentence.

    Returns:
        The line, or when the message has none: the type name if ``with_type`` or
        ``keras_frame``, else ``""``.

    Example:

    >>> error_line(ValueError("Batch size 129 exceeds maximum allowed 128"))
    'Batch size 129 exceeds maximum allowed 128'
    >>> error_line(RuntimeError("Graph execution error:\\n\\nOOM when allocating tensor"),
    ...            with_type=True, prefer="OOM")
    'RuntimeError: OOM when allocating tensor'
    >>> error_line(ValueError("Exception encountered when calling Dense.call().\\n\\n"
    ...                       "\\x1b[1mInput 0 is incompatible\\x1b[0m\\n\\n"
    ...                       "Arguments received by Dense.call():"), keras_frame=True)
    'Input 0 is incompatible'
    >>> error_line(KeyError(), with_type=True)
    'KeyError'
    """
    if exc is None:
        return ""
    text = _ANSI.sub("", str(exc))
    if keras_frame:
        text = text.split("Arguments received by")[0]
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not (keras_frame and ln.startswith(_KERAS_WRAPPER))]
    line = _chosen(lines, prefer, prefer_last)
    if line is None:
        return type(exc).__name__ if with_type or keras_frame else ""
    if keras_frame and len(line) > 160 and ". " in line[:300]:
        line = line[:line.index(". ") + 1]
    if limit is not None:
        line = line[:limit]
    return f"{type(exc).__name__}: {line}" if with_type else line


def _chosen(lines: list[str], prefer: str | None, prefer_last: str | None) -> str | None:
    """The first line ``prefer`` matches, else the last ``prefer_last`` matches, else the first."""
    if prefer is not None:
        for line in lines:
            if re.search(prefer, line):
                return line
    if prefer_last is not None:
        for line in reversed(lines):
            if re.search(prefer_last, line):
                return line
    return lines[0] if lines else None


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
