"""Probes in an isolated worker process, under a memory budget that is really enforced.

On CPU the budget becomes TensorFlow's own allocator cap (``TF_CPU_ALLOCATOR_USE_BFC=true
TF_CPU_BFC_MEM_LIMIT_IN_MB=N``, oneDNN off), set in the worker's environment before it imports
TensorFlow: a batch that does not fit raises a real ``ResourceExhaustedError`` there, exactly as
on a GPU with that much memory. On a GPU the worker creates a logical device with
``memory_limit``. The worker lives across probes (one TensorFlow import, one model build, one
retrace per new shape); if it dies (segfault, killed by the kernel) the probe is reported as
``"crashed"``, the caller is untouched, and the next probe starts a fresh worker. Searches run
every probe in a fresh process; on Linux, for the CPU, those are forked from a server process
that has imported TensorFlow once (:class:`_ForkServer`: ~1.5 s per probe instead of ~8 s),
kept between the searches of a process that share its environment (:class:`_SharedServer`).

This module imports no TensorFlow at import time: the worker imports it after its environment
and standard error are set up.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ..errors import (
    InvalidInputError,
    ModelLoadError,
    NothingFitsError,
    ProbeFailedError,
)
from ..results import Probe
from .stall import QuietClock, sample_process, stat_fields

MiB = 1 << 20


@dataclass
class ModelSource:
    """How the worker gets the model: a spec string, a picklable factory, or pickled bytes."""

    kind: str  # "spec" | "callable" | "pickle"
    payload: Any
    label: str = ""

    @classmethod
    def from_model(cls, model: Any) -> ModelSource:
        """Describe ``model`` (a ``keras.Model``, a zero-argument factory or a spec string)."""
        if isinstance(model, str):
            return cls("spec", model, model)
        if callable(model) and not hasattr(model, "train_on_batch"):
            if getattr(model, "__module__", None) == "__main__":
                raise InvalidInputError(
                    f"the factory {getattr(model, '__qualname__', model)!r} is defined in "
                    f"__main__, which a worker process cannot import; define it in a module")
            pickle.dumps(model)  # must be importable by reference (a module-level function)
            return cls("callable", model, getattr(model, "__qualname__", repr(model)))
        return cls("pickle", pickle.dumps(model), getattr(model, "name", "model"))


@dataclass
class WorkerConfig:
    """Everything a worker needs, picklable."""

    source: ModelSource
    data: Any = None                # a DataSample, a data spec string, or None (synthesize)
    input_shapes: Any = None
    steps: int = 3
    device: str = "CPU:0"           # "CPU:0" or "GPU:0"
    budget_bytes: int | None = None
    seed: int = 0
    log_path: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)


_ENTRY = ("import sys; from batchfit.workers.worker import _entry; "
          "_entry(int(sys.argv[1]), int(sys.argv[2]))")
_SERVER_ENTRY = ("import sys; from batchfit.workers.worker import _server_entry; "
                 "_server_entry(int(sys.argv[1]))")


def worker_environment(device: str, budget_bytes: int | None) -> dict[str, str]:
    """Environment variables a worker needs before its Keras backend is imported."""
    from ..backend import get_backend

    return get_backend().worker_environment(device, budget_bytes)


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


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: the kernel's out-of-memory killer?)" if -code == signal.SIGKILL else ""
        return f"worker died with {name}{hint}"
    return f"worker exited with status {code}"


def _tail(path: str, lines: int = 6) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    keep = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(keep)


class _ForkedProcess:
    """A worker forked by a :class:`_ForkServer`: the parts of ``subprocess.Popen`` used here.

    It is the server's child, not ours, so its exit status comes from the server.
    """

    def __init__(self, server: _ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            self._server.pump(0.05)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)


class _ForkServer:
    """A process that imports TensorFlow once, then forks a fresh worker for every probe.

    Starting a worker by ``exec`` costs an interpreter and a TensorFlow import (measured: 6 of
    the 8 s each probe of a search in fresh processes took on a 2-core machine); a fork of a
    process that has imported TensorFlow, and nothing more, costs milliseconds, and the child
    is as fresh as a new process where it matters: TensorFlow's runtime (its allocator, with
    the cap from the environment, and its thread pools) starts in the child, at its first op.
    The server runs with the worker's environment and the fixed address-space layout, which
    its children inherit. Linux only; a server that fails to start or dies makes the caller
    fall back to starting workers by ``exec``.

    Messages: the caller sends one byte with three descriptors (the child's inbox, outbox and
    log) per worker; the server answers ``P <pid>`` for each fork and ``X <pid> <code>`` as
    each child exits (``code`` as ``Popen.returncode``: negative for a signal).
    """

    def __init__(self, env: dict[str, str]) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="batchfit-forkserver-", suffix=".log")
        os.close(fd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER_ENTRY, str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                pass_fds=(theirs.fileno(),), close_fds=True)
        finally:
            log.close()
            theirs.close()
        self._sock = ours
        self._buffer = b""
        self._pids: list[int] = []
        self._exits: dict[int, int] = {}

    def pump(self, timeout: float) -> bool:
        """Read what the server has sent (waiting up to ``timeout``); ``False`` once it is gone."""
        if self._sock is None:
            return False
        try:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                return True
            data = self._sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._sock.close()
            self._sock = None
            return False
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            kind, *values = line.decode().split()
            if kind == "P":
                self._pids.append(int(values[0]))
            elif kind == "X":
                self._exits[int(values[0])] = int(values[1])
        return True

    def spawn(self, fds: tuple[int, int, int], timeout: float) -> _ForkedProcess | None:
        """Fork a worker that talks over ``fds`` (inbox, outbox, log); ``None`` if it cannot."""
        if self._sock is None:
            return None
        known = len(self._pids)
        try:
            socket.send_fds(self._sock, [b"F"], list(fds))
        except OSError:
            return None
        deadline = time.monotonic() + timeout
        while len(self._pids) == known:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.pump(min(remaining, 0.5)):
                return None
        return _ForkedProcess(self, self._pids[known])

    def usable(self) -> bool:
        """Whether the server is still there to fork workers."""
        return self._sock is not None and self.proc.poll() is None

    def exit_code(self, pid: int) -> int | None:
        """The worker's exit code once it has ended, else ``None``."""
        self.pump(0)
        if pid in self._exits:
            return self._exits[pid]
        if self._sock is None:
            # The server is gone (and its children with their parent): alive or not is all
            # that is left to know.
            try:
                state = stat_fields(f"/proc/{pid}/stat")[0]
            except (OSError, IndexError):
                return -signal.SIGKILL
            if state in ("Z", "X"):  # a zombie waiting for a parent that is not us
                return -signal.SIGKILL
        return None

    def close(self) -> None:
        """Stop the server (its workers are stopped by their owner) and remove its log."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


#: Seconds an unused fork server is kept for the next search in this process (then closed).
SERVER_IDLE_SECONDS = 60.0


class _SharedServer:
    """The fork server of this process, kept between searches that share its environment.

    Every search of a process (a notebook's, a benchmark's, ``tune``'s) would otherwise start
    its own server and pay its TensorFlow import (~6 s on a 2-core machine) again. One server is
    kept, for one environment (the budget is in it): a search with another environment
    replaces it. Unused for :data:`SERVER_IDLE_SECONDS` it is closed, so an idle process
    does not keep a TensorFlow-sized child; and at exit.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[tuple[str, str], ...] | None = None
        self.server: _ForkServer | None = None
        self.users = 0
        self.timer: threading.Timer | None = None

    def acquire(self, env: dict[str, str]) -> _ForkServer:
        """The server for ``env``, started if there is none alive for it."""
        key = tuple(sorted(env.items()))
        with self.lock:
            self._cancel_timer()
            if self.server is not None and not self.server.usable():
                self._drop()  # died: whoever still holds it falls back to exec
            if self.server is not None and self.key != key:
                if self.users > 0:
                    # In use by a search with another environment (another thread): this
                    # search gets a server of its own, closed when it releases it.
                    return _ForkServer(env)
                self._drop()
            if self.server is None:
                self.server, self.key, self.users = _ForkServer(env), key, 0
            self.users += 1
            return self.server

    def release(self, server: _ForkServer, *, broken: bool = False) -> None:
        """A search is done with ``server`` (``broken``: it failed; never hand it out again)."""
        with self.lock:
            if server is not self.server:
                server.close()  # a server of its own, or one replaced meanwhile
                return
            self.users = max(0, self.users - 1)
            if broken:
                self._drop()
            elif self.users == 0:
                self.timer = threading.Timer(SERVER_IDLE_SECONDS, self._close_if_idle)
                self.timer.daemon = True
                self.timer.start()

    def _close_if_idle(self) -> None:
        with self.lock:
            if self.users == 0:
                self._drop()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _drop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.server, self.key, self.users = None, None, 0

    def close(self) -> None:
        """Close the server now (at exit, or when a caller wants its memory back)."""
        with self.lock:
            self._cancel_timer()
            self._drop()


_SHARED_SERVER = _SharedServer()
atexit.register(_SHARED_SERVER.close)  # a no-op when no server was started


def close_fork_server() -> None:
    """Close the fork server this process keeps between searches, if any (it also closes
    itself after :data:`SERVER_IDLE_SECONDS` unused, and at exit)."""
    _SHARED_SERVER.close()


def _watch_stalls(config: WorkerConfig) -> bool:
    """Watch probes for a wait on memory: where the budget is the CPU allocator's cap, on Linux."""
    return (sys.platform.startswith("linux") and config.device.upper().startswith("CPU")
            and config.budget_bytes is not None
            and os.environ.get("BATCHFIT_STALL_WATCH", "1") != "0")


def _use_fork_server(device: str) -> bool:
    """Fork workers from a server: on Linux, for the CPU (``BATCHFIT_FORK_SERVER=0`` turns it off).

    GPUs keep a worker started by ``exec`` per probe: a CUDA runtime must not be forked, and
    only the CPU path has been measured here.
    """
    return (sys.platform.startswith("linux") and device.upper().startswith("CPU")
            and os.environ.get("BATCHFIT_FORK_SERVER", "1") != "0")


class ProbeWorker:
    """A long-lived worker process that runs probes under an enforced memory budget.

    Args:
        config: what to load and how to probe (see :class:`WorkerConfig`).
        start_timeout: seconds allowed for the worker to import TensorFlow and build the model.
        probe_timeout: seconds allowed for one probe before the worker is killed.
        restart_after_oom: start a fresh process after a probe that ran out of memory (default
            ``True``): a process that has hit an OOM answers differently from a fresh one.
        fresh_each_probe: start a fresh process for every probe (default ``False``). Measured
            under a capped allocator: which sizes fit depends on what ran before in the same
            process (a CNN fitting batch 180 at 111 MiB after smaller sizes, and needing over
            125 MiB for it in a fresh process), while training starts in a fresh process.
        prestart: with ``fresh_each_probe``, start the next process while the current probe
            runs (default ``True``): its start-up (importing TensorFlow, building and tracing
            the model; seconds, single-threaded) overlaps the probe, and the 10 s an
            out-of-memory probe spends waiting. Each process has its own allocator, so the
            measurements do not interfere.
        fork_server: fork each fresh process from a server that has imported TensorFlow
            once (see :class:`_ForkServer`) instead of starting it by ``exec``. Default: with
            ``fresh_each_probe``, on Linux, for the CPU. Measured on the built-in example
            (demo_model, 96 MiB): a probe's process ready in ~1.5 s instead of ~8 s.
        stall_seconds: a probe whose worker has been quiet this long (no CPU used, no thread
            running; see :mod:`batchfit.workers.stall`) is waiting in the capped allocator for
            memory nothing can free: it is reported as out of memory and the worker killed,
            instead of waiting out TensorFlow's 10 s (or, near the limit, a minute).
            Default: 1 s where the budget is TensorFlow's CPU allocator cap, on Linux
            (``BATCHFIT_STALL_WATCH=0`` turns it off); ``0`` turns it off; never on a GPU.

    Example (not run here: it starts TensorFlow in a subprocess):

    >>> # with ProbeWorker(WorkerConfig(ModelSource.from_model("batchfit.examples.models:seed_mlp"),
    >>> #                               budget_bytes=256 << 20)) as w:
    >>> #     print(w.info["device"], w.probe(64).fits)
    """

    def __init__(self, config: WorkerConfig, *, start_timeout: float = 600.0,
                 probe_timeout: float = 600.0, restart_after_oom: bool = True,
                 fresh_each_probe: bool = False, prestart: bool = True,
                 fork_server: bool | None = None, stall_seconds: float | None = None) -> None:
        self.config = config
        self.restart_after_oom = restart_after_oom
        self.fresh_each_probe = fresh_each_probe
        self.prestart = prestart
        self.start_timeout = start_timeout
        self.probe_timeout = probe_timeout
        self.info: dict[str, Any] = {}
        self.starts = 0
        self._proc: Any = None
        self._conn: Any = None
        self._send_conn: Any = None
        self._spare: tuple[Any, Any, Any, str] | None = None
        self._log_paths: list[str] = []
        self._closed = False  # the last _receive saw the worker's pipe close
        self._quiet = 0.0  # seconds the worker was seen waiting without running (stall watch)
        if stall_seconds is None and _watch_stalls(config):
            stall_seconds = 1.0
        self.stall_seconds = stall_seconds if stall_seconds and stall_seconds > 0 else None
        if fork_server is None:
            fork_server = fresh_each_probe and _use_fork_server(config.device)
        self.fork_server = fork_server
        self._server: _ForkServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start the worker and wait until it has built the model; return what it reports.

        The worker is a fresh interpreter (``python -c``), not a ``multiprocessing`` child, so
        the caller's ``__main__`` is never re-run and needs no ``if __name__ == "__main__"``
        guard. Messages travel over a pipe pair of their own; the worker's stdout and stderr go
        to a log file whose tail is reported if it dies.

        Raises:
            ModelLoadError: the worker could not load or build the model.
            ProbeFailedError: the worker died or hung while starting.
        """
        if self._spare is not None:
            launched, self._spare = self._spare, None
        else:
            launched = self._launch()
        proc, self._send_conn, self._conn, self.config.log_path = launched
        self._proc = proc
        self.starts += 1
        msg = self._receive(self.start_timeout)
        if msg is not None and msg.get("phase") == "warm_up":
            # Built; now two tiny training steps. Building may wait on I/O (weights to
            # download) without running, so the stall watch starts only here: a worker that
            # sits still now is waiting in the capped allocator, as a probe's would (measured:
            # a model whose optimizer state alone fills the budget waited 10 s at batch 1).
            sizes = {k: msg.get(k) for k in ("weights_bytes", "state_bytes")}
            msg = self._receive(self.start_timeout, watch=True)
            if (msg is None and self.stall_seconds is not None
                    and self._quiet >= self.stall_seconds):
                self.kill()
                raise _setup_oom_error(sizes, self.config.budget_bytes, waited=self._quiet)
        if msg is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)  # a closed pipe means it is dying: let it report how
            why = _describe_exit(proc.poll()) if proc.poll() is not None else "timed out"
            log_tail = _tail(self.config.log_path)
            self.kill()
            raise ProbeFailedError(f"the probe worker failed to start ({why}). "
                                   f"Its log: {log_tail}")
        if not msg.get("ok"):
            self.kill()
            if msg.get("oom"):
                raise _setup_oom_error(msg, self.config.budget_bytes)
            raise ModelLoadError(msg.get("message", "the worker could not build the model"))
        self.info = msg
        return msg

    def _launch(self) -> tuple[Any, Any, Any, str]:
        """Start a worker process and send it the config, without waiting for it."""
        fd, log_path = tempfile.mkstemp(prefix="batchfit-worker-", suffix=".log")
        os.close(fd)
        self._log_paths.append(log_path)
        env = dict(os.environ)
        env.update(worker_environment(self.config.device, self.config.budget_bytes))
        env.update(self.config.extra_env)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = self._fork(env, (to_child_r, from_child_w, log.fileno()))
            if proc is None:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _ENTRY, str(to_child_r), str(from_child_w)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                    pass_fds=(to_child_r, from_child_w), close_fds=True)
        finally:
            log.close()
            os.close(to_child_r)
            os.close(from_child_w)
        send_conn = Connection(to_child_w, readable=False)
        conn = Connection(from_child_r, writable=False)
        config = dataclasses.replace(self.config, log_path=log_path)
        try:
            send_conn.send(config)
        except (BrokenPipeError, OSError):
            pass
        return proc, send_conn, conn, log_path

    def _fork(self, env: dict[str, str], fds: tuple[int, int, int]) -> Any:
        """A worker forked by the fork server (started on first use), or ``None``."""
        if not self.fork_server:
            return None
        if self._server is None:
            self._server = _SHARED_SERVER.acquire(env)
        proc = self._server.spawn(fds, self.start_timeout)
        if proc is None:
            # The server failed to start or died: workers start by exec from now on (which
            # reports its own failure, if TensorFlow cannot start at all).
            self.fork_server = False
            _SHARED_SERVER.release(self._server, broken=True)
            self._server = None
        return proc

    def _receive(self, timeout: float, *, watch: bool = False) -> dict[str, Any] | None:
        """The worker's next message, or ``None`` (timed out, ``_closed``: pipe closed, or
        with ``watch``, ``_quiet``: the worker waited ``stall_seconds`` on memory)."""
        deadline = time.monotonic() + timeout
        self._closed = False
        self._quiet = 0.0
        clock = QuietClock() if watch and self.stall_seconds is not None else None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                if self._conn.poll(min(remaining, 0.1 if clock is not None else 0.5)):
                    return self._conn.recv()
            except (EOFError, OSError):
                self._closed = True
                return None
            if self._proc.poll() is not None:
                # It may have sent its last words just before dying.
                try:
                    if self._conn.poll(0):
                        return self._conn.recv()
                except (EOFError, OSError):
                    pass
                return None
            if clock is not None:
                sample = sample_process(self._proc.pid)
                if sample is not None:
                    self._quiet = clock.update(time.monotonic(), *sample)
                    if self._quiet >= self.stall_seconds:  # type: ignore[operator]
                        return None

    def probe(self, batch_size: int, timeout: float | None = None) -> Probe:
        """Run one probe; a dead or hung worker becomes a ``crashed``/``timeout`` probe.

        Args:
            batch_size: the size to try.
            timeout: seconds to wait for this probe (default: ``probe_timeout``).
        """
        timeout = self.probe_timeout if timeout is None else timeout
        if self._proc is None or self._proc.poll() is not None:
            if self.starts == 0:
                self.start()
            else:
                # A restart (after a crash, an OOM, or for a fresh process): it built the model
                # before, so a failure now is this probe's, not bad input.
                t_start = time.perf_counter()
                try:
                    self.start()
                except (ProbeFailedError, NothingFitsError, ModelLoadError) as exc:
                    return Probe(batch_size=batch_size, fits=False, outcome="crashed",
                                 seconds=time.perf_counter() - t_start,
                                 detail=f"the worker failed to restart: {exc}"[:400])
        if self.fresh_each_probe and self.prestart and self._spare is None:
            self._spare = self._launch()  # the next probe's process warms up meanwhile
        t0 = time.perf_counter()
        try:
            self._send_conn.send(("probe", int(batch_size)))
        except (BrokenPipeError, OSError):
            pass
        msg = self._receive(timeout, watch=True)
        if msg is not None and "probe" in msg:
            probe = Probe.from_dict(msg["probe"])
            if self.fresh_each_probe or (probe.outcome == "oom" and self.restart_after_oom):
                self._stop_current()
            return probe
        if self._proc.poll() is None:
            # A closed pipe can be seen a moment before the dying process can be waited for
            # (the kernel closes its files first): give it that moment, so a crash is not
            # mistaken for a stall. A stalled worker is still running and is killed below.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5.0 if self._closed else 0.0)
        alive = self._proc.poll() is None
        self.kill()
        if alive and self.stall_seconds is not None and self._quiet >= self.stall_seconds:
            return Probe(batch_size=batch_size, fits=False, outcome="oom",
                         seconds=time.perf_counter() - t0,
                         detail=f"out of memory: the worker waited {self._quiet:.1f} s without "
                                f"running (TensorFlow's allocator waits up to 10 s for memory "
                                f"to be freed, then raises ResourceExhaustedError); worker "
                                f"killed")
        if alive:
            return Probe(batch_size=batch_size, fits=False, outcome="timeout",
                         seconds=time.perf_counter() - t0,
                         detail=f"no answer within {timeout:.0f} s (stalled waiting for memory?); "
                                f"worker killed")
        return Probe(batch_size=batch_size, fits=False, outcome="crashed",
                     seconds=time.perf_counter() - t0,
                     detail=f"{_describe_exit(self._proc.returncode)}; "
                            f"log: {_tail(self.config.log_path)}".strip())

    def kill(self) -> None:
        """Kill the worker process at once (no-op if it is gone)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        for conn in (self._conn, self._send_conn):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
        self._conn = self._send_conn = None

    def _stop_current(self) -> None:
        """Stop the current worker process (politely, then by force); keep the spare."""
        if self._proc is not None and self._proc.poll() is None and self._send_conn is not None:
            try:
                self._send_conn.send(("stop",))
                self._proc.wait(10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def close(self, *, keep_log: bool = False) -> None:
        """Stop the worker and any pre-started one, and remove their logs."""
        self._stop_current()
        if self._spare is not None:
            proc, send_conn, conn, _ = self._spare
            self._spare = None
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            for c in (send_conn, conn):
                with contextlib.suppress(OSError):
                    c.close()
        if self._server is not None:
            _SHARED_SERVER.release(self._server)  # kept for the next search a while
            self._server = None
        if not keep_log:
            for path in self._log_paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._log_paths.clear()

    def __enter__(self) -> ProbeWorker:  # noqa: PYI034 - never subclassed
        try:
            self.start()
        except BaseException:
            self.close()  # no __exit__ follows a failed __enter__
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _setup_oom_error(msg: dict[str, Any], budget: int | None, *,
                     waited: float | None = None) -> NothingFitsError:
    """The error for a model whose weights or optimizer state alone exhaust the budget
    (``waited``: the seconds its first step sat waiting for memory, when it was stopped)."""
    from ..core.sizes import format_bytes

    weights = msg.get("weights_bytes")
    state = msg.get("state_bytes")
    within = f" within {format_bytes(budget)}" if budget else ""
    if state is not None:
        share = f" ({state / budget:.0%} of the budget)" if budget else ""
        text = (f"nothing fits: even a batch of 1 ran out of memory{within}. The model's "
                f"weights take {format_bytes(weights or 0)}; with the optimizer state, "
                f"{format_bytes(state)}{share}, before activations and gradients")
    elif weights is None:
        text = (f"nothing fits: building the model alone ran out of memory{within}; its "
                f"weights exceed the budget")
    else:
        text = (f"nothing fits: the model's weights take {format_bytes(weights)}, and with its "
                f"optimizer state (Adam keeps two more copies) they ran out of memory{within} "
                f"before any training step")
    if waited is not None:
        text += (f" (the step at batch 1 sat waiting for memory, not running, for "
                 f"{waited:.1f} s: stopped there)")
    text += (". Use a larger budget, a smaller model, mixed precision, or an optimizer with "
             "less state (SGD keeps none).")
    return NothingFitsError(text, fixed_bytes=state if state is not None else weights,
                            budget_bytes=budget)


# -- inside the worker process -------------------------------------------------------------------
def build_model(source: ModelSource) -> Any:
    """Materialize the model described by ``source`` (runs in the worker)."""
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
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). Pass a model factory "
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


def _worker_main(inbox: Any, conn: Any, config: WorkerConfig) -> None:  # pragma: no cover
    import warnings
    warnings.simplefilter("ignore")
    from ..backend import get_backend

    backend = get_backend()
    try:
        device = config.device
        backend.configure_worker(device, config.budget_bytes)
        model = None
        model = build_model(config.source)
        batch_fn, notes = backend.make_batch_fn(model, config.data, config.input_shapes,
                                                config.seed)
        # From here on nothing waits on I/O: the parent may watch for a wait on memory.
        # (state_bytes builds the optimizer's slots, as Keras does before a first step.)
        conn.send({"phase": "warm_up", "weights_bytes": backend.weights_bytes(model),
                   "state_bytes": backend.state_bytes(model)})
        runner = backend.probe_runner(model, batch_fn, steps=config.steps, device=device,
                                      budget_bytes=config.budget_bytes)
        failure = runner.warm_up()
        if failure is not None and failure[0]:
            conn.send({"ok": False, "oom": True, "error_type": "ResourceExhaustedError",
                       "weights_bytes": backend.weights_bytes(model),
                       "state_bytes": backend.state_bytes(model),
                       "message": failure[1]})
            return
        conn.send({"ok": True, "device": device, "model_name": model.name,
                   "state_bytes": backend.state_bytes(model), "notes": notes,
                   "environment": backend.environment_info(), "pid": os.getpid()})
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
        if cmd[0] == "probe":
            probe = runner.run(int(cmd[1]))
            conn.send({"probe": probe.to_dict()})
