"""One resolver for every verb: (model | factory | spec | saved file, distribute) -> what to run.

A verb is given a model in one of four forms (a compiled ``keras.Model``, a zero-argument
factory, a ``"file.py:factory"`` / ``"package.module:factory"`` spec, a saved ``.keras`` file)
and a ``distribute=`` (a strategy object, ``"mirrored"``, ``"multiworker"``, ``None``).
:func:`resolve` turns them into a :class:`ResolvedModel`: the source to send to a probe worker,
the model object when one is needed in this process (built inside the strategy's scope), and
the strategy with its replicas and name. Everything backend-specific goes through
:func:`batchfit.backend.get_backend`.

Example:

>>> from batchfit.verbs.resolve import resolve
>>> r = resolve("batchfit.examples.models:seed_mlp")       # doctest: +SKIP
>>> r.model is None, r.replicas, r.distribute              # doctest: +SKIP
(True, 1, '')
>>> resolve(42)
Traceback (most recent call last):
...
batchfit.errors.InvalidInputError: model must be a compiled keras.Model, a function returning one, or a spec 'file.py:factory' / 'package.module:factory' / 'model.keras'; got int
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backend import get_backend
from ..errors import InvalidInputError

__all__ = ["ResolvedModel", "resolve", "validate_model_arg"]


def validate_model_arg(model: Any) -> None:
    """Refuse what is neither a model, a factory nor a spec; check a model object is compiled.

    Raises:
        InvalidInputError: ``model`` is none of the four forms, a model not compiled, or an
            object that holds variables but is not a model (a layer is callable, but it is not
            a factory: it gets the backend's message on how to wrap it in a model).
    """
    if isinstance(model, (str, type)) or (callable(model) and not hasattr(model, "variables")):
        return  # a spec, a model class or a factory: checked when it is built
    backend = get_backend()
    if hasattr(model, "variables"):
        # A model: compiled? Anything else holding variables (a layer is callable, but it is
        # not a factory): the backend's message on what it is and how to wrap it in a model.
        backend.check_model(model)
    if not backend.is_model(model):
        raise InvalidInputError(
            f"model must be a compiled keras.Model, a function returning one, or a spec "
            f"'file.py:factory' / 'package.module:factory' / 'model.keras'; got "
            f"{type(model).__name__}")


@dataclass(frozen=True)
class ResolvedModel:
    """What a verb needs to know about the model it was given and where it trains.

    Args:
        source: what the caller passed (a model object, a factory or a spec).
        model: the model object: the one given, or built in this process when asked
            (``build=True``); ``None`` otherwise.
        strategy: the backend's distribution strategy, or ``None`` for one device.
        replicas: replicas in sync (1 without a strategy).
        distribute: ``"mirrored"``, ``"multiworker"``, another strategy's class name, or ``""``.
        multiworker: whether the strategy spans several workers.
    """

    source: Any
    model: Any
    strategy: Any = None
    replicas: int = 1
    distribute: str = ""
    multiworker: bool = False

    @property
    def given_object(self) -> bool:
        """Whether the caller passed a model object (not a factory or a spec)."""
        return self.model is not None and self.model is self.source

    @property
    def rebuildable(self) -> Any:
        """What a probe worker builds the model from: the spec or factory given, else the model."""
        return self.source if not self.given_object else self.model

    @property
    def name(self) -> str:
        """The model's name when it is built here, else ``""``."""
        return str(getattr(self.model, "name", "")) if self.model is not None else ""


def resolve(model: Any, distribute: Any = None, *, build: bool = False) -> ResolvedModel:
    """Resolve a verb's ``model`` and ``distribute=`` arguments.

    Args:
        model: a compiled ``keras.Model``, a zero-argument function returning one, or a spec
            (``"file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``).
        distribute: a strategy object, ``"mirrored"``, ``"multiworker"`` or ``None`` (the
            strategy a model object was built under, if any).
        build: also build a factory's or a spec's model in this process (inside the
            strategy's scope, so it lives under the strategy; without ``distribute``, the
            strategy the factory built it under, if any, is detected); a model object is used
            as is.

    Returns:
        A :class:`ResolvedModel`.

    Raises:
        InvalidInputError: ``model`` is not one of the four forms, a model object is not
            compiled, or ``distribute`` is unknown or disagrees with the model's strategy.
        ModelLoadError: ``build=True`` and the spec or factory could not be loaded.
    """
    validate_model_arg(model)
    backend = get_backend()
    given = backend.is_model(model)
    strategy = None
    if distribute is not None or given:
        strategy = backend.resolve_distribute(distribute, model if given else None)
    built = model if given else None
    if build and built is None:
        with backend.distribute_scope(strategy):
            built = backend.resolve_model(model)
        if strategy is None:  # a factory may build its model under a strategy of its own
            strategy = backend.resolve_distribute(None, built)
    return ResolvedModel(source=model, model=built, strategy=strategy,
                         replicas=backend.num_replicas(strategy),
                         distribute=backend.distribute_name(strategy),
                         multiworker=backend.is_multiworker(strategy))
