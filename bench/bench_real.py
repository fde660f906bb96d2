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
- ``max``, ``tune``, ``fit``, ``noise``: hooks, to be added (see :data:`SECTIONS`).

    python bench/bench_real.py                        # every section, every model
    python bench/bench_real.py --only check           # about 2 minutes on 2 cores
    python bench/bench_real.py --only check --models bert gpt2
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


#: section -> (function(model name) -> dict, one-line description). Other sections (max, tune,
#: fit, noise on a shipped data set) register here with the same signature; each writes
#: bench/results/real_<section>.json and its own --markdown table.
SECTIONS: dict[str, tuple[Callable[[str], dict[str, Any]], str]] = {
    "check": (run_check, "batchfit.check: third-party layers checked/skipped, findings, time"),
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
    path.write_text(json.dumps(data, indent=2) + "\n")
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


MARKDOWN = {"check": markdown_check}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--markdown", action="store_true",
                    help="print the tables from the saved JSON, run nothing")
    args = ap.parse_args(argv)
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
