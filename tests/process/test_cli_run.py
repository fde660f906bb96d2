"""``batchfit run`` and ``batchfit.emulated_device``: the user's own process gets the device the
probes ran on (the allocator cap, and the worker's configure step when TensorFlow is imported).

Each TensorFlow child takes a few seconds (its import); the bad-input cases start none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Allocates BIG MiB and SMALL MiB on the CPU allocator; prints what happened as JSON.
ALLOC = textwrap.dedent("""
    import json, os, sys
    {prelude}
    import tensorflow as tf
    out = {{"inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "cap": os.environ.get("TF_CPU_BFC_MEM_LIMIT_IN_MB")}}
    for mib in (int(sys.argv[1]), int(sys.argv[2])):
        try:
            t = tf.zeros([mib << 20], tf.uint8)
            out[str(mib)] = "fits"
            del t
        except tf.errors.ResourceExhaustedError:
            out[str(mib)] = "oom"
    print("RESULT " + json.dumps(out))
""")


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_run_caps_the_childs_allocator_and_configures_it(run_cli, tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(ALLOC.format(prelude=""))
    proc = run_cli("run", "--memory", "256MiB", "--", sys.executable, str(script), "384", "64")
    out = _result(proc)
    # The cap: a tensor larger than it is refused, a smaller one fits; and the worker's
    # configure step ran at import (one op at a time).
    assert out == {"inter_op": 1, "cap": "256", "384": "oom", "64": "fits"}


def test_emulated_device_reexecs_the_script_under_the_cap(run_cli, tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(ALLOC.format(prelude=textwrap.dedent("""
        import batchfit
        dev = batchfit.emulated_device("128MiB")
        assert dev.how == "inherited", dev
    """)))
    proc = subprocess.run([sys.executable, str(script), "192", "32"], capture_output=True, check=False,
                          text=True, timeout=300, env=_env())
    assert _result(proc) == {"inter_op": 1, "cap": "128", "192": "oom", "32": "fits"}


def _env() -> dict:
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "src"), env.get("PYTHONPATH"))
                                        if p)
    return env


def test_a_command_that_is_not_python_gets_the_environment_and_its_status(run_cli) -> None:
    proc = run_cli("run", "--memory", "64MiB", "--", "sh", "-c",
                   "echo cap=$TF_CPU_BFC_MEM_LIMIT_IN_MB; exit 3")
    assert proc.returncode == 3 and "cap=64" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--memory", "64MiB"], "no command to run"),
    (["run", "--memory", "64MiB", "--"], "no command to run"),
    (["run", "--", "python", "x.py"], "needs --memory"),
    (["run", "--memory", "64Mx", "--", "python", "x.py"], "64Mx"),
    (["run", "--memory", "64MiB", "--device", "TPU", "--", "python"], "CPU:N or GPU:N"),
    (["run", "--memory", "64MiB", "--", "no-such-command-here"], "cannot run"),
])
def test_bad_input_exits_2_with_a_clear_message(run_cli, args, message) -> None:
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_emulated_device_refuses_once_tensorflow_is_imported() -> None:
    import tensorflow  # noqa: F401

    import batchfit

    with pytest.raises(batchfit.InvalidInputError, match="before tensorflow is imported"):
        batchfit.emulated_device("128MiB")
