"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1, each with its own CPU cap.

Each worker is a tests/multiworker_child.py process (``TF_CONFIG`` with two free ports) under
a capped CPU allocator (``TF_CPU_BFC_MEM_LIMIT_IN_MB``, oneDNN off; see
shared/NOTES-tf-memory.md): worker 0 a large cap, worker 1 a small one. One pair of children
runs every scenario (the upstream probe, the agreed search, training with a real
out-of-memory error on worker 1; at the end worker 1 exits and worker 0 must fail fast, not
wait for it) and the tests read their JSON. Neither may hang: the children are killed and
the tests fail after ``CHILD_TIMEOUT_S``.

The in-process tests use a single-process strategy (one CPU replica): the same code paths,
no second process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import batchfit
from batchfit.verbs import multiworker as mw
from batchfit.verbs.multiworker_fit import fit_multiworker

HERE = Path(__file__).resolve().parents[1]  # tests/
CHILD = HERE / "multiworker_child.py"
CAPS_MB = (160, 34)  # worker 0, worker 1: per-replica batch 64 overflows 34 MiB, fits 160
CHILD_TIMEOUT_S = 240

sys.path.insert(0, str(HERE))
import multiworker_child as child

sys.path.remove(str(HERE))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run_pair(tmp: Path, scenarios: list[str], caps: tuple[int, ...] | None, *,
              command: Callable[[int, list[int], Path], list[str]] | None = None,
              ) -> tuple[list[subprocess.Popen], list[Path], dict[int, str]]:
    """Start two workers (each its own cap, or none), wait for both, kill them at the timeout.

    Each runs the child with ``scenarios``, or ``command(index, ports, out)`` with its
    ``TF_CONFIG`` in the environment (as a user launches a worker).
    """
    ports = _free_ports(2)
    src = str(HERE.parent / "src")
    procs, outs, logs = [], [], []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
        if caps is not None:
            env.update(TF_ENABLE_ONEDNN_OPTS="0", TF_CPU_ALLOCATOR_USE_BFC="true",
                       TF_CPU_BFC_MEM_LIMIT_IN_MB=str(caps[index]))
        env.pop("TF_CONFIG", None)
        out, log = tmp / f"worker{index}.json", tmp / f"worker{index}.log"
        outs.append(out)
        logs.append(log)
        if command is None:
            argv = [sys.executable, str(CHILD), str(index), ",".join(map(str, ports)), str(out),
                    *scenarios]
        else:
            argv = command(index, ports, out)
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index}})
        with log.open("w") as err:
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                          cwd=HERE.parent))
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    hung = []
    for index, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(index)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tails = {i: log.read_text(errors="replace")[-2000:] for i, log in enumerate(logs)}
    if hung:
        pytest.fail(f"worker(s) {hung} still running after {CHILD_TIMEOUT_S} s (a hang): {tails}")
    return procs, outs, tails


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[dict]:
    """Run both capped workers through every scenario and read their results.

    The last scenario, ``die``, ends worker 1 (exit status 3) before worker 0 trains again.
    """
    procs, outs, tails = _run_pair(tmp_path_factory.mktemp("multiworker"),
                                   ["upstream", "search", "fit", "die"], CAPS_MB)
    results = []
    for index, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == (0, 3)[index] and out.exists(), f"worker {index}: {tails[index]}"
        results.append(json.loads(out.read_text()))
    return results


def _scenario(workers: list[dict], name: str) -> list[dict]:
    got = [w.get(name, {"error": "not run"}) for w in workers]
    for index, r in enumerate(got):
        assert "error" not in r, f"worker {index} {name}: {r['error']}\n{r.get('traceback', '')}"
    return got


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_keras_fit_under_multiworker_is_probed_not_assumed(workers) -> None:
    up = _scenario(workers, "upstream")
    assert up[0]["works"] == up[1]["works"]
    if not up[0]["works"]:   # keras-team/keras#20585, open for Keras 3.15 / TF 2.21
        assert all("PerReplica" in r["failure"] for r in up)
    fit = _scenario(workers, "fit")
    assert {f["engine"] for f in fit} == {"keras" if up[0]["works"] else "batchfit"}


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_agreed_search_picks_the_size_that_fits_the_smaller_worker(workers) -> None:
    big, small = _scenario(workers, "search")
    for r in (big, small):   # every worker got the same answer and the same list
        assert r["num_workers"] == 2 and r["num_replicas"] == 2
        assert r["worker_max_batch_sizes"] == big["worker_max_batch_sizes"]
        assert r["per_replica_batch_size"] == big["per_replica_batch_size"]
        assert r["global_batch_size"] == 2 * r["per_replica_batch_size"]
        assert r["safe_global_batch_size"] == 2 * r["safe_per_replica_batch_size"]
    assert [big["worker_index"], small["worker_index"]] == [0, 1]
    # each worker's own search ran under its own cap...
    assert small["local"]["memory_budget_bytes"] == CAPS_MB[1] << 20
    assert big["local"]["memory_budget_bytes"] == CAPS_MB[0] << 20
    own = [big["local"]["max_batch_size"], small["local"]["max_batch_size"]]
    assert big["worker_max_batch_sizes"] == own and own[1] < own[0]
    # ...and the agreed size is the smaller worker's own maximum
    assert big["per_replica_batch_size"] == own[1] and big["limiting_worker"] == 1
    assert big["safe_per_replica_batch_size"] == min(big["worker_safe_batch_sizes"])
    # batchfit.find_max_batch_size(distribute=<the strategy>) ran the same agreement (a second
    # search, so the smaller worker's limit may move by a granule or two; measured 48 then 56)
    d0, d1 = big["dispatched"], small["dispatched"]
    assert d0["distribute"] == d1["distribute"] == "multiworker"
    assert d0["replicas"] == 2 and d0["max_batch_size"] == d1["max_batch_size"]
    assert d0["global_max_batch_size"] == 2 * d0["max_batch_size"]
    note = next(n for n in d0["notes"] if "set by worker" in n)
    found = dict(re.findall(r"worker (\d): (\d+)", note))
    assert note.endswith("set by worker 1"), note
    assert int(found["1"]) == d0["max_batch_size"] < int(found["0"]), note
    assert d0["max_batch_size"] < own[0]


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_cli_max_distribute_multiworker_on_each_worker_agrees(tmp_path) -> None:
    """`batchfit max --distribute multiworker`, launched on each worker as a user would."""
    def cli(index: int, ports: list[int], out: Path) -> list[str]:
        return [sys.executable, "-m", "batchfit", "max", f"{CHILD}:make_model",
                "--distribute", "multiworker", "--granularity", "4", "--steps", "2",
                "--max-batch", "96", "--quiet", "--json", str(out)]

    procs, outs, tails = _run_pair(tmp_path, [], CAPS_MB, command=cli)
    results = []
    for index, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0 and out.exists(), f"worker {index}: {tails[index]}"
        results.append(json.loads(out.read_text()))
    r0, r1 = results
    assert r0["distribute"] == r1["distribute"] == "multiworker" and r0["replicas"] == 2
    assert r0["max_batch_size"] == r1["max_batch_size"] > 0
    assert r0["memory_budget_bytes"] == CAPS_MB[0] << 20   # each searched under its own cap
    assert r1["memory_budget_bytes"] == CAPS_MB[1] << 20
    note = next(n for n in r0["notes"] if "set by worker" in n)
    found = dict(re.findall(r"worker (\d): (\d+)", note))
    assert note.endswith("set by worker 1") and int(found["1"]) < int(found["0"]), note
    assert r0["max_batch_size"] == int(found["1"])


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_oom_on_one_worker_shrinks_both_and_keeps_the_global_batch(workers) -> None:
    big, small = _scenario(workers, "fit")
    steps = child.EPOCHS * (child.N_EXAMPLES // child.GLOBAL_BATCH)
    for r in (big, small):
        assert r["engine"] == "batchfit" or r["optimizer_steps"] == steps
        assert r["optimizer_steps"] == r["iterations"] == steps   # same as without the OOM
        assert r["batch_size"] == child.GLOBAL_BATCH and r["per_replica_batch_size"] == 64
        assert len(r["history"]["loss"]) == child.EPOCHS
    # the real OOM happened on the small worker only, and both made the same decision
    keys = ("epoch", "step", "from_micro_batch", "to_micro_batch", "accumulation_steps")
    assert [[a[k] for k in keys] for a in big["adjustments"]] == [[0, 0, 64, 32, 2]]
    assert [[a[k] for k in keys] for a in small["adjustments"]] == [[0, 0, 64, 32, 2]]
    assert "worker(s) [1]" in big["adjustments"][0]["detail"]
    assert "OOM when allocating" in small["adjustments"][0]["detail"]
    assert big["history"] == small["history"]
    assert big["weights"] == small["weights"]      # mirrored: identical on both workers
    # and the updates are those of plain Keras at the global batch (one process, no cap)
    ref = child.make_model()
    ref.set_weights([np.asarray(w, dtype="float32") for w in big["w0"]])
    x, y = child.data()
    hist = ref.fit(x, y, batch_size=child.GLOBAL_BATCH, epochs=child.EPOCHS, shuffle=False,
                   verbose=0)
    for got, want in zip(big["weights"], ref.get_weights()):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(big["history"]["loss"], hist.history["loss"], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_a_worker_that_dies_makes_the_other_fail_instead_of_hang(workers) -> None:
    r = workers[0].get("die", {"error": "not run"})
    assert "die" not in workers[1]          # worker 1 exited at the start of the scenario
    assert r.get("raised") in ("UnavailableError", "DeadlineExceededError"), r
    assert r["seconds"] < 60   # the collective timeout is 20 s; a dead peer is seen sooner


# --- in process: a single-process strategy, the same code -----------------------------------
def _small_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    m = keras.Model(inp, keras.layers.Dense(1)(h))
    m.compile(keras.optimizers.Adam(0.01), "mse")
    return m


def _xy(n: int = 96):
    rng = np.random.default_rng(5)
    return rng.normal(size=(n, 6)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def test_micro_batches_on_one_replica_equal_keras_fit_at_the_global_batch() -> None:
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        m = _small_model()
    ref = _small_model()
    ref.set_weights(m.get_weights())
    x, y = _xy()
    h = fit_multiworker(m, x, y, batch_size=32, micro_batch_size=10, epochs=2,
                           strategy=strategy, shuffle=False, engine="batchfit", verbose=0)
    hr = ref.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert (h.optimizer_steps, h.micro_batch_size, h.accumulation_steps) == (6, 8, 4)
    assert h.adjustments == [] and h.engine == "batchfit"
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.history["loss"], hr.history["loss"], rtol=1e-5)


def test_auto_engine_uses_keras_fit_where_it_works() -> None:
    strategy = tf.distribute.get_strategy()   # the default: no distribution, fit works
    m = _small_model()
    x, y = _xy()
    h = fit_multiworker(m, x, y, batch_size=32, epochs=2, strategy=strategy, verbose=0)
    assert h.engine == "keras" and "works under this strategy" in h.notes[0]
    assert h.optimizer_steps == 6 and len(h.history["loss"]) == 2


def test_single_process_helpers() -> None:
    strategy = tf.distribute.get_strategy()
    assert mw.worker_position(strategy) == (0, 1)
    assert mw.agree_batch_size(strategy, 48) == 48
    assert mw.upstream_fit_works(strategy) is True   # no multi-worker strategy: fit works
    with pytest.raises(batchfit.InvalidInputError, match="integer"):
        mw.agree_batch_size(strategy, 4.5)


def test_bad_arguments_are_refused() -> None:
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        m = _small_model()
    x, y = _xy(16)
    with pytest.raises(batchfit.InvalidInputError, match="one global batch"):
        fit_multiworker(m, x, y, batch_size=32, strategy=strategy, verbose=0,
                           engine="batchfit")
    with pytest.raises(batchfit.InvalidInputError, match="engine"):
        fit_multiworker(m, x, y, batch_size=8, strategy=strategy, engine="torch")
    with pytest.raises(batchfit.InvalidInputError, match="function that builds"):
        mw.find_max_batch_size_multiworker(m, strategy)


class _AlwaysOOM(keras.layers.Layer):
    """Raises a ResourceExhaustedError at every training batch: not even one example fits."""

    def call(self, x, training=None):
        if training:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating (simulated)")
        return x


class _HalveToOne:
    """A user's shrink policy that never gives up: halves, but not below 1."""

    def next_size(self, failed, observations):
        return max(1, failed // 2)


def test_a_policy_that_answers_one_after_one_failed_ends_with_the_clear_error() -> None:
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        inp = keras.Input((6,))
        m = keras.Model(inp, keras.layers.Dense(1)(_AlwaysOOM()(inp)))
        m.compile("sgd", "mse")
    x, y = _xy(8)
    with pytest.raises(batchfit.TrainingOutOfMemoryError, match="micro-batch of 1 example"):
        fit_multiworker(m, x, y, batch_size=4, strategy=strategy, engine="batchfit",
                           shrink=_HalveToOne(), verbose=0)


class _OOMAbove(keras.layers.Layer):
    """Raises a ResourceExhaustedError for batches over ``limit`` (run eagerly: sees the batch)."""

    def __init__(self, limit: int, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, x, training=None):
        if training and x.shape[0] is not None and x.shape[0] > self.limit:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating (simulated)")
        return x


class _QuarterShrink:
    def next_size(self, failed, observations):
        return None if failed <= 1 else max(1, failed // 4)


def test_keras_engine_honours_micro_batch_size_and_the_shrink_policy() -> None:
    strategy = tf.distribute.get_strategy()   # fit works here: engine "auto" picks Keras's
    x, y = _xy(64)
    h = fit_multiworker(_small_model(), x, y, batch_size=32, micro_batch_size=8,
                           strategy=strategy, shuffle=False, verbose=0)
    assert h.engine == "keras"
    assert (h.micro_batch_size, h.accumulation_steps, h.optimizer_steps) == (8, 4, 2)

    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    m = keras.Model(inp, keras.layers.Dense(1)(_OOMAbove(8)(keras.layers.Dense(8)(inp))))
    m.compile("sgd", "mse", run_eagerly=True)
    h = fit_multiworker(m, x, y, batch_size=32, strategy=strategy, shuffle=False,
                           verbose=0, shrink=_QuarterShrink())
    assert h.engine == "keras"
    assert [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [(32, 8)]
    assert (h.micro_batch_size, h.accumulation_steps, h.optimizer_steps) == (8, 4, 2)


def test_local_budget_comes_from_the_allocator_cap(monkeypatch) -> None:
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "true")
    monkeypatch.setenv("TF_CPU_BFC_MEM_LIMIT_IN_MB", "48")
    assert mw.local_memory_budget() == "48MiB"
    monkeypatch.delenv("TF_CPU_BFC_MEM_LIMIT_IN_MB")
    assert mw.local_memory_budget() is None
