"""Tiny KerasHub models built from their config (no preset, no download), for the tests of
``check`` and input synthesis on real task models. Importing this module needs ``keras_hub``:
tests ``pytest.importorskip("keras_hub")`` first. Loadable by spec: ``tests/hub_models.py:bert``.
"""

from __future__ import annotations

import keras
import keras_hub

SEQ = 12


def bert(vocabulary: int = 100) -> keras.Model:
    """A BertTextClassifier (3 classes) around a 2-layer, 32-wide BertBackbone."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary, num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=2 * SEQ)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3,
                                               preprocessor=None)


def gpt2(vocabulary: int = 1000) -> keras.Model:
    """A GPT2CausalLM around a 2-layer, 32-wide GPT2Backbone (its own compiled loss)."""
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary, num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=2 * SEQ)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
