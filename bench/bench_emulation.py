"""Which device should a user's training be emulated on? The worker's settings vs the cap alone.

A user's script (``model.fit`` on NumPy arrays: ``--steps`` batches and a validation pass of one
batch at the same size, synthetic data as the probes make it) runs at each size in ``--runs``
fresh processes under two settings, interleaved so both meet the same machine load:

* ``worker``: ``batchfit run --memory M -- python SCRIPT`` (the probes' device: the cap, oneDNN
  off, one intra-op thread, then one op at a time and one reserved region at import);
* ``cap_only``: ``TF_CPU_ALLOCATOR_USE_BFC=true TF_CPU_BFC_MEM_LIMIT_IN_MB=M
  TF_ENABLE_ONEDNN_OPTS=0`` and TensorFlow's defaults otherwise.

    python bench/bench_emulation.py --model batchfit.examples.models:cnn --memory 128 \\
        --sizes 150 170 190 200 220 --runs 3 --out bench/results/emulation.json

The table in docs/design.md ("Your own training on the same device") came from this procedure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    from batchfit.backend import get_backend
    b = get_backend()
    spec, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    m = b.load_model(spec)
    fn, _ = b.make_batch_fn(m, None, None, 0)
    x, y = fn(batch * (steps + 1))
    n = steps * batch
    try:
        m.fit(x[:n], y[:n], batch_size=batch, epochs=1, verbose=0,
              validation_data=(x[n:], y[n:]))
        print("RESULT fit")
    except tf.errors.ResourceExhaustedError:
        print("RESULT oom")
""")


def one_run(setting: str, script: Path, model: str, batch: int, memory: int, steps: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="2")
    user = [sys.executable, str(script), model, str(batch), str(steps)]
    if setting == "worker":
        cmd = [sys.executable, "-m", "batchfit", "run", "--memory", f"{memory}MiB", "--", *user]
    else:
        env.update(TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPU_BFC_MEM_LIMIT_IN_MB=str(memory),
                   TF_ENABLE_ONEDNN_OPTS="0")
        cmd = user
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    return lines[-1].split()[1] if lines else f"crashed ({proc.returncode})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="batchfit.examples.models:cnn")
    ap.add_argument("--memory", type=int, default=128, help="MiB")
    ap.add_argument("--sizes", type=int, nargs="+", default=[150, 170, 190, 200, 220])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench/results/emulation.json"))
    args = ap.parse_args()
    t0 = time.time()
    outcomes: dict[str, dict[int, list[str]]] = {"worker": {}, "cap_only": {}}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(SCRIPT)
        for _ in range(args.runs):
            for b in args.sizes:
                for setting, per_size in outcomes.items():
                    r = one_run(setting, script, args.model, b, args.memory, args.steps)
                    per_size.setdefault(b, []).append(r)
                    print(f"{setting:8s} {b:5d} {r}", flush=True)
    rows = {s: {str(b): {"fits": rs.count("fit"), "runs": len(rs), "outcomes": rs}
                for b, rs in per.items()} for s, per in outcomes.items()}
    Path(args.out).write_text(json.dumps({
        "model": args.model, "memory_mib": args.memory, "steps": args.steps,
        "seconds": round(time.time() - t0, 1), "settings": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
