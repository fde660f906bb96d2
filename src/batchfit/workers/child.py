"""The child side of a probe process: what runs in the worker and in the fork server.

A worker is started as ``python -c`` :data:`_ENTRY` (or forked by the fork server, which runs
:data:`_SERVER_ENTRY`): it fixes its address-space layout (:func:`_fix_layout_and_reexec`),
receives its :class:`~batchfit.workers.worker.WorkerConfig`, builds the model through the
Keras backend (:func:`batchfit.backend.get_backend`) and answers probes until told to stop
(:func:`_worker_main`). The parent side, :mod:`batchfit.workers.worker`, never imports this
module's backend: everything here that touches a framework runs in the child, imported inside
the functions.

Example:

>>> "batchfit.workers.child" in _ENTRY and "batchfit.workers.child" in _SERVER_ENTRY
True
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from ..errors import ModelLoadError, error_line

#: The worker's command (``python -c _ENTRY <inbox fd> <outbox fd>``).
_ENTRY = ("import sys; from batchfit.workers.child import _entry; "
          "_entry(int(sys.argv[1]), int(sys.argv[2]))")
#: The fork server's command (``python -c _SERVER_ENTRY <socket fd>``).
_SERVER_ENTRY = ("import sys; from batchfit.workers.child import _server_entry; "
                 "_server_entry(int(sys.argv[1]))")


_ADDR_NO_RANDOMIZE = 0x0040000


def _fix_layout_and_reexec(entry: str = _ENTRY) -> None:  # pragma: no cover - in the worker
    """Restart the worker once with address-space randomization off (Linux ``personality``).

    Measured (seed_wide, batch 200, 3 steps): the peak of a training step is the same at every
    step of one process but differs between fresh processes, 40.7 to 54.0 MB, because the
    order of the step's ops follows object addresses and hashes. With the layout and the hash
    seed fixed, fresh processes measured 42.3-42.4 MB, and a search and an exhaustive bisection
    in fresh processes found the same largest batch (242 of seed_wide under 64 MiB, 487 under
    128 MiB). The new layout applies from the next ``exec``, so the worker, before importing
    anything large, sets it and execs itself again (its pipes, passed as inheritable
    descriptors, stay open). Not done from ``preexec_fn``, which can deadlock in a parent
    with threads. Anywhere this fails, the worker simply runs with the usual layout.
    """
    if not sys.platform.startswith("linux") or os.environ.get("BATCHFIT_FIXED_LAYOUT"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        current = libc.personality(0xFFFFFFFF)
        if current == -1 or current & _ADDR_NO_RANDOMIZE:
            return
        if libc.personality(current | _ADDR_NO_RANDOMIZE) == -1:
            return
        os.environ["BATCHFIT_FIXED_LAYOUT"] = "1"
        os.execv(sys.executable, [sys.executable, "-c", entry, *sys.argv[1:]])
    except (OSError, AttributeError):
        return


def build_model(source: Any) -> Any:
    """Materialize the model a :class:`~batchfit.workers.worker.ModelSource` describes (runs
    in the worker)."""
    from ..backend import get_backend

    backend = get_backend()
    if source.kind == "spec":
        return backend.load_model(source.payload)
    if source.kind == "callable":
        try:
            model = source.payload()
        except Exception as exc:
            raise ModelLoadError(f"the model factory {source.label} raised "
                                 f"{type(exc).__name__}: {exc}") from exc
        backend.check_model(model)
        return model
    if source.kind == "pickle":
        try:
            return pickle.loads(source.payload)
        except Exception as exc:
            raise ModelLoadError(
                f"the model could not be rebuilt in the worker process from its saved form "
                f"({type(exc).__name__}: {error_line(exc)}). Pass a model factory "
                f"instead (a module-level function returning the compiled model), or make the "
                f"custom layers serializable (get_config, and **kwargs to super().__init__)"
            ) from exc
    raise ModelLoadError(f"unknown model source kind {source.kind!r}")


def _entry(read_fd: int, write_fd: int, *,
           reexec: bool = True) -> None:  # pragma: no cover - runs in the worker
    """The worker process's main: receive the config, then serve probes until told to stop."""
    if reexec:
        _fix_layout_and_reexec()
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    try:
        raw = inbox.recv_bytes()
    except (EOFError, OSError):
        return
    try:
        config = pickle.loads(raw)
    except Exception as exc:  # noqa: BLE001 - e.g. a factory only the caller's __main__ knows
        outbox.send({"ok": False, "error_type": type(exc).__name__,
                     "message": f"the worker process could not receive the model or data "
                                f"({type(exc).__name__}: {exc}); define factories and custom "
                                f"layers in an importable module, not in __main__"})
        return
    _worker_main(inbox, outbox, config)


def _server_entry(sock_fd: int) -> None:  # pragma: no cover - runs in the fork server
    """The fork server's main: import TensorFlow, then fork a worker per request."""
    _fix_layout_and_reexec(_SERVER_ENTRY)
    import warnings
    warnings.simplefilter("ignore")
    sock = socket.socket(fileno=sock_fd)
    # What every worker imports, and nothing that starts the backend's runtime: no op runs
    # here, so each child's allocator and thread pools start in the child.
    from ..backend import get_backend

    get_backend().preload()

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sock.sendall(f"X {pid} {os.waitstatus_to_exitcode(status)}\n".encode())

    while True:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if ready:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 1, 3)
            except OSError:
                return
            if not msg:
                return
            if len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    sock.close()
                    os.dup2(fds[2], 1)
                    os.dup2(fds[2], 2)
                    os.close(fds[2])
                    _entry(fds[0], fds[1], reexec=False)
                except BaseException:  # noqa: BLE001 - the worker's last words go to its log
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            sock.sendall(f"P {pid}\n".encode())
        reap()


def _worker_main(inbox: Any, conn: Any, config: Any) -> None:  # pragma: no cover
    import warnings
    warnings.simplefilter("ignore")
    import time

    from ..backend import get_backend

    backend = get_backend()
    t0 = time.perf_counter()
    try:
        device = config.device
        cache = getattr(config, "compile_cache", "")
        if cache and os.path.isdir(cache):
            backend.use_compile_cache(cache)
        if getattr(config, "settings", "worker") == "default":
            backend.configure_default(device, config.budget_bytes)
        else:
            backend.configure_worker(device, config.budget_bytes)
        model = None
        model = build_model(config.source)
        xla = prepare_xla(backend, model, config)
        batch_fn, notes = backend.make_batch_fn(model, config.data, config.input_shapes,
                                                config.seed)
        notes = [*notes, *xla["notes"]]
        # From here on nothing waits on I/O: the parent may watch for a wait on memory.
        t_built = time.perf_counter()
        state = backend.state_bytes(model)  # counted once: building nothing, it does not change
        conn.send({"phase": "warm_up", "weights_bytes": backend.weights_bytes(model),
                   "state_bytes": state, "step_jit": xla["step_jit"]})
        runner = backend.probe_runner(model, batch_fn, steps=config.steps, device=device,
                                      budget_bytes=config.budget_bytes, own_model=True)
        if hasattr(runner, "watch"):  # the parent's stall watch runs only inside steps
            runner.watch = lambda on: conn.send({"watch": bool(on)})
        finish = getattr(runner, "finish", None)
        if finish is not None:  # answer first, then clean up (the parent may kill us instead)
            runner.defer_cleanup = True
        failure = runner.warm_up() if getattr(config, "warm_up", True) else None
        if failure is not None and failure[0]:
            conn.send({"ok": False, "oom": True, "error_type": "ResourceExhaustedError",
                       "weights_bytes": backend.weights_bytes(model),
                       "state_bytes": state,
                       "message": failure[1]})
            return
        conn.send({"ok": True, "device": device, "model_name": model.name,
                   "state_bytes": state, "notes": notes,
                   "environment": backend.environment_info(), "pid": os.getpid(),
                   "step_jit": xla["step_jit"], "compiled": xla["compiled"],
                   "timings": {"build_s": round(t_built - t0, 3),
                               "warm_up_s": round(time.perf_counter() - t_built, 3)}})
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"ok": False, "error_type": type(exc).__name__,
                   "oom": backend.is_oom_error(exc),
                   "weights_bytes": None if model is None else backend.weights_bytes(model),
                   "message": str(exc) if isinstance(exc, ModelLoadError)
                   else f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()})
        return
    while True:
        try:
            cmd = inbox.recv()
        except (EOFError, OSError):
            return
        if cmd[0] == "stop":
            return
        if cmd[0] == "prepare" and hasattr(runner, "prepare"):
            runner.prepare(int(cmd[1]))  # no answer: the probe that follows reports
        elif cmd[0] == "probe":
            probe = runner.run(int(cmd[1]))
            conn.send({"probe": probe.to_dict(),
                       "prepared": bool(getattr(runner, "ran_prepared", False))})
            if finish is not None:
                finish()


def prepare_xla(backend: Any, model: Any, config: Any) -> dict[str, Any]:
    """Before any step: ``jit_compile`` (``config.jit_compile``) and, for an XLA step, its
    compile-time memory at ``config.compile_sizes`` and at the answer they predict for the
    budget (runs in the worker).

    Returns ``{"step_jit", "compiled" (CompiledStepMemory dicts), "notes"}``. A step XLA cannot
    compile is left as the model has it: with ``jit_compile`` asked for, the probes run the
    model's own step, and a note names the layer.
    """
    from ..core.estimate import TEMPORARIES_ROOM, XLA_MARGIN, fit_line, largest_batch
    from ..errors import InvalidInputError

    forced = bool(getattr(config, "jit_compile", False))
    sizes = [int(b) for b in getattr(config, "compile_sizes", ()) or ()]
    if not (forced or backend.step_jit_compiled(model)):
        return {"step_jit": False, "compiled": [], "notes": []}
    if not sizes:  # a later process of the search: the first one compiled
        return {"step_jit": backend.set_step_jit(model) if forced else True, "compiled": [],
                "notes": []}
    try:
        compiled = [backend.compiled_step_memory(model, b, input_shapes=config.input_shapes)
                    for b in sizes]
        if len(compiled) >= 2 and config.budget_bytes:
            line = fit_line([(m.batch_size, m.total_bytes + (TEMPORARIES_ROOM - 1)
                              * m.temporaries) for m in compiled])
            answer = largest_batch(line, config.budget_bytes * (1.0 - XLA_MARGIN))
            if answer >= 1 and answer not in sizes:
                compiled.append(backend.compiled_step_memory(
                    model, answer, input_shapes=config.input_shapes))
    except InvalidInputError as exc:
        why = str(exc).split(" There is no", 1)[0].split("; there is no", 1)[0]
        step = "the model's own step, op by op" if forced else "its step"
        note = (f"no compile-time prediction: {why.rstrip('.:; ')}; the search probed {step}, "
                f"without a prediction")
        return {"step_jit": False if forced else backend.step_jit_compiled(model),
                "compiled": [], "notes": [note]}
    step_jit = backend.set_step_jit(model) if forced else True
    return {"step_jit": step_jit, "compiled": [m.to_dict() for m in compiled], "notes": []}


__all__ = ["build_model", "prepare_xla"]
