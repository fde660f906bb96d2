"""batchfit under tf.distribute.MirroredStrategy: per-replica memory, global batch sizes, fit.

Two logical CPU devices must be configured before TensorFlow initializes its devices, so the
strategy runs in child processes (tests/distribute_child.py), started at the module's first
test and read as JSON: one uncapped (the memory search and tune, which start worker
processes: ``slow``), one under a capped allocator (``TF_CPU_BFC_MEM_LIMIT_IN_MB``, oneDNN
off) where a global batch of 64 (32 per replica) runs out of memory at its first step and 32
fits: a real out-of-memory error, ~10 s. References are plain Keras runs made here, on one
device without a cap: under MirroredStrategy a mean loss over the global batch gives the same
update as on one device.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import batchfit
from batchfit.results import MaxBatchResult, TuneResult, load_result

HERE = Path(__file__).resolve().parents[1]  # tests/
CHILD = HERE / "distribute_child.py"
CAP_MB = 14   # 32 sequences of 256 per replica overflow it, 8 per replica fit (see the child)
GATED_CAP_MB = 96   # the gated CNN: 256 and 128 x 2 images overflow it (see the child)

sys.path.insert(0, str(HERE))
import distribute_child
from child_support import ChildRuns

sys.path.remove(str(HERE))

_CHILDREN = ChildRuns(CHILD, {  # fixture name -> (scenarios, allocator cap in MiB)
    "search_run": (["search"], None),
    "capped_run": (["fit_oom", "fit_small"], CAP_MB),
    "gated_run": (["fit_gated"], GATED_CAP_MB),
    # Its own process: a collective of a second MirroredStrategy in a process whose first
    # strategy already ran collectives can collide with them (instance keys restart per
    # strategy: "Collective instance 100 expected type 0 ... but got type 2").
    "mw_keras_run": (["mw_keras"], None),
}, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def _children_early(request):
    """Start the children the selected tests need at the module's first test (they overlap)."""
    yield from _CHILDREN.early(request)


@pytest.fixture(scope="module")
def search_run() -> dict:
    return _CHILDREN.result("search_run")


@pytest.fixture(scope="module")
def capped_run() -> dict:
    return _CHILDREN.result("capped_run")


@pytest.fixture(scope="module")
def gated_run() -> dict:
    return _CHILDREN.result("gated_run")


@pytest.fixture(scope="module")
def mw_keras_run() -> dict:
    return _CHILDREN.result("mw_keras_run")


def _keras_reference(run: dict, batch: int) -> tuple[list[np.ndarray], keras.Model]:
    """Plain Keras on one device, no cap, at the global batch, from the run's initial weights."""
    m = distribute_child.pairwise_model()
    m.set_weights([np.asarray(w, dtype="float32") for w in run["w0"]])
    x, y = distribute_child.data(2 * batch, 256, 1)
    m.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
    return m.get_weights(), m


# --- memory search and tune: global = per replica x replicas ------------------------------
@pytest.mark.slow
def test_max_reports_per_replica_and_global_sizes(search_run) -> None:
    r = MaxBatchResult.from_dict(search_run["search"]["max"])
    assert r.replicas == 2 and r.distribute == "mirrored"
    assert r.max_batch_size >= 1
    assert r.global_max_batch_size == r.max_batch_size * 2
    assert r.global_safe_batch_size == r.safe_batch_size * 2
    data = search_run["search"]["max"]
    assert data["global_max_batch_size"] == 2 * data["max_batch_size"]
    assert any("per replica" in n for n in r.notes)
    assert load_result(r.to_json()) == r


@pytest.mark.slow
def test_tune_times_global_batches_and_states_both(search_run) -> None:
    t = TuneResult.from_dict(search_run["search"]["tune"])
    assert t.replicas == 2 and t.distribute == "mirrored"
    assert t.batch_size == search_run["search"]["tune_batch"]
    assert t.per_replica_batch_size * 2 == t.batch_size
    sizes = [p.batch_size for p in t.throughput.points]
    assert sizes and all(b % 2 == 0 for b in sizes)
    assert max(sizes) == t.max_batch.global_max_batch_size
    assert all(p.outcome == "ok" for p in t.throughput.points)
    console_text = _render(t)
    assert "per replica x 2" in console_text


def _render(result) -> str:
    from rich.console import Console

    from batchfit.report import render

    console = Console(width=120, color_system=None, record=True, file=io.StringIO())
    render(result, console)
    return console.export_text()


# --- batchfit.fit under MirroredStrategy ---------------------------------------------------
def test_fit_recovers_from_a_real_oom_on_the_replicas(capped_run) -> None:
    run = capped_run["fit_oom"]
    assert run["epochs"] == 2
    (adj,) = run["adjustments"]
    assert adj["reason"] == "oom" and adj["batch_size"] == 64
    # the policy works per replica (32 -> 8); the user sees global sizes: 64 -> 16 x 4
    assert (adj["from_micro_batch"], adj["to_micro_batch"]) == (64, 16)
    assert adj["accumulation_steps"] == 4 and run["accumulation"] == 4
    # reported both ways: global 64 as 16 x 4 is 8 per replica x 2 replicas
    assert run["replicas"] == 2 and run["micro"] == 16
    assert (run["per_replica_batch"], run["per_replica_micro"]) == (32, 8)
    # The same number of optimizer updates as without the OOM: 2 epochs x 2 batches of 64.
    assert run["iterations"] == 4
    assert run["accumulation_after"] is None
    ref, m = _keras_reference(run, 64)
    assert int(m.optimizer.iterations.numpy()) == run["iterations"]
    diff = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(ref, run["weights"]))
    assert diff < 1e-5


def test_fit_survives_an_oom_in_an_accumulating_step_under_a_strategy(gated_run) -> None:
    # Issue 20: after 256 -> 128 x 2, the accumulating step also ran out of memory and zeroing
    # batchfit's own per-replica accumulators raised AttributeError (fails on the old code).
    run = gated_run["fit_gated"]
    adjs = run["adjustments"]
    assert len(adjs) >= 2 and all(a["reason"] == "oom" for a in adjs)
    assert adjs[1]["from_micro_batch"] == 128 and adjs[1]["batch_size"] == 256
    # One batch, one update, whatever the number of retries; the weights are usable.
    assert run["iterations"] == 1 and run["finite"]
    assert len(run["loss"]) == 1 and np.isfinite(run["loss"][0])


def test_fit_without_oom_matches_keras(capped_run) -> None:
    run = capped_run["fit_small"]
    assert run["adjustments"] == [] and run["iterations"] == 4 and run["micro"] == 16
    ref, _ = _keras_reference(run, 16)
    diff = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(ref, run["weights"]))
    assert diff < 1e-5


def test_fit_multiworker_on_keras_engine_reports_per_replica_micro_batches(mw_keras_run) -> None:
    # MultiWorkerHistory's micro_batch_size is per replica, whichever engine trains.
    run = mw_keras_run["mw_keras"]
    whole, micro = run["None"], run["8"]
    assert whole["engine"] == micro["engine"] == "keras"
    assert (whole["per_replica_batch_size"], whole["micro_batch_size"],
            whole["accumulation_steps"], whole["optimizer_steps"]) == (16, 16, 1, 2)
    assert (micro["per_replica_batch_size"], micro["micro_batch_size"],
            micro["accumulation_steps"], micro["optimizer_steps"]) == (16, 8, 2, 2)


# --- in process: choices and refusals ------------------------------------------------------
def test_bad_distribute_values_name_the_choices() -> None:
    from batchfit.backend.tensorflow.distribute import resolve_strategy

    for bad in ("ring", 3):
        with pytest.raises(batchfit.InvalidInputError, match="mirrored.*multiworker"):
            resolve_strategy(bad)
    m = distribute_child.small_mlp()
    x = np.zeros((8, 16), "float32")
    with pytest.raises(batchfit.InvalidInputError, match="mirrored"):
        batchfit.fit(m, x, x[:, :1], batch_size=4, distribute="ring", verbose=0)
    with pytest.raises(batchfit.InvalidInputError, match="mirrored"):
        batchfit.find_max_batch_size(distribute_child.small_mlp, memory="64MiB",
                                     distribute="ring")


def test_no_strategy_is_detected_for_a_plain_model() -> None:
    from batchfit.backend.tensorflow.distribute import model_strategy, resolve_strategy

    m = distribute_child.small_mlp()
    assert model_strategy(m) is None and resolve_strategy(None, m) is None


def test_fit_refuses_a_model_built_outside_the_strategy() -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    m = distribute_child.small_mlp()
    x = np.zeros((8, 16), "float32")
    with pytest.raises(batchfit.InvalidInputError, match="scope"):
        batchfit.fit(m, x, x[:, :1], batch_size=4, distribute=strategy, verbose=0)


def test_fit_accumulates_itself_under_a_strategy() -> None:
    # One-replica MirroredStrategy in this process: starting at micro-batch 8 for batches of
    # 16 takes batchfit's own accumulation path (Keras's fails under a strategy); the result
    # is plain Keras at batch 16, with one update per batch.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        m = distribute_child.small_mlp()
    ref = distribute_child.small_mlp()
    ref.set_weights(m.get_weights())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    h = batchfit.fit(m, x, y, batch_size=16, micro_batch_size=8, epochs=2, shuffle=False,
                     verbose=0)
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert h.accumulation_steps == 2 and h.adjustments == []
    assert (h.replicas, h.per_replica_batch_size, h.per_replica_micro_batch_size) == (1, 16, 8)
    assert int(m.optimizer.iterations.numpy()) == 8 == int(ref.optimizer.iterations.numpy())
    assert m.optimizer.gradient_accumulation_steps is None
    diff = max(float(np.abs(a - b).max()) for a, b in zip(m.get_weights(), ref.get_weights()))
    assert diff < 1e-5


def test_cli_bad_distribute_exits_2_without_traceback(capsys) -> None:
    from batchfit.cli import main

    rc = main(["max", f"{CHILD}:small_mlp", "--memory", "64MiB", "--distribute", "ring"])
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert "mirrored" in err and "multiworker" in err and "Traceback" not in err


def test_report_shows_per_replica_and_global() -> None:
    r = MaxBatchResult(
        max_batch_size=48, safe_batch_size=40, headroom=0.1, memory_budget_bytes=64 << 20,
        budget_source="user", device="CPU:0", isolation="process", search="guided",
        granularity=1, upper_bound=1 << 20, bracketed=True, memory_model=None,
        replicas=2, distribute="mirrored")
    text = _render(r)
    assert "96 global = 48 per replica x 2" in text
    assert "80 global = 40 per replica x 2" in text


def test_old_json_without_replicas_loads_as_one_device() -> None:
    r = MaxBatchResult(
        max_batch_size=48, safe_batch_size=40, headroom=0.1, memory_budget_bytes=64 << 20,
        budget_source="user", device="CPU:0", isolation="process", search="guided",
        granularity=1, upper_bound=1 << 20, bracketed=True, memory_model=None)
    data = json.loads(r.to_json())
    for key in ("replicas", "distribute", "global_max_batch_size", "global_safe_batch_size"):
        data.pop(key)
    data["schema_version"] = 1
    old = load_result(json.dumps(data))
    assert old.replicas == 1 and old.global_max_batch_size == 48
