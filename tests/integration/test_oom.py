"""The OOM predicate knows TensorFlow's ResourceExhaustedError, wrapped or not, and nothing else."""

from __future__ import annotations

import pytest
import tensorflow as tf

from batchfit import is_oom_error


def test_resource_exhausted_error_is_oom() -> None:
    exc = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[9]")
    assert is_oom_error(exc)


def test_oom_reraised_as_text_inside_py_function_is_oom() -> None:
    def boom(x):
        try:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        except tf.errors.ResourceExhaustedError as exc:
            raise RuntimeError(f"loader failed: {exc!r}") from exc

    @tf.function
    def f(x):
        return tf.py_function(boom, [x], tf.float32)

    with pytest.raises(tf.errors.UnknownError) as info:
        f(tf.constant(1.0))
    # TensorFlow re-raises it as an UnknownError that carries the original only as text.
    assert is_oom_error(info.value)


def test_resource_exhausted_wrapped_in_unknown_error_is_oom() -> None:
    def boom(x):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    @tf.function
    def f(x):
        return tf.py_function(boom, [x], tf.float32)

    with pytest.raises(tf.errors.UnknownError) as info:
        f(tf.constant(1.0))
    assert is_oom_error(info.value)


def test_oom_as_cause_of_another_error_is_oom() -> None:
    try:
        try:
            raise tf.errors.ResourceExhaustedError(None, None, "no memory")
        except tf.errors.ResourceExhaustedError as inner:
            raise RuntimeError("training step failed") from inner
    except RuntimeError as outer:
        assert is_oom_error(outer)


@pytest.mark.parametrize("exc", [
    ValueError("Batch size 129 exceeds maximum allowed 128"),
    tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [3,4] vs. [3,5]"),
    tf.errors.UnknownError(None, None, "some py_function failed"),
    KeyError("tokens"),
    MemoryError(),
    None,
])
def test_other_errors_are_not_oom(exc) -> None:
    assert not is_oom_error(exc)


def test_real_eager_error_is_not_oom() -> None:
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        tf.matmul(tf.ones((2, 3)), tf.ones((4, 5)))
    assert not is_oom_error(info.value)
