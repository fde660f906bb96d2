"""One ``batchfit max`` (defaults) on a bench_real model with whichever batchfit is first on
PYTHONPATH, as one JSON line: to compare two checkouts on the same model and budget.

    PYTHONPATH=/path/to/other/src python bench/bench_real_ab.py bert 256MiB other
    PYTHONPATH=src python bench/bench_real_ab.py bert 256MiB this
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(name: str, memory: str, label: str) -> None:
    import bench_real

    from batchfit import find_max_batch_size
    from batchfit.workers.worker import close_fork_server

    close_fork_server()
    start = time.perf_counter()
    r = find_max_batch_size(f"{HERE / 'bench_real.py'}:{name}", memory=memory,
                            input_shapes=bench_real.MODELS[name][1])
    wall = time.perf_counter() - start
    probe_s = sum(p.seconds for p in r.probes)
    print(json.dumps({"code": label, "model": name, "memory": memory,
                      "answer": r.max_batch_size, "probes": len(r.probes),
                      "ooms": sum(p.outcome == "oom" for p in r.probes),
                      "wall_s": round(wall, 1), "probe_s": round(probe_s, 1),
                      "outside_probes": round(1 - probe_s / wall, 2),
                      "probe_list": [(p.batch_size, p.outcome, p.phase, round(p.seconds, 2))
                                     for p in r.probes]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
