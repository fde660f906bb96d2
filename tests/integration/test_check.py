"""``batchfit check`` over a gallery of layers written as users write them.

Each broken layer of :mod:`check_gallery` is caught by the check meant for it and by no other;
the seed's layers and Keras's own pass. One ``check`` call per layer, shared module-wide.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import check_gallery as g
import keras
import numpy as np
import pytest

from batchfit import check
from batchfit.errors import InvalidInputError, LayerBuildError
from batchfit.results import CHECKS, CheckResult

ROOT = Path(__file__).resolve().parents[2]

GALLERY = {
    "seed_custom": (lambda: g.MyCustomLayer(16), (16,)),
    "seed_variable_code": (g.MyVariableBatchLayer, (5, 3)),      # axis=1, as the code does
    "seed_variable_comment": (g.SeedCommentVariable, (5, 3)),    # axis=0, as the comment says
    "seed_memory_aware": (g.MemoryAwareLayer, (6,)),
    "graph_safe_limit": (lambda: g.GraphSafeLimit(32), (6,)),
    "static_batch": (g.StaticBatchFlatten, (4, 3)),
    "sample_mixing": (g.BatchCentering, (6,)),
    "retracing": (g.PythonIntRetracing, (6,)),
    "export": (g.UntrackedTableLayer, (6,)),
    "keras_dense": (lambda: keras.layers.Dense(4), (8,)),
    "keras_conv2d": (lambda: keras.layers.Conv2D(4, 3), (8, 8, 3)),
    "keras_layernorm": (keras.layers.LayerNormalization, (6,)),
    "keras_dropout": (lambda: keras.layers.Dropout(0.5), (6,)),
    "keras_batchnorm": (keras.layers.BatchNormalization, (6,)),
}

# What each gallery layer must produce: exactly these (check, severity) findings.
EXPECTED = {
    "seed_custom": set(),
    "seed_variable_code": set(),
    "seed_variable_comment": {("dynamic_batch", "error")},
    # The seed's `if` on a tensor: a clear refusal eagerly, but it cannot be traced.
    "seed_memory_aware": {("dynamic_batch", "error"), ("batch_limit", "info")},
    "graph_safe_limit": {("batch_limit", "info")},
    "static_batch": {("dynamic_batch", "error"), ("static_shape", "warning")},
    "sample_mixing": {("sample_mixing", "warning")},
    "retracing": {("retracing", "warning")},
    "export": {("export", "error")},
    "keras_dense": set(),
    "keras_conv2d": set(),
    "keras_layernorm": set(),
    "keras_dropout": set(),
    "keras_batchnorm": {("sample_mixing", "info")},
}


@pytest.fixture(scope="module")
def results() -> dict[str, CheckResult]:
    out = {}
    for key, (make, shape) in GALLERY.items():
        out[key] = check(make(), input_shape=shape)
    return out


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_each_layer_gets_exactly_its_findings(results, key) -> None:
    got = {(f.check, f.severity) for f in results[key].findings}
    assert got == EXPECTED[key], [f.message for f in results[key].findings]
    report = results[key].layers[0]
    assert set(report.statuses) == set(CHECKS)


def test_seed_layers_pass_every_check(results) -> None:
    for key in ("seed_custom", "seed_variable_code"):
        statuses = results[key].layers[0].statuses
        assert set(statuses.values()) == {"ok"}, statuses


def test_seed_comment_variant_loses_the_batch_dimension(results) -> None:
    (f,) = results["seed_variable_comment"].findings
    assert "batch dimension is 5" in f.message and "axis=1" in f.fix
    assert f.location.endswith("check_gallery.py:" + str(_call_line(g.SeedCommentVariable)))
    statuses = results["seed_variable_comment"].layers[0].statuses
    assert statuses["sample_mixing"].startswith("skipped")
    assert statuses["export"].startswith("skipped")


def test_static_batch_points_at_the_line_and_skips_dependent_checks(results) -> None:
    r = results["static_batch"]
    static = next(f for f in r.findings if f.check == "static_shape")
    line = _call_line(g.StaticBatchFlatten) + 1  # `batch = x.shape[0]`
    assert static.location.endswith(f"check_gallery.py:{line}")
    assert "tf.shape(x)[0]" in static.fix
    dynamic = next(f for f in r.findings if f.check == "dynamic_batch")
    assert "None" in dynamic.message and f"check_gallery.py:{line}" in dynamic.fix
    for name in ("partial_batch", "export"):
        assert r.layers[0].statuses[name].startswith("skipped")


def test_memory_aware_limit_is_found_exactly(results) -> None:
    r = results["seed_memory_aware"]
    info = next(f for f in r.findings if f.check == "batch_limit")
    assert "above 128" in info.message and "Batch size 129 exceeds maximum allowed 128" in \
        info.message
    dynamic = next(f for f in r.findings if f.check == "dynamic_batch")
    assert "OperatorNotAllowedInGraphError" in dynamic.message
    assert "assert_less_equal" in dynamic.fix
    assert results["graph_safe_limit"].layers[0].details["batch_limit"] == "32"


def test_retracing_names_the_function_and_counts(results) -> None:
    (f,) = results["retracing"].findings
    assert "_scale_by_count" in f.message and "traced 5 times" in f.message
    assert results["seed_custom"].layers[0].details["retracing"] == \
        "traces: eager 0, tf.function 2, fit 1"


def test_export_and_mixing_messages(results) -> None:
    (f,) = results["export"].findings
    assert "untracked" in f.message and "attributes of the layer" in f.fix
    (m,) = results["sample_mixing"].findings
    assert "depends on the other samples" in m.message
    (bn,) = results["keras_batchnorm"].findings
    assert "BatchNormalization" in bn.message


def test_a_model_with_a_few_custom_layers_checks_its_custom_layers_in_under_a_minute() -> None:
    model = g.gallery_model()
    before = [w.copy() for w in model.get_weights()]
    nodes = [len(layer._inbound_nodes) for layer in model.layers]
    start = time.perf_counter()
    result = check(model)
    seconds = time.perf_counter() - start
    assert seconds < 60, seconds
    assert [r.class_name.rsplit(".", 1)[-1] for r in result.layers] == \
        ["MyVariableBatchLayer", "BatchCentering", "MyCustomLayer"]
    assert [(f.layer, f.check, f.severity) for f in result.findings] == \
        [(result.layers[1].layer, "sample_mixing", "warning")]
    assert result.layers[0].input_shape == [12, 16]
    # The user's model is left as it was: weights and graph.
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert [len(layer._inbound_nodes) for layer in model.layers] == nodes
    model.predict(np.zeros((3, 12, 16), "float32"), verbose=0)


class _DropoutAndCount(keras.layers.Layer):
    """A custom layer with state that get_weights() leaves out (Dropout's seed) and state
    that every call changes (a call counter)."""

    def build(self, input_shape):
        self.dropout = keras.layers.Dropout(0.5)
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                     name="calls")

    def call(self, x, training=None):
        self.calls.assign_add(1.0)
        return self.dropout(x, training=training)


def test_check_leaves_every_variable_of_the_model_as_it_was() -> None:
    inp = keras.Input((6,))
    out = keras.layers.Dense(1)(_DropoutAndCount()(inp))
    model = keras.Model(inp, out)
    model.compile("sgd", "mse")
    model.fit(np.ones((8, 6), "float32"), np.ones((8, 1), "float32"), verbose=0)
    before = {v.path: np.array(v.numpy(), copy=True) for v in model.variables}
    check(model)
    changed = [v.path for v in model.variables
               if not np.array_equal(v.numpy(), before[v.path])]
    assert changed == []   # seed-generator state and the counter included


def test_subclassed_model_layers_are_seen_by_calling_the_model() -> None:
    from batchfit.examples.models import seed_memory_aware

    result = check(seed_memory_aware(limit=8))
    assert [r.input_shape for r in result.layers] == [[32]]
    assert result.layers[0].details["batch_limit"] == "8"


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(LayerBuildError, match=r"my_custom_layer.*seed\.py:\d+.*\(16,\)"):
        check(g.MyCustomLayer(64), input_shape=(16,))
    with pytest.raises(InvalidInputError, match="not built: pass input_shape"):
        check(g.BatchCentering())
    with pytest.raises(InvalidInputError, match="keras.Model or a keras.layers.Layer"):
        check(np.zeros(3))
    with pytest.raises(InvalidInputError, match="no custom layer named"):
        check(g.gallery_model(), layers=["nope"])


def test_cli_exit_1_on_error_findings_and_2_on_bad_input(tmp_path, capsys, monkeypatch) -> None:
    from batchfit.cli import main

    monkeypatch.chdir(ROOT)
    code = main(["check", "tests/check_gallery.py:static_batch_layer", "--input-shape", "4x3",
                 "--json", str(tmp_path / "bad.json")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "dynamic_batch" in out and "check_gallery.py:" in out and "FAIL" in out
    findings = json.loads((tmp_path / "bad.json").read_text())["findings"]
    assert {f["check"] for f in findings} == {"dynamic_batch", "static_shape"}

    for args, words in (
            (["no/such/file.py:build"], ["not found"]),
            (["tests/models_for_tests.py:not_a_model"], ["keras.Model", "Layer"]),
            (["tests/check_gallery.py:mismatched_layer", "--input-shape", "16"],
             ["my_custom_layer", "fails on an ordinary batch", "seed.py"]),
            (["tests/check_gallery.py:gallery_model", "--max-batch", "1"], ["max_batch"])):
        code = main(["check", *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        for word in words:
            assert word.lower() in err.lower(), err
        assert "Traceback" not in err


def _call_line(cls: type) -> int:
    import inspect

    return inspect.getsourcelines(cls.call)[1]


def test_sample_spec_names_and_a_subclassed_model_checked_as_a_layer() -> None:
    r = check(g.BatchCentering(), sample=np.zeros((4, 6), "float32"))
    assert r.layers[0].input_shape == [6]
    assert [f.check for f in r.findings] == ["sample_mixing"]
    model = g.gallery_model()
    centring = next(layer.name for layer in model.layers if isinstance(layer, g.BatchCentering))
    r = check(model, layers=[centring])
    assert [x.layer for x in r.layers] == [centring] and len(r.findings) == 1

    class Centred(keras.Model):
        def call(self, x):
            return x - keras.ops.mean(x, axis=0)

    model = Centred()
    model.build((None, 5))
    r = check(model, input_shape=(None, 5))
    assert [(f.check, f.severity) for f in r.findings] == [("sample_mixing", "warning")]


class StopGradientCentering(keras.layers.Layer):
    """Centres on the batch mean without a gradient through it (as straight-through or
    frozen-statistics layers do): the output still depends on the other samples."""

    def call(self, x):
        return x - keras.ops.stop_gradient(keras.ops.mean(x, axis=0, keepdims=True))


class ReadsItsKernelShape(keras.layers.Layer):
    """Correct: reads the static shape of its own weight, never of the batch."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 4))

    def call(self, x):
        units = self.kernel.shape[0]
        rows, cols = self.kernel.shape
        return keras.ops.matmul(keras.ops.reshape(x, (-1, units)), self.kernel) * (rows / cols)


def test_sample_mixing_without_a_gradient_path_is_found() -> None:
    r = check(StopGradientCentering(), input_shape=(6,))
    assert [(f.check, f.severity) for f in r.findings] == [("sample_mixing", "warning")]


def test_static_shape_of_the_layers_own_weights_is_not_a_batch_read() -> None:
    r = check(ReadsItsKernelShape(), input_shape=(6,))
    assert r.findings == [], [f.message for f in r.findings]
