"""Find reads of the static batch size in a layer's source, without running it (pure Python).

A Keras layer that reads ``x.shape[0]`` gets ``None`` whenever the batch dimension is unknown:
when a functional model is built, on the partial last batch of ``fit``, in ``model.export``.
This module parses the source of a layer's ``call`` and of the helpers it calls in the same
module (methods of the class reached through ``self.name(...)``, module-level functions called
by name) and reports each such read with its ``file:line``:

- ``x.shape[0]``, ``x.get_shape()[0]``, ``x.shape.as_list()[0]``, ``int_shape(x)[0]``
  (and ``int(...)`` of them);
- unpacking the static shape, ``batch, steps, dim = x.shape``;
- Python loops over the batch, ``for i in range(x.shape[0])`` / ``for sample in x`` /
  ``len(x)``, and ``tf.unstack(x)`` without ``num=``.

Reads of the dynamic shape (``tf.shape(x)[0]``, ``keras.ops.shape(x)[0]``) are the fix and are
never reported. It imports neither TensorFlow nor Keras.

Example:

>>> src = '''
... class Flatten2:
...     def call(self, x):
...         return reshape(x, (x.shape[0], -1))
... '''
>>> [(u.line, u.kind) for u in scan_source(src, "Flatten2")]
[(4, 'shape_index')]
"""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FRAMEWORK_ROOTS", "StaticShapeUse", "format_location", "is_framework_class",
           "locate_method", "method_owner", "scan_class", "scan_source"]

#: Top-level packages whose source is never scanned: the framework's own code is tested by it,
#: and a finding there is not the user's to fix.
FRAMEWORK_ROOTS = ("keras", "tf_keras", "tensorflow", "builtins")

_FIX = "read the batch size at run time: tf.shape(x)[0] or keras.ops.shape(x)[0]"
_SHAPE_FUNCS = {"int_shape"}
_SKIP_PARAMS = {"self", "training", "mask", "kwargs", "args"}


@dataclass(frozen=True)
class StaticShapeUse:
    """One read of the static batch size found in source.

    Attributes:
        filename: the source file.
        line: 1-based line number in that file.
        function: the function it is in (``call`` or a helper's name).
        code: the source line, stripped.
        kind: ``shape_index``, ``int_of_shape``, ``unpack_shape``, ``loop_over_batch``,
            ``len_of_tensor`` or ``unstack``.
        message: one line: what it does and why it breaks.
        fix: one line: what to write instead.
    """

    filename: str
    line: int
    function: str
    code: str
    kind: str
    message: str
    fix: str = _FIX

    @property
    def location(self) -> str:
        """``file:line``, the file relative to the working directory when under it."""
        return format_location(self.filename, self.line)


def format_location(filename: str, line: int) -> str:
    """``file:line`` with ``file`` relative to the current directory when it lies under it.

    Example:

    >>> format_location("/nowhere/layers.py", 12)
    '/nowhere/layers.py:12'
    """
    try:
        rel = os.path.relpath(filename)
        if not rel.startswith(".."):
            filename = rel
    except ValueError:  # another drive (Windows)
        pass
    return f"{filename}:{line}"


def locate_method(cls: type, method: str = "call") -> tuple[str, int] | None:
    """Where ``cls.method`` is defined: ``(file, line of its def)``, or None if unknown.

    Follows the MRO to the class that defines ``method`` and unwraps decorators
    (``functools.wraps``, ``tf.function``'s ``python_function``).

    Example:

    >>> class A:
    ...     def call(self, x):
    ...         return x
    >>> locate_method(A) is None or locate_method(A)[1] > 0
    True
    """
    for klass in inspect.getmro(cls):
        if method in vars(klass):
            fn = _unwrap(vars(klass)[method])
            try:
                filename = inspect.getsourcefile(fn) or inspect.getfile(fn)
                _, line = inspect.getsourcelines(fn)
            except (OSError, TypeError):
                return None
            return filename, int(line)
    return None


def method_owner(cls: type, method: str = "call") -> type | None:
    """The class in ``cls``'s MRO that defines ``method`` (None if none does).

    Example:

    >>> class A:
    ...     def call(self, x):
    ...         return x
    >>> class B(A):
    ...     pass
    >>> method_owner(B).__name__
    'A'
    """
    return next((k for k in inspect.getmro(cls) if method in vars(k)), None)


def is_framework_class(cls: type) -> bool:
    """Whether ``cls`` belongs to Keras, TensorFlow or Python itself (see FRAMEWORK_ROOTS).

    Example:

    >>> is_framework_class(dict), is_framework_class(StaticShapeUse)
    (True, False)
    """
    return (getattr(cls, "__module__", "") or "").split(".")[0] in FRAMEWORK_ROOTS


def scan_class(cls: type, method: str = "call") -> list[StaticShapeUse]:
    """Scan ``cls.method`` and the same-module helpers it calls for static batch reads.

    Args:
        cls: the layer class.
        method: the method to start from (default ``"call"``).

    Returns:
        The reads found, in file order; ``[]`` when the source cannot be read (a class built
        at run time, a compiled module), or when ``method`` is the framework's own (a class
        that inherits ``call`` from Keras, as a functional model does: Keras's source is never
        scanned).

    Example:

    >>> class Ok:
    ...     def call(self, x):
    ...         return x
    >>> scan_class(Ok)
    []
    """
    owner = method_owner(cls, method)
    if owner is None or is_framework_class(owner):
        return []
    try:
        filename = inspect.getsourcefile(owner)
        if filename is None:
            return []
        source = Path(filename).read_text(encoding="utf-8")
    except (OSError, TypeError, UnicodeDecodeError):
        return []
    return scan_source(source, owner.__qualname__, filename, method)


def scan_source(source: str, qualname: str, filename: str = "<source>",
                method: str = "call") -> list[StaticShapeUse]:
    """Scan the class ``qualname`` in module ``source`` (see :func:`scan_class`).

    Args:
        source: the whole module's source text.
        qualname: the class's qualified name (``Outer.Inner`` for a nested class;
            ``<locals>`` parts, for classes defined in functions, are skipped).
        filename: reported in the results.
        method: the method to start from.

    Returns:
        The reads found, sorted by line.

    Raises:
        ValueError: if ``source`` is not valid Python.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise ValueError(f"cannot parse {filename}: {exc}") from None
    lines = source.splitlines()
    cls_node = _find_class(tree, [p for p in qualname.split(".") if p != "<locals>"])
    if cls_node is None:
        return []
    methods = _class_methods(tree, cls_node)
    functions = {n.name: n for n in tree.body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    start = methods.get(method)
    if start is None:
        return []
    tensor_params = {a.arg for a in (start.args.posonlyargs + start.args.args)
                     if a.arg not in _SKIP_PARAMS}
    scanner = _Scanner(filename, lines, tensor_params)
    todo, seen = [start], set()
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        scanner.scan(fn)
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    and f.value.id in ("self", "cls") and f.attr in methods):
                todo.append(methods[f.attr])
            elif isinstance(f, ast.Name) and f.id in functions:
                todo.append(functions[f.id])
    return sorted(scanner.found, key=lambda u: (u.line, u.kind))


# --------------------------------------------------------------------------------------------

def _unwrap(fn: Any) -> Any:
    fn = getattr(fn, "python_function", fn)  # tf.function
    fn = getattr(fn, "__func__", fn)         # staticmethod / classmethod
    try:
        return inspect.unwrap(fn)
    except ValueError:
        return fn


def _find_class(tree: ast.AST, path: list[str]) -> ast.ClassDef | None:
    """The ClassDef at ``path``; earlier parts may be classes or functions it is defined in."""
    if not path:
        return None
    head, rest = path[0], path[1:]
    kinds = (ast.ClassDef,) if not rest else (ast.ClassDef, ast.FunctionDef,
                                              ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds) and node.name == head and node is not tree:
            if not rest:
                return node  # type: ignore[return-value]
            found = _find_class(node, rest)
            if found is not None:
                return found
    return None


def _class_methods(tree: ast.Module, cls_node: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    """Methods of the class and of its bases defined in the same module (nearest wins)."""
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    methods: dict[str, Any] = {}
    todo, seen = [cls_node], set()
    while todo:
        c = todo.pop(0)
        if c.name in seen:
            continue
        seen.add(c.name)
        for n in c.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                methods.setdefault(n.name, n)
        for b in c.bases:
            if isinstance(b, ast.Name) and b.id in classes:
                todo.append(classes[b.id])
    return methods


def _is_zero(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == 0 and not isinstance(node.value, bool)


def _is_static_shape(node: ast.AST) -> bool:
    """``x.shape``, ``x.get_shape()``, ``x.shape.as_list()``, ``int_shape(x)`` (any prefix).

    The static shape of the layer's own attributes (``self.kernel.shape``: its weights) is
    known and has no batch dimension, so it is not one.
    """
    if isinstance(node, ast.Attribute) and node.attr == "shape":
        return not _of_self(node.value)
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("get_shape", "as_list"):
            return not _of_self(f.value)
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        return name in _SHAPE_FUNCS and not (node.args and _of_self(node.args[0]))
    return False


def _of_self(node: ast.AST) -> bool:
    """``self.name`` (or ``self.a.b``, ``self.a[i]``, ``self.a.get_shape()``): the layer's own
    attributes; not what its sublayers return (``self.dense(x)``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)) or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get_shape"):
        node = node.func if isinstance(node, ast.Call) else node.value
        if isinstance(node, ast.Name):
            return node.id in ("self", "cls")
    return False


def _is_batch_read(node: ast.AST) -> bool:
    return (isinstance(node, ast.Subscript) and _is_zero(node.slice)
            and _is_static_shape(node.value))


def _call_name(node: ast.Call) -> str | None:
    f = node.func
    if isinstance(f, ast.Attribute):
        return f.attr
    if isinstance(f, ast.Name):
        return f.id
    return None


class _Scanner:
    def __init__(self, filename: str, lines: list[str], tensor_params: set[str]) -> None:
        self.filename = filename
        self.lines = lines
        self.tensor_params = tensor_params
        self.found: list[StaticShapeUse] = []
        self._reported: set[int] = set()

    def _add(self, node: ast.AST, fn: str, kind: str, message: str) -> None:
        line = int(getattr(node, "lineno", 0))
        code = self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""
        self.found.append(StaticShapeUse(self.filename, line, fn, code, kind, message))

    def _mark(self, node: ast.AST) -> None:
        for n in ast.walk(node):
            self._reported.add(id(n))

    def scan(self, fn: ast.FunctionDef) -> None:
        """Report the static batch reads in ``fn``: unpacked shapes, loops, then the rest."""
        nodes = list(ast.walk(fn))
        batch_names = self._scan_unpacking(fn, nodes)
        self._scan_loops(fn, nodes, batch_names)
        for node in nodes:
            if id(node) in self._reported:
                continue
            if _is_batch_read(node):
                self._report_batch_read(fn, node)
            elif isinstance(node, ast.Call):
                self._scan_call(fn, node)

    def _scan_unpacking(self, fn: ast.FunctionDef, nodes: list[ast.AST]) -> set[str]:
        """Names bound to the static batch (``b = x.shape[0]``; ``b, t, d = x.shape``, which
        is reported)."""
        batch_names: set[str] = set()
        for node in nodes:
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                if isinstance(target, ast.Name) and _contains_batch_read(node.value):
                    batch_names.add(target.id)
                elif (isinstance(target, (ast.Tuple, ast.List)) and target.elts
                      and _is_static_shape(node.value)):
                    first = target.elts[0]
                    if isinstance(first, ast.Name) and first.id != "_":
                        batch_names.add(first.id)
                        self._add(node, fn.name, "unpack_shape",
                                  f"'{first.id}, ... = {ast.unparse(node.value)}' unpacks the "
                                  f"static batch size into '{first.id}', None when the batch "
                                  "is variable")
                        self._mark(node.value)
        return batch_names

    def _scan_loops(self, fn: ast.FunctionDef, nodes: list[ast.AST],
                    batch_names: set[str]) -> None:
        """Python loops over the batch."""
        for node in nodes:
            if isinstance(node, (ast.For, ast.comprehension)):
                over = self._loop_over_batch(node.iter, batch_names)
                if over is not None:
                    where = node if isinstance(node, ast.For) else node.iter
                    self._add(where, fn.name, "loop_over_batch",
                              f"Python loop over the batch ('for ... in {over}'): needs the static "
                              "batch size and unrolls one copy of the graph per sample")
                    self._mark(node.iter)

    def _loop_over_batch(self, it: ast.AST, batch_names: set[str]) -> str | None:
        """What a loop iterates over, when that is the batch; else None."""
        if isinstance(it, ast.Call) and _call_name(it) == "range" and any(
                _contains_batch_read(a) or _names(a) & batch_names for a in it.args):
            return ast.unparse(it)
        if isinstance(it, ast.Name) and it.id in self.tensor_params:
            return it.id
        if (isinstance(it, ast.Call) and _call_name(it) in ("enumerate", "zip")
                and any(isinstance(a, ast.Name) and a.id in self.tensor_params
                        for a in it.args)):
            return ast.unparse(it)
        return None

    def _report_batch_read(self, fn: ast.FunctionDef, node: ast.AST) -> None:
        parent_int = self._int_parent(fn, node)
        text = ast.unparse(node)
        if parent_int is not None:
            self._add(node, fn.name, "int_of_shape",
                      f"'{ast.unparse(parent_int)}' converts the static batch size to a "
                      "Python int; it is None when the batch is variable")
        else:
            self._add(node, fn.name, "shape_index",
                      f"'{text}' reads the static batch size, None when the batch is "
                      "variable (functional build, the partial last batch, export)")
        self._mark(node)

    def _scan_call(self, fn: ast.FunctionDef, node: ast.Call) -> None:
        """``len(x)`` of a tensor argument; ``unstack`` along the batch without ``num=``."""
        name = _call_name(node)
        args = node.args
        if (name == "len" and len(args) == 1 and isinstance(args[0], ast.Name)
                and args[0].id in self.tensor_params):
            self._add(node, fn.name, "len_of_tensor",
                      f"'len({args[0].id})' is the static batch size of a tensor, "
                      "unknown when the batch is variable")
        elif name == "unstack" and not any(k.arg == "num" for k in node.keywords):
            axis = next((k.value for k in node.keywords if k.arg == "axis"),
                        args[2] if len(args) > 2 else None)
            if axis is None or _is_zero(axis):
                self._add(node, fn.name, "unstack",
                          f"'{ast.unparse(node)}' splits along the batch: it needs the "
                          "static batch size")

    @staticmethod
    def _int_parent(fn: ast.AST, target: ast.AST) -> ast.Call | None:
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and _call_name(node) == "int"
                    and any(a is target for a in node.args)):
                return node
        return None


def _contains_batch_read(node: ast.AST) -> bool:
    return any(_is_batch_read(n) for n in ast.walk(node))


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
