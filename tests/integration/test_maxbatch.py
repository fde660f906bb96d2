"""find_max_batch_size with real TensorFlow, in this process: limits, clear errors, names.

The searches that start worker processes (isolation, crashes) are in
tests/process/test_maxbatch_workers.py."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import batchfit
from batchfit.errors import InvalidInputError, ProbeFailedError

MODELS = "tests/models_for_tests.py"


@pytest.mark.parametrize("kwargs, words", [
    ({"strategy": "fastest"}, "strategy"),
    ({"search": "fastest"}, "search"),
    ({"granularity": 0}, "granularity"),
    ({"granularity": 2.5}, "granularity"),
    ({"headroom": 1.0}, "headroom"),
    ({"memory": "lots"}, "lots"),
    ({"memory": -5}, "-5"),
    ({"memory": 0}, "0"),
    ({"steps": 0}, "steps"),
    ({"isolate": "thread"}, "isolate"),
    ({"upper": 0}, "upper"),
])
def test_bad_arguments_raise_clear_errors_before_any_probe(kwargs, words) -> None:
    with pytest.raises(InvalidInputError, match=words):
        batchfit.find_max_batch_size(f"{MODELS}:seed_wide", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"headroom": 1.0}, "headroom must be a fraction in [0, 1), e.g. 0.1 for 10%, got 1.0"),
    ({"upper": 4, "granularity": 8},
     "max batch size (upper bound) must be an integer >= granularity (8), got 4"),
    ({"search_tolerance": 0.5}, ("search_tolerance must be a fraction in [0, 0.5), e.g. 0.02 "
                                 "for 2% or 0 for an exact answer, got 0.5")),
])
def test_argument_messages_keep_their_words(kwargs, message) -> None:
    with pytest.raises(InvalidInputError) as err:
        batchfit.find_max_batch_size(f"{MODELS}:seed_wide", **kwargs)
    assert str(err.value) == message


def test_a_factory_probed_in_process_reports_its_errors_as_before() -> None:
    # A factory probed here (isolate="none", or one defined in __main__ that no worker can
    # import, which falls back to this process): its error, and the model check's own words.
    from models_for_tests import raising_factory, uncompiled_model

    with pytest.raises(batchfit.errors.ModelLoadError) as err:
        batchfit.find_max_batch_size(raising_factory, memory="64MiB", isolate="none")
    assert str(err.value) == ("the model factory raised RuntimeError: cannot reach the "
                              "feature store")
    with pytest.raises(InvalidInputError) as err:
        batchfit.find_max_batch_size(uncompiled_model, memory="64MiB", isolate="none")
    assert str(err.value).startswith("The model is not compiled")


def test_numpy_numbers_are_taken_and_the_result_still_saves() -> None:
    from batchfit.examples.models import seed_mlp
    from batchfit.results import load_result

    r = batchfit.find_max_batch_size(seed_mlp(), memory="64MiB", isolate="none",
                                     upper=np.int64(64), granularity=np.int64(8),
                                     steps=np.int64(2), headroom=np.float32(0.25))
    assert (r.max_batch_size, r.upper_bound, r.granularity) == (64, 64, 8)
    assert load_result(r.to_json()) == r


def test_not_a_model_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="keras.Model"):
        batchfit.find_max_batch_size(42)


def test_in_process_search_checks_measured_peaks_against_the_budget() -> None:
    from models_for_tests import seed_wide

    r = batchfit.find_max_batch_size(seed_wide(), memory="32MiB", isolate="none")
    assert r.isolation == "in-process"
    assert any("not enforced" in n for n in r.notes)
    fits = [p for p in r.probes if p.fits]
    assert all(p.peak_bytes < 32 << 20 for p in fits)
    over = [p for p in r.probes if p.outcome in ("over_budget", "at_limit")]
    assert over and min(p.batch_size for p in over) > r.max_batch_size


def test_model_that_cannot_train_at_all_gets_its_own_error() -> None:
    inp = keras.Input((64, 32))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(inp)))
    model.compile("sgd", "mse")
    with pytest.raises(ProbeFailedError, match="reason other than memory"):
        batchfit.find_max_batch_size(  # data with the wrong feature count
            model, memory="64MiB", isolate="none",
            data=(np.zeros((4, 3), "float32"), np.zeros((4, 1), "float32")))


def test_a_tf_distribute_strategy_passed_as_strategy_says_to_pass_it_as_distribute() -> None:
    import tensorflow as tf
    from models_for_tests import seed_wide

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    for model in (seed_wide(), f"{MODELS}:seed_wide"):
        with pytest.raises(InvalidInputError, match="distribute=") as info:
            batchfit.find_max_batch_size(model, strategy=strategy)
        assert "MirroredStrategy" in str(info.value)


def test_the_old_name_strategy_warns_and_searches_with_that_policy() -> None:
    from models_for_tests import seed_wide

    with pytest.warns(FutureWarning, match="search="):
        old = batchfit.find_max_batch_size(seed_wide(), memory="32MiB", isolate="none",
                                           strategy="binsearch", upper=256)
    new = batchfit.find_max_batch_size(seed_wide(), memory="32MiB", isolate="none",
                                       search="binsearch", upper=256)
    assert old.search == new.search == "binsearch"
    assert [p.batch_size for p in old.probes][:3] == [2, 4, 8]  # binsearch's own start
    with pytest.raises(InvalidInputError, match="search= only"):
        batchfit.find_max_batch_size(seed_wide(), search="power", strategy="binsearch")


def test_one_resolver_for_a_spec_a_factory_and_a_model_object() -> None:
    from models_for_tests import seed_wide

    from batchfit.verbs.resolve import resolve

    spec = resolve(f"{MODELS}:seed_wide")
    assert spec.model is None and spec.rebuildable == f"{MODELS}:seed_wide"
    assert (spec.strategy, spec.replicas, spec.distribute, spec.multiworker) == (None, 1, "", False)
    built = resolve(seed_wide, build=True)
    assert built.model is not None and not built.given_object and built.rebuildable is seed_wide
    model = seed_wide()
    given = resolve(model)
    assert given.given_object and given.rebuildable is model and given.name == model.name
    with pytest.raises(InvalidInputError, match="keras.Model"):
        resolve(None)
