"""The machinery every result shares: JSON round trips, the schema version, the kind registry.

A top-level result is a frozen dataclass deriving from :class:`_Serializable`, with a ``kind``
class attribute and the :func:`register_result` decorator; nested parts are plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from pathlib import Path
from typing import Any

#: Version history. 1: first release. 2: ``max_batch`` and ``tune`` results gained
#: ``replicas`` and ``distribute`` (per-replica and global batch sizes under ``tf.distribute``);
#: a version-1 file loads with ``replicas=1``. A reader refuses files newer than it knows.
SCHEMA_VERSION = 2


class _Serializable:
    """Mixin: ``to_dict``/``from_dict``/``to_json``/``from_json`` for (nested) dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        kind = getattr(type(self), "kind", None)
        if isinstance(kind, str):  # a top-level result: say what it is, for load_result
            data["result_kind"] = kind
        return data

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if isinstance(getattr(cls, "kind", None), str):
            check_schema_version(data)
        return _from_plain(cls, data)

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, _Serializable) and isinstance(getattr(type(obj), "kind", None), str):
        return obj.to_dict()  # a nested top-level result keeps its kind and derived fields
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _expect(data: Any, types: type, what: str) -> None:
    """A TypeError (a malformed file) when ``data`` is not of the JSON type a field needs."""
    if not isinstance(data, types) or (isinstance(data, bool) and types is not bool):
        raise TypeError(f"expected {what}, got {type(data).__name__} {str(data)[:40]!r}")


def _from_plain(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if data is None:  # null: a None field, or a float saved while not finite
        if origin in (list, tuple, dict) or dataclasses.is_dataclass(tp):
            raise TypeError(f"expected {'a list' if origin in (list, tuple) else 'an object'}, "
                            f"got null")
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_plain(args[0], data) if len(args) == 1 else data
    if origin in (list, tuple):
        _expect(data, list, "a list")
        (inner, *_) = typing.get_args(tp) or (Any,)
        values = [_from_plain(inner, v) for v in data]
        return tuple(values) if origin is tuple else values
    if origin is dict:
        _expect(data, dict, "an object")
        (_, inner) = typing.get_args(tp) or (Any, Any)
        return {k: _from_plain(inner, v) for k, v in data.items()}
    if tp is bool:
        _expect(data, bool, "true or false")
    elif tp in (int, float):
        _expect(data, numbers.Real, "a number")
    elif tp is str:
        _expect(data, str, "a string")
    if dataclasses.is_dataclass(tp):
        _expect(data, dict, f"an object ({tp.__name__})")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = _from_plain(hints[f.name], data[f.name])
        return tp(**kwargs)
    return data


_RESULT_KINDS: dict[str, type[_Serializable]] = {}


def register_result(cls: type) -> type:
    """Class decorator: make a top-level result loadable by :func:`load_result`.

    The class needs a ``kind`` class attribute; its JSON carries ``result_kind`` so a saved run
    is read back into the right class. ``to_dict`` adds ``result_kind`` automatically.
    """
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a ClassVar 'kind' to be registered")
    _RESULT_KINDS[kind] = cls
    return cls


def check_schema_version(data: dict[str, Any]) -> None:
    """Refuse a run saved by a newer batchfit, with the fix."""
    from ..core.validate import is_int
    from ..errors import InvalidInputError

    version = data.get("schema_version", SCHEMA_VERSION)
    if not is_int(version) or version < 1:
        raise InvalidInputError(f"not a batchfit result (schema_version {version!r}: expected "
                                f"a whole number from 1 to {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise InvalidInputError(
            f"this run was saved with schema_version {version}, newer than this batchfit "
            f"reads ({SCHEMA_VERSION}); upgrade batchfit to read it")


def load_result(path_or_text: str | Path) -> _Serializable:
    """Read any saved batchfit result (``--json`` output) back into its dataclass.

    Example:

    >>> from batchfit.results import MaxBatchResult
    >>> r = MaxBatchResult(max_batch_size=8, safe_batch_size=7, headroom=0.1,
    ...     memory_budget_bytes=2**20, budget_source="user", device="CPU:0",
    ...     isolation="process", search="guided", granularity=1, upper_bound=64,
    ...     bracketed=True, memory_model=None)
    >>> load_result(r.to_json()) == r
    True
    """
    from ..errors import InvalidInputError

    text = str(path_or_text)
    if not text.lstrip().startswith("{"):
        p = Path(path_or_text)
        if not p.is_file():
            raise InvalidInputError(f"no such result file: {p} (pass the path written by --json)")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"cannot read result file {p}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"not a batchfit result (invalid JSON: {exc})") from None
    if not isinstance(data, dict):
        raise InvalidInputError("not a batchfit result (expected a JSON object)")
    kind = data.get("result_kind", "max_batch")
    if not isinstance(kind, str) or kind not in _RESULT_KINDS:
        raise InvalidInputError(f"unknown result kind {kind!r}; known: {sorted(_RESULT_KINDS)}")
    try:
        return _RESULT_KINDS[kind].from_dict(data)
    except InvalidInputError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InvalidInputError(f"not a valid batchfit {kind!r} result ({exc})") from None
