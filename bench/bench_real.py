"""Benchmark: batchfit on models users train, not the project's own small ones.

Five models, built without downloading anything: MobileNetV2, ResNet50 and EfficientNetB0 from
``keras.applications`` (``weights=None``, 64x64 inputs, 10 classes, so CPU steps stay short),
and from KerasHub's config classes a BERT-like encoder classifier (``BertTextClassifier``, 2
layers, 128 wide, vocabulary 30,522) and a GPT-2-like causal LM (``GPT2CausalLM``, 4 layers,
256 wide, vocabulary 50,257), both on sequences of ``SEQ`` tokens. Each is a module-level
factory, so a verb that runs in worker processes can load it by spec
(``bench/bench_real.py:bert``).

Sections (one function each in :data:`SECTIONS`; ``--only`` runs some, and the JSON keeps the
sections of an earlier run that this run did not redo):

- ``check``: ``batchfit.check`` on each model: findings by severity, findings located in
  Keras's own code (must be 0), the third-party layers checked and those skipped with their
  reasons (together: every third-party layer), wall time.
- ``max``: ``batchfit max`` (defaults: guided search, 3 confirmations in fresh processes)
  against Lightning's binsearch in ONE process (model built and traced once, every
  out-of-memory error caught in place), run under ``batchfit run --memory`` so its allocator is
  capped and configured as a worker's; the same budget (:data:`MAX_BUDGETS`). Wall time, probes,
  OOMs, answer, and the share of ``max``'s wall time outside its probes. ``BENCH_NO_REUSE=1``
  also runs ``max`` with a fresh process for every probe (``BATCHFIT_REUSE_WORKER=0``).
- ``tune``: ``batchfit tune`` as a user runs it (the CLI, ``--memory`` the model's budget,
  ``--json``): the recommended size, the knee and its range, ``max``'s answer, the throughput
  points, wall time.
- ``fit``: ``batchfit.fit`` at twice ``max``'s answer, in a process under the same capped
  allocator (``batchfit run --memory``), beside plain ``model.fit`` at the same size in another:
  whether each finished, the micro-batch and accumulation ``batchfit.fit`` settled on, its
  adjustments, the loss, wall time.
- ``noise``: ``batchfit.estimate_noise_scale`` on a small generated data set that has something
  to learn (:func:`data`; synthetic inputs are refused): ``B_simple``, its interval, time.

    python bench/bench_real.py                        # every section, every model
    python bench/bench_real.py --only check           # about 2 minutes on 2 cores
    python bench/bench_real.py --only check --models bert gpt2
    python bench/bench_real.py --only noise fit       # every model, about 15 minutes
    python bench/bench_real.py --only tune --models mobilenet_v2 bert
    python bench/bench_real.py --markdown             # the docs table, from the JSON

KerasHub: ``pip install --no-deps keras-hub regex tokenizers`` (``make`` does; see README).
Results go to bench/results/real_check.json (one file per section: real_<section>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"

IMAGE = (64, 64, 3)
CLASSES = 10
SEQ = 128


# --------------------------------------------------------------------------------------------
# The models: module-level factories, loadable by spec
# --------------------------------------------------------------------------------------------

def _compiled(model: Any) -> Any:
    import keras

    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    return model


def mobilenet_v2() -> Any:
    """MobileNetV2, 64x64x3, 10 classes, no weights."""
    import keras

    return _compiled(keras.applications.MobileNetV2(weights=None, input_shape=IMAGE,
                                                    classes=CLASSES))


def resnet50() -> Any:
    """ResNet50, 64x64x3, 10 classes, no weights."""
    import keras

    return _compiled(keras.applications.ResNet50(weights=None, input_shape=IMAGE,
                                                 classes=CLASSES))


def efficientnet_b0() -> Any:
    """EfficientNetB0, 64x64x3, 10 classes, no weights."""
    import keras

    return _compiled(keras.applications.EfficientNetB0(weights=None, input_shape=IMAGE,
                                                       classes=CLASSES))


def bert() -> Any:
    """KerasHub BertTextClassifier (2 classes) on a 2-layer, 128-wide BertBackbone."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30522, num_layers=2, num_heads=2, hidden_dim=128,
        intermediate_dim=512, max_sequence_length=512)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                               preprocessor=None)


def gpt2() -> Any:
    """KerasHub GPT2CausalLM on a 4-layer, 256-wide GPT2Backbone, vocabulary 50,257."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50257, num_layers=4, num_heads=4, hidden_dim=256,
        intermediate_dim=1024, max_sequence_length=1024)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


#: name -> (factory, input shapes by input name (None: fully known), needs keras_hub)
MODELS: dict[str, tuple[Callable[[], Any], dict[str, tuple[int, ...]] | None, bool]] = {
    "mobilenet_v2": (mobilenet_v2, None, False),
    "resnet50": (resnet50, None, False),
    "efficientnet_b0": (efficientnet_b0, None, False),
    "bert": (bert, {"token_ids": (SEQ,), "segment_ids": (SEQ,), "padding_mask": (SEQ,)}, True),
    "gpt2": (gpt2, {"token_ids": (SEQ,), "padding_mask": (SEQ,)}, True),
}


# --------------------------------------------------------------------------------------------
# A small data set per model, generated, with something to learn (noise refuses synthetic data)
# --------------------------------------------------------------------------------------------

def data(name: str, n: int = 512, seed: int = 0) -> tuple[Any, Any]:
    """``n`` examples for model ``name``: images whose class sets a smooth pattern (a fixed
    8x8 prototype per class, upsampled, plus noise); for BERT token sequences whose label sets
    which half of the vocabulary a quarter of the tokens come from (padding at the ends); for
    GPT-2 sequences of a fixed walk over 1,000 tokens with a random restart now and then."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if name in ("bert", "gpt2"):
        return _text(name, n, rng)
    protos = np.random.default_rng(1234).normal(size=(CLASSES, 8, 8, IMAGE[2]))
    labels = rng.integers(0, CLASSES, n)
    rep = IMAGE[0] // 8
    x = np.repeat(np.repeat(protos[labels], rep, axis=1), rep, axis=2)
    x = x + 0.5 * rng.normal(size=x.shape)
    return x.astype("float32"), labels.astype("int32")


def _text(name: str, n: int, rng: Any) -> tuple[Any, Any]:
    import numpy as np

    lengths = rng.integers(SEQ // 2, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None])
    if name == "bert":
        labels = rng.integers(0, 2, n)
        tokens = rng.integers(1000, 30522, (n, SEQ))
        half = rng.integers(1000, 15000, (n, SEQ)) + 15000 * labels[:, None]
        pick = rng.random((n, SEQ)) < 0.25
        tokens = np.where(pick, np.minimum(half, 30521), tokens) * mask
        x = {"token_ids": tokens.astype("int32"),
             "segment_ids": np.zeros((n, SEQ), "int32"),
             "padding_mask": mask.astype("int32")}
        return x, labels.astype("int32")
    walk = np.empty((n, SEQ + 1), "int64")
    walk[:, 0] = rng.integers(0, 1000, n)
    for t in range(1, SEQ + 1):
        jump = rng.random(n) < 0.1
        walk[:, t] = np.where(jump, rng.integers(0, 1000, n), (walk[:, t - 1] * 7 + 3) % 1000)
    x = {"token_ids": (walk[:, :-1] * mask).astype("int32"), "padding_mask": mask.astype("int32")}
    return x, (walk[:, 1:] * mask).astype("int32")


def _has_keras_hub() -> bool:
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def _in_keras(location: str) -> bool:
    path = location.replace("\\", "/")
    return "/keras/" in path or "/tensorflow/" in path


def run_check(name: str) -> dict[str, Any]:
    """``batchfit.check`` on one model: what was checked, skipped, found, and how long."""
    import keras

    from batchfit import check

    factory, shapes, _ = MODELS[name]
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    model = factory()
    built = time.perf_counter() - start
    params = int(model.count_params())
    result = check(model, shapes)
    wall = time.perf_counter() - start
    checked = [{"layer": r.layer, "class": r.class_name, "seconds": r.seconds,
                "input_shape": r.input_shape} for r in result.layers]
    skipped = [{"layer": s.layer, "class": s.class_name, "reason": s.reason}
               for s in result.skipped]
    out = {
        "params": params,
        "input_shapes": {k: list(v) for k, v in (shapes or {}).items()},
        "findings": result.counts(),
        "findings_in_keras_code": sum(_in_keras(f.location) for f in result.findings),
        "finding_list": [f.to_dict() for f in result.findings],
        "third_party_layers": len(checked) + len(skipped),
        "checked": checked,
        "skipped": skipped,
        "notes": list(result.notes),
        "build_s": round(built, 2),
        "check_s": result.seconds,
        "wall_s": round(wall, 2),
    }
    keras.backend.clear_session()
    return out


#: The budget of each model's ``max`` case: chosen so that steps stay short on a 2-core CPU.
MAX_BUDGETS = {"mobilenet_v2": "256MiB", "resnet50": "768MiB", "efficientnet_b0": "256MiB",
               "bert": "256MiB", "gpt2": "1GiB"}  # gpt2: nothing fits 512 MiB (state 186 MiB)


def _binsearch_child(name: str, memory: str) -> None:
    """Lightning's binsearch in ONE process (run under ``batchfit run --memory``, so the
    allocator is capped and configured as a probe worker's): the model built and traced once,
    sizes doubled from 2 until one does not fit, then bisected; every out-of-memory error
    caught in the same process. Prints one JSON line."""
    t0 = time.perf_counter()
    import keras

    from batchfit.backend import get_backend
    from batchfit.core.search import Trial, make_policy, run_search
    from batchfit.core.sizes import parse_size

    imported = time.perf_counter()
    backend = get_backend()
    factory, shapes, _ = MODELS[name]
    keras.utils.set_random_seed(0)
    model = factory()
    batch_fn, _ = backend.make_batch_fn(model, None, shapes, 0)
    budget = parse_size(memory)
    runner = backend.probe_runner(model, batch_fn, steps=3, device="CPU:0", budget_bytes=budget)
    runner.warm_up()
    probes: list[dict[str, Any]] = []

    def trial(b: int) -> Trial:
        p = runner.run(b)
        probes.append({"batch_size": b, "outcome": p.outcome, "seconds": round(p.seconds, 2)})
        print(json.dumps({"probe": probes[-1]}), file=sys.stderr, flush=True)
        return Trial(batch_size=b, fits=p.fits, peak_bytes=p.peak_bytes)

    policy = make_policy("binsearch", budget_bytes=budget, saturation=0.02)
    trials = run_search(policy, trial)
    end = time.perf_counter()
    fits = [t.batch_size for t in trials if t.fits]
    print(json.dumps({"answer": max(fits, default=0), "probes": len(probes),
                      "ooms": sum(p["outcome"] == "oom" for p in probes),
                      "probe_s": round(sum(p["seconds"] for p in probes), 1),
                      "search_s": round(end - imported, 1), "wall_s": round(end - t0, 1),
                      "probe_list": probes}))


def _child_under_budget(memory: str, *args: str) -> dict[str, Any]:
    """This script with ``args`` in a process under ``batchfit run --memory``: the last JSON
    line it printed, with ``process_s`` (Python's start and TensorFlow's import included), or
    ``{"failed": True, ...}`` where it exited non-zero or printed none."""
    import subprocess

    cmd = [sys.executable, "-m", "batchfit", "run", "--memory", memory, "--", sys.executable,
           str(Path(__file__).resolve()), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = round(time.perf_counter() - start, 1)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"failed": True, "rc": done.returncode, "stderr": done.stderr[-800:],
                "process_s": wall}
    return {**json.loads(lines[-1]), "process_s": wall}


def _binsearch(name: str, memory: str) -> dict[str, Any]:
    return _child_under_budget(memory, "--binsearch-child", name, memory)


def _max_once(name: str, memory: str) -> dict[str, Any]:
    from batchfit import find_max_batch_size
    from batchfit.workers import worker as worker_module
    from batchfit.workers.worker import close_fork_server

    close_fork_server()  # each search pays its own server start
    _, shapes, _ = MODELS[name]
    from batchfit.errors import BatchfitError

    events: list[dict[str, Any]] = []
    worker_module.EVENTS = events
    start = time.perf_counter()
    try:
        r = find_max_batch_size(f"{Path(__file__).resolve()}:{name}", memory=memory,
                                input_shapes=shapes)
    except BatchfitError as exc:
        return {"failed": True, "error": str(exc)[:400],
                "wall_s": round(time.perf_counter() - start, 1)}
    finally:
        worker_module.EVENTS = None
        close_fork_server()
    wall = time.perf_counter() - start
    probe_s = sum(p.seconds for p in r.probes)
    band = r.band
    return {"answer": r.max_batch_size, "safe": r.safe_batch_size,
            "probes": len(r.probes), "ooms": sum(p.outcome == "oom" for p in r.probes),
            "confirm_probes": sum(p.phase == "confirm" for p in r.probes),
            "reused_probes": sum(bool(getattr(p, "reused", False)) for p in r.probes),
            "step_downs": band.step_downs if band else None,
            "confirmed": band.confirmed if band else None,
            "band": band.to_dict() if band else None,
            "wall_s": round(wall, 1), "probe_s": round(probe_s, 1),
            "outside_probes": round(1 - probe_s / wall, 2) if wall else None,
            "probe_list": [{"batch_size": p.batch_size, "outcome": p.outcome,
                            "phase": p.phase, "reused": bool(getattr(p, "reused", False)),
                            "seconds": round(p.seconds, 2), "epochs": p.epochs,
                            **({"detail": p.detail[:200]} if not p.fits else {})}
                           for p in r.probes],
            "time": time_breakdown(events, wall),
            "notes": list(r.notes)}


def time_breakdown(events: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Where a search's wall time went, from the worker's events (batchfit.workers.worker.EVENTS):
    waiting for processes to start (``start_wait_s``; a spare started ahead waits less), probe
    round trips (``probe_s``, of which the worker's own ``probe_steps_s``), forking
    (``launch_s``, the fork server's start in the first), stopping (``stop_s``) and the rest
    (the parent's own: resolving the model, the search's logic). ``build_s``/``warm_up_s``:
    every process's model build and warm-up (trace), overlapped with probes when prestarted.
    ``prepared_probes``: probes that ran in a process that had traced their step ahead."""
    def total(event: str, key: str = "seconds") -> float:
        return round(sum(e.get(key) or 0.0 for e in events if e["event"] == event), 1)

    out = {"start_wait_s": total("start"), "probe_s": total("probe"),
           "probe_steps_s": total("probe", "probe_s"), "launch_s": total("launch"),
           "stop_s": total("stop"), "build_s": total("start", "build_s"),
           "warm_up_s": total("start", "warm_up_s"),
           "processes": sum(e["event"] == "launch" for e in events),
           "prepared_probes": sum(bool(e.get("prepared")) for e in events
                                  if e["event"] == "probe"),
           "first_launch_s": next((e["seconds"] for e in events if e["event"] == "launch"),
                                  None)}
    accounted = out["start_wait_s"] + out["probe_s"] + out["launch_s"] + out["stop_s"]
    out["other_s"] = round(wall - accounted, 1)
    return out


#: more ``max`` runs beside the default one: (asked by, the batchfit switch turned off, key)
_EXTRA_ARMS = (("BENCH_NEAR_EDGE_AB", "BATCHFIT_FRESH_NEAR_EDGE", "max_reused_near_edge"),
               ("BENCH_NO_REUSE", "BATCHFIT_REUSE_WORKER", "max_fresh_each_probe"),
               ("BENCH_PREPARE_AB", "BATCHFIT_PREPARE_AHEAD", "max_not_prepared"))


def run_max(name: str) -> dict[str, Any]:
    """``batchfit max`` (defaults: guided, 3 confirmations) against Lightning's binsearch in
    one process, same model and budget; with ``BATCHFIT_REUSE_WORKER=0`` also (``--no-reuse``)
    the search with a fresh process for every probe; with ``BENCH_NEAR_EDGE_AB=1`` also the
    search with ``BATCHFIT_FRESH_NEAR_EDGE=0`` (reused processes up to the edge, as before
    session 20); with ``BENCH_PREPARE_AB=1`` also with ``BATCHFIT_PREPARE_AHEAD=0`` (no
    process traces ahead for a known size, as before session 21)."""
    memory = MAX_BUDGETS[name]
    out: dict[str, Any] = {"memory": memory}
    out["binsearch_one_process"] = _binsearch(name, memory)
    out["max"] = _max_once(name, memory)
    for asked, switch, key in _EXTRA_ARMS:
        if os.environ.get(asked) == "1":
            os.environ[switch] = "0"
            try:
                out[key] = _max_once(name, memory)
            finally:
                os.environ.pop(switch, None)
    b = out["binsearch_one_process"]
    if not b.get("failed") and not out["max"].get("failed"):
        out["ratio_vs_binsearch"] = round(out["max"]["wall_s"] / max(1e-9, b["search_s"]), 2)
    out["max_s"] = out["max"]["wall_s"]
    out["binsearch_s"] = b.get("search_s")
    return out


def _shape_args(name: str) -> list[str]:
    shapes = MODELS[name][1] or {}
    return [a for k, v in shapes.items() for a in ("--input-shape", f"{k}={v[0]}")]


def run_tune(name: str) -> dict[str, Any]:
    """``batchfit tune`` as a user runs it: the CLI with the model's budget and ``--json``."""
    import subprocess
    import tempfile

    memory = MAX_BUDGETS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "tune.json"
        cmd = [sys.executable, "-m", "batchfit", "tune", f"{Path(__file__).resolve()}:{name}",
               "--memory", memory, "--quiet", "--json", str(out_json), *_shape_args(name)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0 or not out_json.exists():
            return {"memory": memory, "failed": True, "rc": done.returncode,
                    "stderr": done.stderr[-800:], "wall_s": round(wall, 1)}
        r = json.loads(out_json.read_text())
    thr, mx, rec = r.get("throughput") or {}, r.get("max_batch") or {}, r.get("recommendation") or {}
    return {"memory": memory, "wall_s": round(wall, 1), "seconds": r.get("seconds"),
            "recommended": rec.get("batch_size"), "decided_by": rec.get("decided_by"),
            "reasons": rec.get("reasons"),
            "max": mx.get("max_batch_size"), "safe": mx.get("safe_batch_size"),
            "max_probes": len(mx.get("probes") or []),
            "knee": thr.get("knee"), "knee_range": thr.get("knee_range"),
            "machine_drift": thr.get("machine_drift"), "throughput_s": thr.get("seconds"),
            "points": [{"batch_size": p.get("batch_size"), "outcome": p.get("outcome"),
                        "samples_per_s": p.get("samples_per_second"), "cv": p.get("cv")}
                       for p in thr.get("points") or []]}


def _fit_child(name: str, batch: int, mode: str) -> None:
    """One training run under the capped allocator (``batchfit run --memory``): ``mode``
    ``batchfit`` (``batchfit.fit``) or ``keras`` (``model.fit``), one epoch of 4 batches of
    ``batch`` from :func:`data`. Prints one JSON line, also when training ran out of memory."""
    import keras
    import numpy as np

    import batchfit
    from batchfit.backend import is_oom_error

    keras.utils.set_random_seed(0)
    model = MODELS[name][0]()
    x, y = data(name, 4 * batch)
    start = time.perf_counter()
    out: dict[str, Any] = {"mode": mode, "batch_size": batch}
    try:
        if mode == "batchfit":
            h = batchfit.fit(model, x, y, batch_size=batch, epochs=1, verbose=0)
            out.update(micro_batch_size=h.micro_batch_size,
                       accumulation_steps=h.accumulation_steps,
                       adjustments=[a.to_dict() for a in h.adjustments])
        else:
            h = model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        loss = h.history["loss"][-1]
        out.update(finished=True, loss=float(loss), loss_finite=bool(np.isfinite(loss)))
    except Exception as exc:  # noqa: BLE001 - what happened is the result
        out.update(finished=False, oom=bool(is_oom_error(exc)),
                   error=f"{type(exc).__name__}: {str(exc)[:200]}")
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out), flush=True)


def _fit_run(name: str, memory: str, batch: int, mode: str) -> dict[str, Any]:
    out = _child_under_budget(memory, "--fit-child", name, str(batch), mode)
    if out.get("failed"):
        out.update(mode=mode, batch_size=batch, finished=False, error=out["stderr"][-400:])
    return out


def run_fit(name: str) -> dict[str, Any]:
    """``batchfit.fit`` and plain ``model.fit`` at twice ``max``'s saved answer, each in a
    process under the model's budget."""
    saved = json.loads(_path("max").read_text())["models"].get(name, {}) \
        if _path("max").exists() else {}
    answer = (saved.get("max") or {}).get("answer")
    if not answer:
        return {"failed": True, "error": "no saved max answer: run --only max first"}
    memory = MAX_BUDGETS[name]
    batch = 2 * int(answer)
    return {"memory": memory, "max_answer": answer, "batch_size": batch,
            "keras": _fit_run(name, memory, batch, "keras"),
            "batchfit": _fit_run(name, memory, batch, "batchfit")}


#: noise: small and big batch and pairs, kept short on a 2-core CPU (512 examples each)
NOISE = {"small": 8, "big": 64, "steps": 16}


def run_noise(name: str) -> dict[str, Any]:
    """``batchfit.estimate_noise_scale`` on the model's generated data set."""
    import keras

    from batchfit.verbs.noise import estimate_noise_scale

    keras.utils.set_random_seed(0)
    model = MODELS[name][0]()
    start = time.perf_counter()
    r = estimate_noise_scale(model, data(name), **NOISE)
    d = r.to_dict()
    keras.backend.clear_session()
    return {**NOISE, "wall_s": round(time.perf_counter() - start, 1),
            **{k: d.get(k) for k in ("b_simple", "low", "high", "confidence", "seconds",
                                     "examples", "notes")}}


#: section -> (function(model name) -> dict, one-line description). Other sections (max, tune,
#: fit, noise on a shipped data set) register here with the same signature; each writes
#: bench/results/real_<section>.json and its own --markdown table.
SECTIONS: dict[str, tuple[Callable[[str], dict[str, Any]], str]] = {
    "check": (run_check, "batchfit.check: third-party layers checked/skipped, findings, time"),
    "max": (run_max, ("batchfit max (defaults, confirmations included) vs Lightning's binsearch "
                     "in one process under the same capped allocator")),
    "tune": (run_tune, "batchfit tune (the CLI, defaults) under the model's budget"),
    "fit": (run_fit, ("batchfit.fit and plain model.fit at twice max's answer, each in a "
                      "process under the model's budget")),
    "noise": (run_noise, "batchfit.estimate_noise_scale on a generated data set with a signal"),
}


# --------------------------------------------------------------------------------------------
# Runner, JSON, table
# --------------------------------------------------------------------------------------------

def environment() -> dict[str, str]:
    import keras
    import tensorflow as tf

    env = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "keras": keras.__version__, "platform": platform.platform(),
           "cpus": str(os.cpu_count())}
    try:
        import keras_hub

        env["keras_hub"] = keras_hub.__version__
    except ImportError:
        env["keras_hub"] = "not installed"
    return env


def _path(section: str) -> Path:
    return RESULTS / f"real_{section}.json"


def run_section(section: str, names: list[str], command: str) -> dict[str, Any]:
    fn, description = SECTIONS[section]
    path = _path(section)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({"section": section, "description": description, "command": command,
                 "environment": environment()})
    models = data.setdefault("models", {})
    hub = _has_keras_hub()
    for name in names:
        if MODELS[name][2] and not hub:
            print(f"{section} {name}: skipped (keras_hub not installed)", flush=True)
            continue
        print(f"{section} {name} ...", flush=True)
        models[name] = fn(name)
        print(f"  {json.dumps({k: v for k, v in models[name].items() if k.endswith('_s')})}",
              flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")  # each model's, as it ends
    print(f"wrote {path.relative_to(ROOT)}")
    return data


def markdown_check(data: dict[str, Any]) -> str:
    rows = [("| model | params | third-party layers | checked | skipped (reason) | findings "
             "(error/warning/info) | in Keras's code | check time | wall (build + check) |"),
            "|---|---:|---:|---|---|---|---:|---:|---:|"]
    saved = data.get("models", {})
    for name in [n for n in MODELS if n in saved] + [n for n in saved if n not in MODELS]:
        r = saved[name]
        counts = {c["class"].rsplit(".", 1)[-1]: 0 for c in r["checked"]}
        for c in r["checked"]:
            counts[c["class"].rsplit(".", 1)[-1]] += 1
        checked = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items()) or "-"
        skipped = "; ".join(f"{s['layer']} ({s['reason']})" for s in r["skipped"]) or "-"
        f = r["findings"]
        rows.append(f"| {name} | {r['params']:,} | {r['third_party_layers']} | {checked} | "
                    f"{skipped} | {f['error']}/{f['warning']}/{f['info']} | "
                    f"{r['findings_in_keras_code']} | {r['check_s']:.1f} s | "
                    f"{r['wall_s']:.1f} s |")
    return "\n".join(rows)


def markdown_max(data: dict[str, Any]) -> str:
    rows = [("| model | budget | max: answer (band) | probes (confirm, reused) | OOMs | wall | "
            "outside probes | binsearch 1 process: answer | probes | OOMs | s (of which OOM probes) | ratio | "
            "fresh each probe: answer, probes, s |"),
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    saved = data.get("models", {})
    for name in [n for n in MODELS if n in saved]:
        r = saved[name]
        m, b = r["max"], r["binsearch_one_process"]
        if m.get("failed"):
            rows.append(f"| {name} | {r['memory']} | failed: {m['error'][:80]} |")
            continue
        band = m.get("band") or {}
        f = r.get("max_fresh_each_probe")
        fresh = f"{f['answer']}, {f['probes']}, {f['wall_s']:.0f} s" if f else "-"
        oom_s = sum(p["seconds"] for p in b.get("probe_list", []) if p["outcome"] == "oom")
        bs = ("failed", "-", "-", "-") if b.get("failed") else (
            b["answer"], b["probes"], b["ooms"], f"{b['search_s']:.0f} ({oom_s:.0f} in OOMs)")
        rows.append(f"| {name} | {r['memory']} | {m['answer']} ({band.get('reliable')}-"
                    f"{band.get('never')}) | {m['probes']} ({m['confirm_probes']}, "
                    f"{m['reused_probes']}) | {m['ooms']} | {m['wall_s']:.0f} s | "
                    f"{m['outside_probes']:.0%} | {bs[0]} | {bs[1]} | {bs[2]} | {bs[3]} s | "
                    f"{r.get('ratio_vs_binsearch', '-')}x | {fresh} |")
    return "\n".join(rows)


def markdown_max_time(data: dict[str, Any]) -> str:
    """Where each ``max`` search's wall time went (the ``time`` breakdown of its run)."""
    rows = [("| model | wall | waiting for processes | probe round trips (steps) | fork | stop | "
             "other | processes | their build + warm-up (overlapped or not) |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    saved = data.get("models", {})
    for name in [n for n in MODELS if n in saved]:
        m = saved[name]["max"]
        t = m.get("time")
        if not t:
            continue
        rows.append(f"| {name} | {m['wall_s']:.0f} s | {t['start_wait_s']:.0f} s | "
                    f"{t['probe_s']:.0f} s ({t['probe_steps_s']:.0f} s) | {t['launch_s']:.0f} s | "
                    f"{t['stop_s']:.0f} s | {t['other_s']:.0f} s | {t['processes']} | "
                    f"{t['build_s']:.0f} + {t['warm_up_s']:.0f} s |")
    return "\n".join(rows)


def markdown_max_both(data: dict[str, Any]) -> str:
    return markdown_max(data) + "\n\n" + markdown_max_time(data)


def _ordered(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    saved = data.get("models", {})
    return [(n, saved[n]) for n in MODELS if n in saved]


def markdown_tune(data: dict[str, Any]) -> str:
    rows = [("| model | budget | recommended (decided by) | knee (range) | max (safe) | max probes "
            "| throughput points | machine drift | wall |"), "|---|---|---|---|---|---:|---:|---:|---:|"]
    for name, r in _ordered(data):
        if r.get("failed"):
            rows.append(f"| {name} | {r['memory']} | failed (exit {r.get('rc')}) |")
            continue
        drift = r.get("machine_drift")
        rows.append(f"| {name} | {r['memory']} | {r['recommended']} ({r['decided_by']}) | "
                    f"{r['knee']} ({r['knee_range']}) | {r['max']} ({r['safe']}) | "
                    f"{r['max_probes']} | {len(r['points'])} | "
                    f"{'-' if drift is None else f'{drift:+.0%}'} | {r['wall_s']:.0f} s |")
    return "\n".join(rows)


def markdown_fit(data: dict[str, Any]) -> str:
    def said(run: dict[str, Any]) -> str:
        if run.get("finished"):
            return f"trained, loss {run['loss']:.3f}, {run['seconds']:.0f} s"
        return "out of memory" if run.get("oom") else f"failed: {run.get('error', '')[:60]}"

    rows = [("| model | budget | max's answer | batch | model.fit | batchfit.fit | micro-batch x "
            "steps | adjustments |"), "|---|---|---:|---:|---|---|---|---:|"]
    for name, r in _ordered(data):
        if r.get("failed"):
            rows.append(f"| {name} | - | - | - | {r['error']} |")
            continue
        b = r["batchfit"]
        plan = (f"{b['micro_batch_size']} x {b['accumulation_steps']}"
                if b.get("finished") else "-")
        rows.append(f"| {name} | {r['memory']} | {r['max_answer']} | {r['batch_size']} | "
                    f"{said(r['keras'])} | {said(b)} | {plan} | "
                    f"{len(b.get('adjustments') or [])} |")
    return "\n".join(rows)


def markdown_noise(data: dict[str, Any]) -> str:
    rows = ["| model | small / big x pairs | B_simple | interval (95%) | seconds | notes |",
            "|---|---|---:|---|---:|---|"]
    for name, r in _ordered(data):
        def num(v: Any) -> str:
            if v is None:
                return "-"
            return f"{v:,.0f}" if abs(v) >= 10 else f"{v:.2f}"
        interval = (f"{num(r['low'])}-{num(r['high'])}" if r["high"] is not None
                    else f"at least {num(r['low'])}")
        rows.append(f"| {name} | {r['small']} / {r['big']} x {r['steps']} | {num(r['b_simple'])} | "
                    f"{interval} | {r['wall_s']:.0f} | "
                    f"{'; '.join(r.get('notes') or []) or '-'} |")
    return "\n".join(rows)


MARKDOWN = {"check": markdown_check, "max": markdown_max_both, "tune": markdown_tune,
            "fit": markdown_fit, "noise": markdown_noise}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--markdown", action="store_true",
                    help="print the tables from the saved JSON, run nothing")
    ap.add_argument("--binsearch-child", nargs=2, metavar=("MODEL", "MEMORY"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--fit-child", nargs=3, metavar=("MODEL", "BATCH", "MODE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.binsearch_child:
        _binsearch_child(*args.binsearch_child)
        return 0
    if args.fit_child:
        _fit_child(args.fit_child[0], int(args.fit_child[1]), args.fit_child[2])
        return 0
    if args.markdown:
        for section in args.only:
            if _path(section).exists() and section in MARKDOWN:
                print(MARKDOWN[section](json.loads(_path(section).read_text())))
        return 0
    command = "python bench/bench_real.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for section in args.only:
        data = run_section(section, args.models, command.strip())
        if section in MARKDOWN:
            print(MARKDOWN[section](data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
