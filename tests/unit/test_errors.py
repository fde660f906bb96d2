"""batchfit.errors.error_line: the one line of an exception that messages quote (no TensorFlow)."""

from __future__ import annotations

import pytest

from batchfit.errors import error_line

# A layer error as Keras 3 wraps it: a frame line, the layer's own error in bold, the arguments.
KERAS_WRAPPED = (
    "Exception encountered when calling Dense.call().\n\n"
    "\x1b[1mInput 0 of layer \"dense\" is incompatible with the layer: expected axis -1 of input "
    "shape to have value 4, but received input with shape (2, 3)\x1b[0m\n\n"
    "Arguments received by Dense.call():\n  • inputs=tf.Tensor(shape=(2, 3), dtype=float32)")
OWN_ERROR = ("Input 0 of layer \"dense\" is incompatible with the layer: expected axis -1 of input "
             "shape to have value 4, but received input with shape (2, 3)")
# A TensorFlow out-of-memory error: the OOM line is buried under the graph frame.
TF_OOM = ("Graph execution error:\n\nDetected at node model/dense/MatMul defined at (most recent "
          "call last):\n  File \"train.py\", line 3, in <module>\n\n"
          "OOM when allocating tensor with shape[1024,1024] and type float on GPU:0\n"
          "\t [[{{node model/dense/MatMul}}]]")
OOM_LINE = "OOM when allocating tensor with shape[1024,1024] and type float on GPU:0"
# The failure line of a probe: OOM or a limit exceeded first, else the last line naming an Error.
PROBE = {"limit": None, "with_type": True, "prefer": "OOM|exceeds", "prefer_last": "Error"}


def test_plain_message_is_its_first_line() -> None:
    assert error_line(ValueError("first line\nsecond line")) == "first line"
    assert error_line(ValueError("bad size"), with_type=True) == "ValueError: bad size"


def test_none_and_empty_messages() -> None:
    assert error_line(None) == ""
    assert error_line(ValueError("")) == ""
    assert error_line(ValueError("  \n\n ")) == ""
    assert error_line(KeyError(), with_type=True) == "KeyError"
    assert error_line(ValueError(""), keras_frame=True) == "ValueError"


def test_blank_lines_padding_and_ansi_codes_are_dropped() -> None:
    assert error_line(ValueError("\n\n  padded  \nnext")) == "padded"
    assert error_line(ValueError("\x1b[1mbold\x1b[0m and \x1b[31mred\x1b[0m")) == "bold and red"


def test_characters_at_the_ends_of_a_line_are_kept() -> None:
    # Only ANSI codes and blanks go: a line ending in "0" or "m" keeps it.
    assert error_line(ValueError("Batch size 100"), **PROBE) == "ValueError: Batch size 100"
    assert error_line(ValueError("Error in custom_norm"), **PROBE) == \
        "ValueError: Error in custom_norm"


def test_limit_counts_the_line_not_the_type_name() -> None:
    assert error_line(ValueError("x" * 400)) == "x" * 300
    assert error_line(ValueError("x" * 400), limit=200) == "x" * 200
    assert error_line(ValueError("x" * 400), limit=None) == "x" * 400
    assert error_line(ValueError("x" * 400), limit=5, with_type=True) == "ValueError: xxxxx"


def test_prefer_picks_the_first_oom_line() -> None:
    exc = RuntimeError(TF_OOM)
    assert error_line(exc) == "Graph execution error:"
    assert error_line(exc, with_type=True, prefer="OOM") == f"RuntimeError: {OOM_LINE}"
    assert error_line(exc, **PROBE) == f"RuntimeError: {OOM_LINE}"
    exhausted = RuntimeError("RESOURCE_EXHAUSTED: failed\nOut of memory while trying to allocate")
    assert error_line(exhausted, prefer=r"OOM|(?i:out of memory)") == \
        "Out of memory while trying to allocate"
    assert error_line(ValueError("a\nBatch size 129 exceeds maximum allowed 128"), **PROBE) == \
        "ValueError: Batch size 129 exceeds maximum allowed 128"


def test_prefer_last_picks_the_last_matching_line_when_prefer_matches_none() -> None:
    exc = ValueError("context\nTypeError: first\nmore\nValueError: second\ntail")
    assert error_line(exc, **PROBE) == "ValueError: ValueError: second"
    assert error_line(ValueError("context\nno match"), **PROBE) == "ValueError: context"
    both = ValueError("OOM here\nError later")
    assert error_line(both, **PROBE) == "ValueError: OOM here"


def test_keras_frame_quotes_the_layers_own_error() -> None:
    exc = ValueError(KERAS_WRAPPED)
    assert error_line(exc, keras_frame=True) == OWN_ERROR
    # Without keras_frame, the frame's first line is the first line.
    assert error_line(exc) == "Exception encountered when calling Dense.call()."
    only_frame = ValueError("Exception encountered when calling X.call().\n\n"
                            "Arguments received by X.call():\n  • x=1")
    assert error_line(only_frame, keras_frame=True) == "ValueError"
    traceback = RuntimeError("Traceback (most recent call last):\n  File \"a.py\", line 1\n"
                             "the cause")
    assert error_line(traceback, keras_frame=True) == "the cause"


def test_keras_frame_cuts_a_long_line_at_its_first_sentence() -> None:
    long = "The layer refused the batch. " + "Details follow " * 20
    assert error_line(ValueError(long), keras_frame=True) == "The layer refused the batch."
    short = "Short. Two sentences."
    assert error_line(ValueError(short), keras_frame=True) == short
    assert error_line(ValueError(long)) == long.strip()[:300]


@pytest.mark.parametrize("text", ["", "one", "a\nb", KERAS_WRAPPED, TF_OOM, "\x1b[1m\x1b[0m"])
def test_result_is_one_line(text: str) -> None:
    for kwargs in ({}, {"keras_frame": True}, PROBE, {"with_type": True, "prefer": "OOM"}):
        assert "\n" not in error_line(RuntimeError(text), **kwargs)
