"""The backend seam without a backend: which one is configured, and the errors for a missing one.

Nothing here imports TensorFlow: the configuration is read from the environment and keras.json,
and "installed" is asked of the import system without importing.
"""

from __future__ import annotations

import json

import pytest

from batchfit.backend import (
    SUPPORTED_BACKENDS,
    Backend,
    backend_name,
    configured_backend,
    require_backend,
)
from batchfit.errors import InvalidInputError, MissingBackendError


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return tmp_path


def test_keras_default_is_tensorflow(keras_home) -> None:
    assert configured_backend() == "tensorflow"


def test_keras_json_names_the_backend(keras_home) -> None:
    (keras_home / "keras.json").write_text(json.dumps({"backend": "jax", "floatx": "float32"}))
    assert configured_backend() == "jax"


def test_environment_wins_over_keras_json(keras_home, monkeypatch) -> None:
    (keras_home / "keras.json").write_text(json.dumps({"backend": "jax"}))
    monkeypatch.setenv("KERAS_BACKEND", " TensorFlow ")
    assert configured_backend() == "tensorflow"


def test_a_broken_keras_json_is_keras_default(keras_home) -> None:
    (keras_home / "keras.json").write_text("{not json")
    assert configured_backend() == "tensorflow"


@pytest.mark.parametrize("name", ["torch", "numpy", "mlx"])
def test_an_unsupported_backend_is_bad_input_naming_it(name, keras_home, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_BACKEND", name)
    with pytest.raises(MissingBackendError, match=name) as info:
        backend_name()
    assert isinstance(info.value, InvalidInputError)  # the CLI's exit 2
    assert "KERAS_BACKEND=tensorflow" in str(info.value)
    assert "KERAS_BACKEND or keras.json" in str(info.value)


def test_a_named_backend_is_checked_too() -> None:
    with pytest.raises(MissingBackendError, match="'torch'") as info:
        backend_name("torch")
    assert "tensorflow, jax" in str(info.value)  # the supported ones, listed
    assert backend_name("tensorflow") == "tensorflow"
    assert backend_name(" JAX ") == "jax"


def test_a_framework_not_installed_gives_the_install_command(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(MissingBackendError, match=r"pip install 'batchfit\[cpu\]'"):
        require_backend("tensorflow")


def test_every_supported_backend_implements_the_whole_seam() -> None:
    """No abstract method left unimplemented (a new method on Backend must be implemented)."""
    from batchfit.backend.jax import JaxBackend
    from batchfit.backend.tensorflow import TensorFlowBackend

    assert SUPPORTED_BACKENDS == ("tensorflow", "jax")
    for cls, name in ((TensorFlowBackend, "tensorflow"), (JaxBackend, "jax")):
        assert issubclass(cls, Backend)
        assert not cls.__abstractmethods__
        assert cls().name == name


def test_every_backend_call_outside_the_backend_is_declared_on_the_seam() -> None:
    """What verbs and workers ask of ``get_backend()`` is part of ``Backend``, so a second
    backend that implements the interface implements all they use."""
    import re
    from pathlib import Path

    import batchfit

    root = Path(batchfit.__file__).parent
    calls = set()
    for path in root.rglob("*.py"):
        if {"tensorflow", "jax"} & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8")
        calls |= set(re.findall(r"get_backend\(\)\.(\w+)", text))
        calls |= set(re.findall(r"\bbackend\.(\w+)\(", text))
    assert calls, "the scan found no call: the pattern is out of date"
    assert sorted(c for c in calls if not hasattr(Backend, c)) == []
