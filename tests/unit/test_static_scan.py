"""The AST scan for static batch reads: pure Python, no TensorFlow."""

from __future__ import annotations

import sys
import textwrap

import pytest

from batchfit.core.static_scan import locate_method, scan_class, scan_source


def _scan(body: str, qualname: str = "L") -> list[tuple[int, str]]:
    src = textwrap.dedent(body)
    return [(u.line, u.kind) for u in scan_source(src, qualname, "layers.py")]


@pytest.mark.parametrize("expr", ["x.shape[0]", "inputs.shape[0]", "x.get_shape()[0]",
                                  "x.shape.as_list()[0]", "K.int_shape(x)[0]"])
def test_static_batch_reads_are_found(expr) -> None:
    src = f"""
    class L:
        def call(self, x, inputs=None):
            n = {expr}
            return x
    """
    assert _scan(src) == [(4, "shape_index")]


def test_dynamic_reads_are_not_reported() -> None:
    src = """
    class L:
        def call(self, x):
            a = tf.shape(x)[0]
            b = keras.ops.shape(x)[0]
            c = x.shape[1]
            d = x.shape[-1]
            e = tf.unstack(x, axis=1)
            return tf.reshape(x, (a, -1))
    """
    assert _scan(src) == []


def test_int_unpack_loops_len_unstack() -> None:
    src = """
    class L:
        def call(self, x, training=None):
            n = int(x.shape[0])
            batch, steps, dim = x.shape
            for i in range(batch):
                pass
            rows = [r for r in x]
            k = len(x)
            parts = tf.unstack(x)
            _, t = x.shape
            return x
    """
    assert _scan(src) == [(4, "int_of_shape"), (5, "unpack_shape"), (6, "loop_over_batch"),
                          (8, "loop_over_batch"), (9, "len_of_tensor"), (10, "unstack")]


def test_loop_over_range_of_static_batch_is_one_finding() -> None:
    src = """
    class L:
        def call(self, x):
            for i in range(x.shape[0]):
                pass
            return x
    """
    assert _scan(src) == [(4, "loop_over_batch")]


def test_helpers_in_the_same_module_are_followed_with_their_lines() -> None:
    src = """
    def flatten(t):
        return reshape(t, (t.shape[0], -1))

    def unused(t):
        return t.shape[0]

    class Base:
        def _batch(self, t):
            return t.get_shape()[0]

    class L(Base):
        def call(self, x):
            return self._scale(flatten(x))

        def _scale(self, t):
            return t * self._batch(t)

        def other(self, t):
            return t.shape[0]
    """
    found = scan_source(textwrap.dedent(src), "L", "layers.py")
    assert [(u.line, u.function) for u in found] == [(3, "flatten"), (10, "_batch")]
    assert found[0].location.endswith("layers.py:3")
    assert "tf.shape(x)[0]" in found[0].fix


def test_nested_and_local_classes_and_missing_call() -> None:
    src = """
    def factory():
        class Inner:
            def call(self, x):
                return x.shape[0]
        return Inner
    class NoCall:
        pass
    """
    assert _scan(src, "factory.<locals>.Inner") == [(5, "shape_index")]
    assert _scan(src, "NoCall") == []
    assert _scan(src, "Absent") == []


def test_invalid_source_raises_value_error() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        scan_source("class L(:\n", "L")


class _Reads:
    def call(self, x):
        return x.shape[0]


class _Inherits(_Reads):
    pass


def test_scan_class_and_locate_method_on_real_classes() -> None:
    uses = scan_class(_Inherits)
    assert [u.kind for u in uses] == ["shape_index"]
    assert uses[0].filename.endswith("test_static_scan.py")
    filename, line = locate_method(_Inherits)
    assert filename.endswith("test_static_scan.py") and line == uses[0].line - 1
    assert scan_class(int) == [] and locate_method(int) is None


def test_the_scan_does_not_import_tensorflow() -> None:
    assert "batchfit.core.static_scan" in sys.modules
    import subprocess
    code = ("import sys, batchfit.core.static_scan; "
            "sys.exit(1 if {'tensorflow', 'keras'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0


def test_static_shapes_of_the_layers_own_attributes_are_not_batch_reads() -> None:
    src = """
    class L:
        def call(self, x):
            units = self.kernel.shape[0]
            rows, cols = self.kernel.shape
            n = int(self.kernel.get_shape()[0])
            m = K.int_shape(self.embeddings)[0]
            for i in range(self.table.shape.as_list()[0]):
                pass
            return x.shape[0]
    """
    assert _scan(src) == [(10, "shape_index")]



def _load_as(name: str, path, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_a_call_inherited_from_the_framework_is_never_scanned(tmp_path, monkeypatch) -> None:
    # A functional model's call is Keras's (`len(inputs)`, `for x in zip(inputs, masks)`): a
    # class that inherits it, as a KerasHub backbone does, has nothing of its own to scan.
    from batchfit.core.static_scan import is_framework_class, method_owner, scan_class

    path = tmp_path / "functional.py"
    path.write_text("class Functional:\n    def call(self, x):\n        return x.shape[0]\n")
    users = _load_as("users_functional", path, monkeypatch).Functional
    framework = _load_as("tf_keras.fake_functional", path, monkeypatch).Functional

    class Backbone(framework):
        pass

    assert len(scan_class(users)) == 1  # the same source, not the framework's: scanned
    assert method_owner(Backbone) is framework and is_framework_class(framework)
    assert scan_class(Backbone) == [] and scan_class(framework) == []
