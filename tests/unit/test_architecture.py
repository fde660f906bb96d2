"""The architecture's rules, checked on the source: one-way imports, no cycle, no stray backend.

- No import cycle between batchfit's modules, counting imports inside functions too (a lazy
  import still couples two modules: ``distribute -> maxbatch -> multiworker -> resilient ->
  distribute`` was such a circle).
- Every package but the TensorFlow backend imports without TensorFlow, Keras or JAX, checked
  in a fresh interpreter per package; and no source file names a framework in an import
  statement outside the backend allowed to: TensorFlow and Keras in
  ``batchfit.backend.tensorflow``, JAX and Keras in ``batchfit.backend.jax``, Keras alone in
  ``batchfit.backend.keras_common`` (what every Keras backend shares).
- The JAX backend reaches the TensorFlow package's Keras-generic modules only through
  ``batchfit.backend.keras_common``.
- The pure core imports nothing of batchfit above it (only ``errors``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import batchfit

PACKAGE = Path(batchfit.__file__).resolve().parent
BACKEND_PKG = "batchfit.backend.tensorflow"
JAX_PKG = "batchfit.backend.jax"
COMMON_PKG = "batchfit.backend.keras_common"
FRAMEWORKS = ("tensorflow", "keras", "tf_keras", "jax", "jaxlib")
#: Which frameworks each backend package may name in an import statement.
ALLOWED = {BACKEND_PKG: ("tensorflow", "keras", "tf_keras"), JAX_PKG: ("jax", "jaxlib", "keras"),
           COMMON_PKG: ("keras",)}
# The built-in example models are Keras models by definition (the seed's layers are TensorFlow
# custom layers, verbatim): they are the user's side of the seam, not batchfit's.
USER_SIDE = ("batchfit.examples",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every batchfit module ``path`` imports, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target in known and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            # A package's __init__ re-exporting its own submodules is not a cycle of design.
            if w.startswith(v + ".") or v.startswith(w + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_cycle_detector_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _allowed(name: str) -> tuple[str, ...]:
    for pkg, frameworks in ALLOWED.items():
        if name == pkg or name.startswith(pkg + "."):
            return frameworks
    return ()


def test_only_the_backends_import_a_framework() -> None:
    offenders = []
    for name, path in _modules().items():
        if name.startswith(USER_SIDE):
            continue
        allowed = _allowed(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            offenders += [f"{name}: {n}" for n in names
                          if n.split(".")[0] in FRAMEWORKS and n.split(".")[0] not in allowed]
    assert offenders == [], "\n".join(offenders)


def test_the_jax_backend_reaches_tensorflow_modules_only_through_keras_common() -> None:
    graph = _graph()
    bad = {m: sorted(t for t in deps if t.startswith(BACKEND_PKG))
           for m, deps in graph.items() if m == JAX_PKG or m.startswith(JAX_PKG + ".")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_verbs_reach_the_backend_only_through_the_seam() -> None:
    """A verb calls ``get_backend()``; it never imports a backend package (TensorFlow, JAX or
    their shared Keras module), not even lazily."""
    graph = _graph()
    backends = (BACKEND_PKG, JAX_PKG, COMMON_PKG)
    bad = {m: sorted(t for t in deps if t in backends or t.startswith(
               tuple(b + "." for b in backends)))
           for m, deps in graph.items()
           if m.startswith("batchfit.verbs")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_core_imports_only_core_results_and_errors() -> None:
    graph = _graph()
    bad = {m: sorted(t for t in deps
                     if not t.startswith(("batchfit.core", "batchfit.errors", "batchfit.results")))
           for m, deps in graph.items() if m.startswith("batchfit.core")}
    assert {m: d for m, d in bad.items() if d} == {}


def _packages() -> list[str]:
    return sorted(n for n, p in _modules().items()
                  if p.name == "__init__.py" and not n.startswith((BACKEND_PKG, *USER_SIDE)))


@pytest.mark.parametrize("package", _packages())
def test_package_imports_without_tensorflow(package: str) -> None:
    """Importing the package and each of its own modules loads no framework (TensorFlow, Keras,
    JAX): the JAX backend and the shared Keras module too, whose imports are lazy."""
    modules = [n for n, p in _modules().items()
               if n == package or (n.rpartition(".")[0] == package and p.name != "__init__.py"
                                   and not n.endswith("__main__"))]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
            "print(','.join(bad)); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (f"importing {package} loaded {proc.stdout.strip()}: "
                                  f"{proc.stderr[-2000:]}")
