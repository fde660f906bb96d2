"""Loading models and data from specs, and the error message of each way it can fail."""

from __future__ import annotations

import pickle
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from batchfit.backend.tensorflow.loader import check_model, load_data, load_model
from batchfit.errors import InvalidInputError, ModelLoadError

MODEL_FILE = '''
import keras
import numpy as np


class Config:
    """A class defined in the loaded file: instances must pickle."""

    def __init__(self, units):
        self.units = units


def make():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(Config(2).units)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def make_uncompiled():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def make_layer():
    return keras.layers.Dense(2)


def make_dict():
    return {"model": 1}


def broken():
    raise RuntimeError("no GPU here")


def needs_args(width, depth=2):
    return None


def data():
    return np.zeros((8, 3), "float32"), np.zeros((8, 2), "float32")


def dataset():
    import tensorflow as tf
    return tf.data.Dataset.from_tensor_slices(data()).batch(4)


def not_data():
    return 42


NOT_CALLABLE = 3
'''


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(MODEL_FILE)
    return path


def test_file_factory(model_file: Path) -> None:
    model = load_model(f"{model_file}:make")
    assert isinstance(model, keras.Model) and model.compiled
    names = [n for n, m in sys.modules.items()
             if getattr(m, "__file__", None) == str(model_file.resolve())]
    assert names and names[0].startswith("_batchfit_user_my_models_")
    cls = sys.modules[names[0]].Config
    restored = pickle.loads(pickle.dumps(cls(5)))  # classes of the file pickle
    assert restored.units == 5


def test_module_factory() -> None:
    model = load_model("batchfit.examples.models:seed_mlp")
    assert model.compiled and model.output_shape == (None, 1)


@pytest.mark.filterwarnings("ignore:Skipping variable loading")  # optimizer never stepped
def test_saved_keras_file(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = load_model(str(path))
    assert loaded.compiled and loaded.output_shape == (None, 2)


class _Unregistered(keras.layers.Layer):
    def call(self, x):
        return x * 2


def test_saved_keras_file_with_custom_layer(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((3,)), _Unregistered()])
    model.compile(optimizer="adam", loss="mse")
    path = tmp_path / "custom.keras"
    model.save(path)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    msg = str(err.value)
    assert "custom_objects" in msg and "file.py:factory" in msg


@pytest.mark.parametrize("spec_suffix,words", [
    (":make_uncompiled", ["not compiled", "model.compile(optimizer=..., loss=...)",
                          "in the factory"]),
    (":make_layer", ["Dense", "Layer, not a Model", "keras.Sequential"]),
    (":make_dict", ["dict", "not a keras.Model"]),
    (":broken", ["raised RuntimeError", "no GPU here"]),
    (":needs_args", ["required arguments", "width"]),
    (":missing", ["no attribute 'missing'", "make", "make_layer", "dataset"]),
    (":NOT_CALLABLE", ["not a callable"]),
    ("", ["no ':factory' part", ":factory'"]),
])
def test_model_spec_errors(model_file: Path, spec_suffix: str, words: list[str]) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(f"{model_file}{spec_suffix}")
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_factory_error_is_chained(model_file: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(f"{model_file}:broken")
    assert isinstance(err.value.__cause__, RuntimeError)
    assert isinstance(err.value, InvalidInputError) and isinstance(err.value, ValueError)


def test_missing_file_and_module(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="File not found"):
        load_model(f"{tmp_path}/nope.py:make")
    with pytest.raises(ModelLoadError, match="No module named 'no_such_pkg.models'"):
        load_model("no_such_pkg.models:make")
    with pytest.raises(ModelLoadError, match="File not found"):
        load_model(f"{tmp_path}/nope.keras")
    with pytest.raises(ModelLoadError, match="no ':factory' part"):
        load_model("batchfit.examples.models")


def test_import_error_inside_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ModelLoadError, match="Importing .* raised ModuleNotFoundError"):
        load_model(f"{path}:make")


def test_file_can_import_its_neighbours(tmp_path: Path) -> None:
    (tmp_path / "neighbour_layers_bf.py").write_text("UNITS = 4\n")
    path = tmp_path / "factory.py"
    path.write_text(textwrap.dedent('''
        import keras
        from neighbour_layers_bf import UNITS

        def make():
            m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(UNITS)])
            m.compile(optimizer="sgd", loss="mse")
            return m
    '''))
    assert load_model(f"{path}:make").output_shape == (None, 4)


def test_load_data(model_file: Path) -> None:
    x, _y = load_data(f"{model_file}:data")
    assert x.shape == (8, 3)
    assert isinstance(load_data(f"{model_file}:dataset"), tf.data.Dataset)
    with pytest.raises(ModelLoadError, match="returned an object of type int"):
        load_data(f"{model_file}:not_data")
    with pytest.raises(ModelLoadError, match="raised RuntimeError"):
        load_data(f"{model_file}:broken")
    with pytest.raises(ModelLoadError, match="saved model, not data"):
        load_data("model.keras")


def test_check_model() -> None:
    good = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(InvalidInputError, match=r"not compiled: call model.compile"):
        check_model(good)
    good.compile(optimizer="sgd", loss="mse")
    check_model(good)
    with pytest.raises(InvalidInputError, match="a Layer, not a Model. Wrap it"):
        check_model(keras.layers.Dense(2))
    with pytest.raises(InvalidInputError, match="tf.Module, not a keras.Model"):
        check_model(tf.Module())
    with pytest.raises(InvalidInputError, match="not a keras.Model"):
        check_model(np.zeros(3))
    with pytest.raises(InvalidInputError, match="class .* not an instance"):
        check_model(keras.Sequential)
