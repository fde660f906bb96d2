"""Load a model (or data) from a command-line spec, and check that a model can be probed.

Specs:

- ``path/to/file.py:factory``: a Python file, loaded by path; ``factory`` is a no-argument
  callable there that returns a *compiled* ``keras.Model`` (or, for :func:`load_data`, the
  data). The file is imported under a unique, stable module name (derived from its absolute
  path) that is registered in ``sys.modules``, so classes defined in it pickle and serialize;
  its folder is put on ``sys.path`` so it can import its neighbours.
- ``package.module:factory``: the same, from an importable module. ``factory`` may be dotted
  (``module:Class.build``).
- ``path/model.keras`` (or ``.h5``): a saved model, read with ``keras.saving.load_model``.

Example:

>>> from batchfit.backend.tensorflow.loader import load_model
>>> model = load_model("batchfit.examples.models:seed_mlp")
>>> model.compiled
True
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import InvalidInputError, ModelLoadError, error_line
from .keras_compat import is_keras2_object

_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SAVED_SUFFIXES = (".keras", ".h5", ".hdf5")
_SPEC_FORMS = ("'path/to/file.py:factory', 'package.module:factory' or 'path/model.keras'")


def load_model(spec: str) -> Any:
    """Load a compiled ``keras.Model`` from a spec.

    Args:
        spec: ``path/to/file.py:factory``, ``package.module:factory`` (a no-argument callable
            returning a compiled ``keras.Model``) or ``path/model.keras``.

    Returns:
        The compiled ``keras.Model``.

    Raises:
        ModelLoadError: the file is missing, the spec has no ``:factory``, the module or the
            attribute does not exist, the factory raised, it returned something that is not a
            ``keras.Model``, the model is not compiled, or a saved model cannot be read (e.g.
            custom layers).

    Example:

    >>> type(load_model("batchfit.examples.models:cnn")).__name__
    'Functional'
    """
    spec = _check_spec(spec, "model")
    if spec.lower().endswith(_SAVED_SUFFIXES):
        return _load_saved_model(spec)
    factory, where = _resolve(spec, "model")
    return model_from_factory(factory, where)


def model_from_factory(factory: Callable[[], Any], where: str | None = None) -> Any:
    """Call a zero-argument factory and check that it returned a compiled ``keras.Model``.

    Args:
        factory: the function to call.
        where: how error messages name it (default: its ``__name__``).

    Raises:
        ModelLoadError: the factory raised, or returned something that is not a compiled
            ``keras.Model``.

    Example:

    >>> from batchfit.examples.models import seed_mlp
    >>> model_from_factory(seed_mlp).name
    'seed_mlp'
    """
    where = where or getattr(factory, "__name__", "factory")
    obj = _call_factory(factory, where, "model")
    problem = _model_problem(obj, "in the factory")
    if problem is not None:
        raise ModelLoadError(f"What the factory {where} returned {problem}")
    return obj


def load_object(spec: str) -> tuple[Any, str]:
    """What a model spec names, unchecked: a saved model (loaded) or its factory's return value.

    For callers that accept more than a compiled model (``batchfit check`` takes a layer too).

    Returns:
        ``(object, where)``: ``where`` names the factory (or the file) in messages.

    Example:

    >>> obj, where = load_object("batchfit.examples.models:cnn")
    >>> type(obj).__name__, where
    ('Functional', "'batchfit.examples.models:cnn'")
    """
    spec = _check_spec(spec, "model")
    if spec.lower().endswith(_SAVED_SUFFIXES):
        return load_model(spec), spec
    factory, where = _resolve(spec, "model")
    return _call_factory(factory, where, "model"), where


def load_data(spec: str) -> Any:
    """Load the user's data from a spec: ``file.py:function`` or ``module:function``.

    The function takes no arguments and returns ``(x, y)`` (NumPy arrays, or lists/dicts of
    them), ``(x, y, sample_weight)``, a ``tf.data.Dataset`` or a ``keras.utils.PyDataset``.

    Args:
        spec: ``path/to/file.py:function`` or ``package.module:function``.

    Returns:
        What the function returned (check it with :class:`batchfit.backend.tensorflow.data.DataSample`).

    Raises:
        ModelLoadError: the file/module/function is missing, the function raised, or it
            returned something that is not data.

    Example:

    >>> # data.py:  def sample(): return np.zeros((64, 32, 32, 3)), np.zeros(64)
    >>> # x, y = load_data("data.py:sample")
    """
    spec = _check_spec(spec, "data")
    if spec.lower().endswith(_SAVED_SUFFIXES):
        raise ModelLoadError(
            f"'{spec}' is a saved model, not data. A data spec is 'path/to/file.py:function' or "
            "'package.module:function', the function returning (x, y) or a tf.data.Dataset.")
    fn, where = _resolve(spec, "data")
    obj = _call_factory(fn, where, "data")
    if not _looks_like_data(obj):
        raise ModelLoadError(
            f"The data function {where} returned {_describe(obj)}; it must return (x, y) "
            "(NumPy arrays, or lists/dicts of arrays), (x, y, sample_weight), a "
            "tf.data.Dataset or a keras.utils.PyDataset.")
    return obj


def check_model(model: Any) -> None:
    """Check that ``model`` is a compiled ``keras.Model`` that batchfit can probe.

    Args:
        model: the object to check.

    Returns:
        None.

    Raises:
        InvalidInputError: if it is not a ``keras.Model`` (a Layer, a ``tf.Module``, a Keras 2
            ``tf_keras`` model...: the message says how to wrap it) or is not compiled.

    Example:

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> check_model(m)
    Traceback (most recent call last):
    ...
    batchfit.errors.InvalidInputError: The model is not compiled: call model.compile(optimizer=..., loss=...) before measuring it.
    """
    problem = _model_problem(model)
    if problem is not None:
        raise InvalidInputError(f"The model {problem}")


# --------------------------------------------------------------------------------------------

def _model_problem(obj: Any, where: str = "before measuring it") -> str | None:
    """None if obj is a compiled keras.Model, else the end of a sentence saying what is wrong."""
    import keras

    if isinstance(obj, keras.Model):
        if not getattr(obj, "compiled", False) or getattr(obj, "optimizer", None) is None:
            return f"is not compiled: call model.compile(optimizer=..., loss=...) {where}."
        return None
    what = _describe(obj)
    if is_keras2_object(obj):
        return (f"is {what}, a Keras 2 (tf_keras) model; batchfit needs a Keras 3 keras.Model "
                "(import keras, not tf_keras).")
    if isinstance(obj, keras.layers.Layer):
        return (f"is {what}, a Layer, not a Model. Wrap it: model = keras.Sequential("
                "[keras.Input(shape), layer]); model.compile(optimizer=..., loss=...).")
    if isinstance(obj, type) and issubclass(obj, keras.Model):
        return (f"is the class {obj.__name__}, not an instance: return {obj.__name__}(...) "
                "built and compiled.")
    try:
        import tensorflow as tf

        if isinstance(obj, tf.Module):
            return (f"is {what}, a tf.Module, not a keras.Model. Wrap its computation in a "
                    "keras.layers.Layer (or a keras.Model subclass whose call() uses it) and "
                    "compile that.")
    except ImportError:  # pragma: no cover - TensorFlow is required here
        pass
    return f"is {what}, not a keras.Model."


def _check_spec(spec: Any, what: str) -> str:
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"A {what} spec must be a string such as {_SPEC_FORMS}; got {_describe(spec)}.")
    spec = os.fspath(spec).strip()
    if not spec:
        raise ModelLoadError(f"Empty {what} spec; expected {_SPEC_FORMS}.")
    return spec


def _split(spec: str, what: str) -> tuple[str, str]:
    head, sep, attr = spec.rpartition(":")
    if not sep or not head or not _ATTR_RE.match(attr) or (len(head) == 1 and head.isalpha()):
        example = "factory" if what == "model" else "function"
        hint = ""
        if spec.endswith(".py"):
            hint = f" Name the function in the file: '{spec}:{example}'."
        raise ModelLoadError(
            f"Cannot read the {what} spec '{spec}': no ':{example}' part.{hint} Expected "
            f"{_SPEC_FORMS if what == 'model' else repr('path/to/file.py:function') + ' or ' + repr('package.module:function')}.")
    return head, attr


def _resolve(spec: str, what: str) -> tuple[Callable[..., Any], str]:
    head, attr = _split(spec, what)
    if head.endswith(".py") or os.sep in head or "/" in head:
        module = _import_file(head, what)
    else:
        module = _import_module(head, what)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(
                f"'{head}' has no attribute '{attr}'. Callables it defines: "
                f"{_callables(module) or 'none'}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(
            f"'{attr}' in '{head}' is {_describe(obj)}, not a callable. Point the spec at a "
            f"function that takes no arguments and returns the {what}. Callables it defines: "
            f"{_callables(module) or 'none'}.")
    return obj, f"'{spec}'"


def _callables(module: types.ModuleType) -> str:
    own = []
    other = []
    for name, val in sorted(vars(module).items()):
        if name.startswith("_") or not callable(val) or isinstance(val, types.ModuleType):
            continue
        if getattr(val, "__module__", None) == module.__name__:
            own.append(name)
        elif inspect.isfunction(val):
            other.append(name)
    names = own or other
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")


def _module_name_for(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem) or "module"
    return f"_batchfit_user_{stem}_{digest}"


def _import_file(head: str, what: str) -> types.ModuleType:
    path = Path(head).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"File not found: '{head}' (looked in {Path.cwd()} for relative paths). The {what} "
            f"spec '{head}:...' names a Python file that must exist.")
    path = path.resolve()
    name = _module_name_for(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"Cannot import '{head}' as a Python file (is it a .py file?).")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # let the file import its neighbours (kept for unpickling)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise ModelLoadError(
            f"Importing '{head}' raised {type(e).__name__}: {e}") from e
    return module


def _import_module(head: str, what: str) -> types.ModuleType:
    try:
        return importlib.import_module(head)
    except ModuleNotFoundError as e:
        if e.name and (head == e.name or head.startswith(e.name + ".")):
            raise ModelLoadError(
                f"No module named '{head}' (for the {what} spec). Check the spelling, install "
                "it, or use a file path: 'path/to/file.py:factory'.") from e
        raise ModelLoadError(
            f"Importing '{head}' raised ModuleNotFoundError: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"Importing '{head}' raised {type(e).__name__}: {e}") from e


def _call_factory(fn: Callable[..., Any], where: str, what: str) -> Any:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        required = [p.name for p in sig.parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise ModelLoadError(
                f"The factory {where} takes required arguments ({', '.join(required)}); it must "
                f"be callable with no arguments. Give them defaults or wrap it: "
                f"def make(): return {getattr(fn, '__name__', 'factory')}(...).")
    try:
        return fn()
    except Exception as e:
        raise ModelLoadError(
            f"The {'factory' if what == 'model' else 'data function'} {where} raised "
            f"{type(e).__name__}: {e}") from e


def _load_saved_model(spec: str) -> Any:
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"File not found: '{spec}'. Expected a saved .keras model file.")
    import keras

    try:
        model = keras.saving.load_model(str(path))
    except Exception as e:
        text = f"{type(e).__name__}: {e}".strip()
        custom = any(k in text for k in ("Could not locate", "custom_objects", "Unknown layer",
                                         "Unknown object", "register_keras_serializable",
                                         "could not be deserialized"))
        hint = (" It uses custom layers or objects that Keras cannot find." if custom else "")
        raise ModelLoadError(
            f"Cannot load '{spec}' with keras.saving.load_model "
            f"({error_line(e, limit=None, with_type=True)}).{hint} "
            "Load it in Python with keras.saving.load_model(path, custom_objects={...}) and "
            "pass the model to batchfit, or use the factory form 'path/to/file.py:factory' "
            "(a function that imports your layers, loads or builds the model and compiles "
            "it).") from e
    problem = _model_problem(model)
    if problem is not None:
        raise ModelLoadError(
            f"The model saved in '{spec}' {problem} (save it after compiling, or use a "
            "factory: 'path/to/file.py:factory').")
    return model


def _looks_like_data(obj: Any) -> bool:
    if isinstance(obj, tuple) and 1 <= len(obj) <= 3:
        return True
    mod = type(obj).__module__ or ""
    if mod.startswith("tensorflow"):
        import tensorflow as tf

        if isinstance(obj, tf.data.Dataset):
            return True
    try:
        import keras

        if isinstance(obj, keras.utils.PyDataset):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(obj, (list, dict)) or hasattr(obj, "__array__")


def _describe(obj: Any) -> str:
    t = type(obj)
    name = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    if obj is None:
        return "None"
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, (tuple, list)):
        return f"a {name} of length {len(obj)}"
    return f"an object of type {name}"


__all__ = ["check_model", "load_data", "load_model"]
