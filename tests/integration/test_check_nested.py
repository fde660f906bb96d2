"""``check`` on models that nest functional models, as KerasHub task models do: the nested
model is a container (its third-party layers are checked, Keras's own code never scanned),
every custom layer is checked or skipped with a reason, and ``input_shape`` by input name
reaches the nested layers. The KerasHub tests need ``keras_hub`` (``make`` installs it)."""

from __future__ import annotations

import keras
import pytest
from rich.console import Console

from batchfit import check
from batchfit.report.check import render_check
from batchfit.results import CheckResult


class Scale(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


class Pair(keras.layers.Layer):
    """Takes two positional inputs: it cannot be called alone on one input."""

    def call(self, a, b):
        return a + b


class Backbone(keras.Model):
    """A functional model of its own class, built as KerasHub builds its backbones."""

    def __init__(self, vocabulary: int = 50, dim: int = 8, **kwargs) -> None:
        tokens = keras.Input((None,), dtype="int32", name="token_ids")
        x = keras.layers.Embedding(vocabulary, dim)(tokens)
        s = Scale(name="scale")(x)
        y = Pair(name="pair")(s, x)
        super().__init__(tokens, y, **kwargs)


def _classifier() -> keras.Model:
    tokens = keras.Input((None,), dtype="int32", name="token_ids")
    h = Backbone(name="backbone")(tokens)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, out)


def _no_finding_in_keras(result: CheckResult) -> None:
    for f in result.findings:
        assert "/keras/" not in f.location.replace("\\", "/"), f


def test_a_nested_functional_model_is_a_container_not_a_layer() -> None:
    result = check(_classifier(), {"token_ids": (12,)})
    assert [r.layer for r in result.layers] == ["scale"]
    assert [(s.layer, s.class_name.rsplit(".", 1)[-1]) for s in result.skipped] == [
        ("pair", "Pair")]
    assert "several positional inputs" in result.skipped[0].reason
    _no_finding_in_keras(result)
    assert result.findings == []
    # The shape given by input name reached the layer inside the nested model.
    assert result.layers[0].input_shape == [12, 8]
    assert not any("taken as 8" in n for n in result.notes)
    assert CheckResult.from_json(result.to_json()) == result  # the skipped layers round-trip
    text = Console(width=200, record=True, color_system=None)
    render_check(result, text)
    shown = text.export_text()
    assert "1 not checked" in shown and "pair" in shown and "several positional" in shown


def test_without_a_shape_the_sequence_is_taken_as_8_with_a_note() -> None:
    result = check(_classifier())
    assert result.layers[0].input_shape == [8, 8]
    assert any("'token_ids'" in n and "taken as 8" in n for n in result.notes)


def test_a_graph_model_of_keras_layers_only_has_nothing_to_check() -> None:
    inp = keras.Input((None,), dtype="int32", name="token_ids")
    inner = keras.Model(inp, keras.layers.Embedding(10, 4)(inp))
    outer_in = keras.Input((None,), dtype="int32", name="token_ids")
    result = check(keras.Model(outer_in, inner(outer_in)))
    assert result.layers == [] and result.skipped == []
    assert any("no custom layers" in n for n in result.notes)


class OwnCallBackbone(Backbone):
    """A graph model whose class overrides call: that call is the user's code."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask) * 1.0


def test_a_graph_model_that_overrides_call_is_checked_too() -> None:
    tokens = keras.Input((None,), dtype="int32", name="token_ids")
    model = keras.Model(tokens, OwnCallBackbone(name="own")(tokens))
    result = check(model, {"token_ids": (6,)})
    assert [r.layer for r in result.layers] == ["own", "scale"]
    assert [s.layer for s in result.skipped] == ["pair"]
    _no_finding_in_keras(result)


def test_a_layer_named_among_the_skipped_is_not_unknown() -> None:
    result = check(_classifier(), {"token_ids": (6,)}, layers=["pair"])
    assert result.layers == [] and [s.layer for s in result.skipped] == ["pair"]


def test_kerashub_bert_classifier_checks_the_backbone_layers() -> None:
    pytest.importorskip("keras_hub")
    import hub_models

    result = check(hub_models.bert(), {"token_ids": (10,)})
    names = [r.layer for r in result.layers]
    assert names == ["position_embedding", "transformer_layer_0", "transformer_layer_1"]
    assert all(r.class_name.startswith("keras_hub.") for r in result.layers)
    assert result.skipped == []
    _no_finding_in_keras(result)
    assert not result.has_errors
    # token_ids=10 reached the layers inside the backbone (hidden size 32); the other inputs
    # took the same length.
    assert all(r.input_shape == [10, 32] for r in result.layers)
    assert any("'padding_mask'" in n and "(10,)" in n for n in result.notes)
    assert any("transformer_layer_0" in n and "padding_mask" in n for n in result.notes)
