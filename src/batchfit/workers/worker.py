"""Probes in an isolated worker process, under a memory budget that is really enforced.

On CPU the budget becomes TensorFlow's own allocator cap (``TF_CPU_ALLOCATOR_USE_BFC=true
TF_CPU_BFC_MEM_LIMIT_IN_MB=N``, oneDNN off), set in the worker's environment before it imports
TensorFlow: a batch that does not fit raises a real ``ResourceExhaustedError`` there, exactly as
on a GPU with that much memory. On a GPU the worker creates a logical device with
``memory_limit``. The worker lives across probes (one TensorFlow import, one model build, one
retrace per new shape); if it dies (segfault, killed by the kernel) the probe is reported as
``"crashed"``, the caller is untouched, and the next probe starts a fresh worker. Searches run
every probe in a fresh process; on Linux, for the CPU, those are forked from a server process
that has imported TensorFlow once (:mod:`batchfit.workers.server`: ~1.5 s per probe instead of
~8 s), kept between the searches of a process that share its environment.

This module is the parent side (:class:`ProbeWorker`, and what it sends: :class:`WorkerConfig`,
:class:`ModelSource`); it imports no TensorFlow. The child side, which imports the backend
after its environment and standard error are set up, is :mod:`batchfit.workers.child`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ..core.settle import PROBE_STEPS
from ..errors import (
    InvalidInputError,
    ModelLoadError,
    NothingFitsError,
    ProbeFailedError,
)
from ..results import Probe
from .child import _ENTRY
from .server import _ForkServer, acquire_fork_server, close_fork_server, release_fork_server
from .stall import QuietClock, sample_process
from .switches import switched_on

MiB = 1 << 20
STOP_GRACE_SECONDS = 0.5  # a stopped worker still cleaning up after its last probe is killed

#: Where :class:`ProbeWorker` records what its time went to, when set to a list (benchmarks
#: read it: bench/bench_real.py): ``{"event", "seconds", ...}`` dicts, ``event`` one of
#: ``"launch"`` (forking or exec'ing a process, the fork server's start included), ``"start"``
#: (waiting for a process to be ready; with the child's ``build_s`` and ``warm_up_s``, which
#: overlap earlier probes when it was started ahead), ``"probe"`` (a probe's round trip, with
#: the worker's own ``probe_s`` and ``prepared``: it started from a prepared first part, see
#: :meth:`ProbeWorker.expect`), ``"stop"``. ``None`` (default): nothing is recorded.
EVENTS: list[dict[str, Any]] | None = None


def _record(event: str, seconds: float, **extra: Any) -> None:
    if EVENTS is not None:
        EVENTS.append({"event": event, "seconds": round(seconds, 3), **extra})


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
    steps: int = PROBE_STEPS
    device: str = "CPU:0"           # "CPU:0" or "GPU:0"
    budget_bytes: int | None = None
    seed: int = 0
    log_path: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    jit_compile: bool = False       # XLA-compile the training step before probing (max --jit)
    compile_sizes: tuple[int, ...] = ()  # an XLA step: compile these first (and the answer)
    #: warm up before the first probe (tiny steps: a model whose state alone fills the budget
    #: is told at once). A :class:`ProbeWorker` warms up only the first process it launches;
    #: the rest skip it: every probe traces its own steps anyway, and on real models the
    #: warm-up cost as much as a probe (ResNet50 at 64x64: 12.8 s; MobileNetV2: 9.4 s).
    warm_up: bool = True
    #: ``"worker"``: the backend's worker settings (:meth:`~batchfit.backend.Backend.
    #: configure_worker`); ``"default"``: the budget's cap only, the framework's defaults
    #: otherwise (:meth:`~batchfit.backend.Backend.configure_default`)
    settings: str = "worker"
    #: a directory the worker keeps compiled XLA programs in and loads them from
    #: (:meth:`~batchfit.backend.Backend.use_compile_cache`); a :class:`ProbeWorker` makes one
    #: for its processes when this is empty, and removes it when closed
    compile_cache: str = ""


def worker_environment(device: str, budget_bytes: int | None) -> dict[str, str]:
    """Environment variables a worker needs before its Keras backend is imported."""
    from ..backend import get_backend

    return get_backend().worker_environment(device, budget_bytes)



def _compile_cache_wanted() -> bool:
    """Whether a worker's processes share compiled XLA programs (``BATCHFIT_COMPILE_CACHE=0``:
    each compiles its own, as before session 16)."""
    return switched_on("BATCHFIT_COMPILE_CACHE")


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


def _watch_stalls(config: WorkerConfig) -> bool:
    """Watch probes for a wait on memory: where the budget is the CPU allocator's cap, on Linux."""
    return (sys.platform.startswith("linux") and config.device.upper().startswith("CPU")
            and config.budget_bytes is not None
            and switched_on("BATCHFIT_STALL_WATCH"))


#: Host memory a spare process needs beyond its budget (TensorFlow's runtime and the model).
SPARE_OVERHEAD_BYTES = 1 << 30


def _available_memory() -> int | None:
    """The host's available memory in bytes (Linux ``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _room_for_another(budget: int | None) -> bool:
    """Whether the host has memory for one more prestarted process beyond the first spare:
    a capped CPU worker reserves its whole budget at start (one region), so each holds
    ``budget`` of host memory plus :data:`SPARE_OVERHEAD_BYTES`."""
    free = _available_memory()
    return free is None or free > (budget or 0) + SPARE_OVERHEAD_BYTES


def _use_fork_server(device: str) -> bool:
    """Fork workers from a server: on Linux, for the CPU (``BATCHFIT_FORK_SERVER=0`` turns it off).

    GPUs keep a worker started by ``exec`` per probe: a CUDA runtime must not be forked, and
    only the CPU path has been measured here.
    """
    return (sys.platform.startswith("linux") and device.upper().startswith("CPU")
            and switched_on("BATCHFIT_FORK_SERVER"))


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
        reuse_fits: with ``fresh_each_probe``, run the next probe in the same process when
            every probe that process ran fitted and the next size is larger than all of them
            (default ``False``): the model is built and traced once for an ascending run of
            fits. A process that ran out of memory (or came near the limit) is never reused,
            and :meth:`probe_fresh` always gets a process that has run nothing. A reused
            process can fit sizes that fail in fresh ones (measured on real models:
            docs/design.md, "Reusing a worker"), so ``max`` sends a size near the budget to
            :meth:`probe_fresh` (:func:`batchfit.core.confirm.near_the_edge`), and
            confirmations in fresh processes decide the answer.
        fork_server: fork each fresh process from a server that has imported TensorFlow
            once (see :mod:`batchfit.workers.server`) instead of starting it by ``exec``. Default: with
            ``fresh_each_probe``, on Linux, for the CPU. Measured on the built-in example
            (demo_model, 96 MiB): a probe's process ready in ~1.5 s instead of ~8 s.
        stall_seconds: a probe whose worker has been quiet this long inside a compiled step
            (no CPU used, no thread running; see :mod:`batchfit.workers.stall`; the worker
            marks its steps) is waiting in the capped allocator for memory nothing can free:
            it is reported as out of memory and the worker killed,
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
                 fork_server: bool | None = None, stall_seconds: float | None = None,
                 reuse_fits: bool = False) -> None:
        self.config = config
        self.restart_after_oom = restart_after_oom
        self.fresh_each_probe = fresh_each_probe
        self.prestart = prestart
        self.reuse_fits = reuse_fits
        self.reused = 0  # probes run in a process that had run (fitting) probes before
        self._ran: list[int] = []  # sizes the current process has run, all fitting
        self.spares_wanted = 1  # processes kept started ahead (with prestart)
        self.start_timeout = start_timeout
        self.probe_timeout = probe_timeout
        self.info: dict[str, Any] = {}
        self.starts = 0
        self._launched = 0  # processes launched (spares included): only the first warms up
        self._proc: Any = None
        self._conn: Any = None
        self._send_conn: Any = None
        self._spares: list[tuple[Any, Any, Any, str]] = []
        self._expect: int | None = None  # the size spares launched from now on prepare for
        self._prepared_for: dict[str, int] = {}  # a spare's log path -> the size it prepared
        self._log_paths: list[str] = []
        self._cache_dir = ""  # the compile cache this worker made (removed by close)
        self._closed = False  # the last _receive saw the worker's pipe close
        self._quiet = 0.0  # seconds the worker was seen waiting without running (stall watch)
        #: the longest quiet stretch inside a step during the last wait for a message (recorded)
        self.longest_quiet = 0.0
        if stall_seconds is None and _watch_stalls(config):
            stall_seconds = 1.0
        self.stall_seconds = stall_seconds if stall_seconds and stall_seconds > 0 else None
        if fork_server is None:
            fork_server = fresh_each_probe and _use_fork_server(config.device)
        self.fork_server = fork_server
        self._server: _ForkServer | None = None

    # -- read-only views ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether a worker process is up now (one is started again at the next probe)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The current worker process's id (``None`` before the first start)."""
        return None if self._proc is None else self._proc.pid

    @property
    def server_pid(self) -> int | None:
        """The id of the fork server this worker's processes are forked from (``None``:
        they are started by ``exec``)."""
        return None if self._server is None else self._server.proc.pid

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, batch_size: int | None = None) -> dict[str, Any]:
        """Start the worker and wait until it has built the model; return what it reports.

        ``batch_size``: the size of the probe it starts for. A spare prepared for another size
        (:meth:`expect`) is not used for it: it is stopped, and the next one (or a new process)
        starts instead, so that a process runs no size but the one it prepared.

        The worker is a fresh interpreter (``python -c``), not a ``multiprocessing`` child, so
        the caller's ``__main__`` is never re-run and needs no ``if __name__ == "__main__"``
        guard. Messages travel over a pipe pair of their own; the worker's stdout and stderr go
        to a log file whose tail is reported if it dies.

        Raises:
            ModelLoadError: the worker could not load or build the model.
            ProbeFailedError: the worker died or hung while starting.
        """
        launched = self._take_spare(batch_size)
        spare = launched is not None
        if launched is None:
            launched = self._launch()
        t0 = time.perf_counter()  # (a launch here is recorded as one)
        proc, self._send_conn, self._conn, self.config.log_path = launched
        self._proc = proc
        self._ran = []
        self.starts += 1
        try:
            msg = self._start_message(proc)
        finally:
            _record("start", time.perf_counter() - t0, spare=spare,
                    **(self.info.get("timings", {}) if self.info.get("pid") == proc.pid
                       else {}))
        return msg

    def _start_message(self, proc: Any) -> dict[str, Any]:
        """Wait for the started process to be ready (see :meth:`start`)."""
        msg = self._receive(self.start_timeout)
        if msg is not None and msg.get("phase") == "warm_up":
            # Built; now two tiny training steps. Building may wait on I/O (weights to
            # download) without running, so the stall watch starts only here: a worker that
            # sits still now is waiting in the capped allocator, as a probe's would (measured:
            # a model whose optimizer state alone fills the budget waited 10 s at batch 1).
            sizes = {k: msg.get(k) for k in ("weights_bytes", "state_bytes")}
            # (not for an XLA step: its warm-up sat quiet for a second at batch 1, measured)
            msg = self._receive(self.start_timeout, watch=not msg.get("step_jit"))
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

    def _take_spare(self, batch_size: int | None) -> tuple[Any, Any, Any, str] | None:
        """The first spare that prepared for ``batch_size`` or for nothing (see :meth:`start`;
        ``None``: a size not known, for which no prepared spare is used); the spares before
        it, prepared for another size, are stopped."""
        while self._spares:
            launched = self._spares.pop(0)
            prepared = self._prepared_for.pop(launched[3], None)
            if prepared is None or prepared == batch_size:
                return launched
            _end_process(launched)
        return None

    def _launch(self, prepare: int | None = None) -> tuple[Any, Any, Any, str]:
        """Start a worker process and send it the config (and ``prepare``: the size of its
        first probe, see :meth:`expect`), without waiting for it."""
        t0 = time.perf_counter()
        try:
            launched = self._launch_now()
            if prepare is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    launched[1].send(("prepare", int(prepare)))
                    self._prepared_for[launched[3]] = int(prepare)
            return launched
        finally:
            _record("launch", time.perf_counter() - t0, prepare=prepare)

    def _launch_now(self) -> tuple[Any, Any, Any, str]:
        fd, log_path = tempfile.mkstemp(prefix="batchfit-worker-", suffix=".log")
        os.close(fd)
        self._log_paths.append(log_path)
        if not self.config.compile_cache and _compile_cache_wanted():
            self._cache_dir = tempfile.mkdtemp(prefix="batchfit-compiled-")
            self.config.compile_cache = self._cache_dir
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
        config = dataclasses.replace(self.config, log_path=log_path,
                                     warm_up=self.config.warm_up and self._launched == 0)
        self._launched += 1
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
            self._server = acquire_fork_server(env)
        proc = self._server.spawn(fds, self.start_timeout)
        if proc is None:
            # The server failed to start or died: workers start by exec from now on (which
            # reports its own failure, if TensorFlow cannot start at all).
            self.fork_server = False
            release_fork_server(self._server, broken=True)
            self._server = None
        return proc

    def _receive(self, timeout: float, *, watch: bool = False) -> dict[str, Any] | None:
        """The worker's next message, or ``None`` (timed out, ``_closed``: pipe closed, or
        with ``watch``, ``_quiet``: the worker waited ``stall_seconds`` on memory).

        The worker marks each compiled step it runs (``{"watch": True}`` as it starts,
        ``{"watch": False}`` as it returns; see
        :func:`batchfit.backend.tensorflow.probe.in_step`); these marks are consumed here, and
        quiet time counts only between them. Outside a step the worker may sit still for
        seconds without waiting on memory (deleting a ``tf.data`` iterator: measured 1-5 s
        in ResNet50 probes that fitted), so quiet there means nothing.
        """
        deadline = time.monotonic() + timeout
        self._closed = False
        self._quiet = self.longest_quiet = 0.0
        watching = watch and self.stall_seconds is not None
        clock: QuietClock | None = None  # set while the worker is inside a step
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                if self._conn.poll(min(remaining, 0.1 if watching else 0.5)):
                    msg = self._conn.recv()
                    if isinstance(msg, dict) and msg.keys() == {"watch"}:
                        clock = QuietClock() if watching and msg["watch"] else None
                        self._quiet = 0.0
                        continue
                    return msg  # type: ignore[no-any-return]
            except (EOFError, OSError):
                self._closed = True
                return None
            if self._proc.poll() is not None:
                # It may have sent its last words just before dying.
                return self._last_words()
            if clock is not None:
                sample = sample_process(self._proc.pid)
                if sample is not None:
                    self._quiet = clock.update(time.monotonic(), *sample)
                    self.longest_quiet = max(self.longest_quiet, self._quiet)
                    if self._quiet >= self.stall_seconds:  # type: ignore[operator]
                        return None

    def _last_words(self) -> dict[str, Any] | None:
        """The message a dead worker sent last before dying (step marks skipped), or ``None``."""
        try:
            while self._conn.poll(0):
                msg = self._conn.recv()
                if not (isinstance(msg, dict) and msg.keys() == {"watch"}):
                    return msg  # type: ignore[no-any-return]
        except (EOFError, OSError):
            pass
        return None

    def probe(self, batch_size: int, timeout: float | None = None) -> Probe:
        """Run one probe; a dead or hung worker becomes a ``crashed``/``timeout`` probe.

        Args:
            batch_size: the size to try.
            timeout: seconds to wait for this probe (default: ``probe_timeout``).
        """
        timeout = self.probe_timeout if timeout is None else timeout
        if self.running and self._ran and not self._may_reuse(batch_size):
            self._stop_current()
        if self._proc is None or self._proc.poll() is not None:
            if self.starts == 0:
                self.start(batch_size)
            else:
                # A restart (after a crash, an OOM, or for a fresh process): it built the model
                # before, so a failure now is this probe's, not bad input.
                t_start = time.perf_counter()
                try:
                    self.start(batch_size)
                except (ProbeFailedError, NothingFitsError, ModelLoadError) as exc:
                    return Probe(batch_size=batch_size, fits=False, outcome="crashed",
                                 seconds=time.perf_counter() - t_start,
                                 detail=f"the worker failed to restart: {exc}"[:400])
        reused = bool(self._ran)
        self.reused += reused
        self._top_up_spares()  # the next probes' processes warm up meanwhile
        t0 = time.perf_counter()
        try:
            self._send_conn.send(("probe", int(batch_size)))
        except (BrokenPipeError, OSError):
            pass
        msg = self._receive(timeout, watch=True)
        if msg is not None and "probe" in msg:
            probe = Probe.from_dict(msg["probe"])
            _record("probe", time.perf_counter() - t0, probe_s=round(probe.seconds, 3),
                    batch_size=int(batch_size), outcome=probe.outcome, reused=reused,
                    longest_quiet_s=round(self.longest_quiet, 2),
                    prepared=bool(msg.get("prepared")))
            if reused:
                probe = dataclasses.replace(probe, reused=True)
            if self.fresh_each_probe and self.reuse_fits and probe.fits:
                self._ran.append(int(batch_size))  # kept: an ascending next size may run here
            elif self.fresh_each_probe or (probe.outcome == "oom" and self.restart_after_oom):
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
        probe = self._failed_probe(batch_size, reused, alive, timeout, time.perf_counter() - t0)
        _record("probe", probe.seconds, probe_s=None, batch_size=int(batch_size),
                outcome=probe.outcome, reused=reused, longest_quiet_s=round(self.longest_quiet, 2))
        return probe

    def _failed_probe(self, batch_size: int, reused: bool, alive: bool, timeout: float,
                      seconds: float) -> Probe:
        """The probe of a worker that gave no answer: stalled on memory, timed out or dead."""
        if alive and self.stall_seconds is not None and self._quiet >= self.stall_seconds:
            return Probe(batch_size=batch_size, fits=False, reused=reused, outcome="oom",
                         seconds=seconds,
                         detail=f"out of memory: the worker waited {self._quiet:.1f} s without "
                                f"running (TensorFlow's allocator waits up to 10 s for memory "
                                f"to be freed, then raises ResourceExhaustedError); worker "
                                f"killed")
        if alive:
            return Probe(batch_size=batch_size, fits=False, reused=reused, outcome="timeout",
                         seconds=seconds,
                         detail=f"no answer within {timeout:.0f} s (stalled waiting for memory?); "
                                f"worker killed")
        return Probe(batch_size=batch_size, fits=False, reused=reused, outcome="crashed",
                     seconds=seconds,
                     detail=f"{_describe_exit(self._proc.returncode)}; "
                            f"log: {_tail(self.config.log_path)}".strip())

    def probe_fresh(self, batch_size: int, timeout: float | None = None) -> Probe:
        """Run one probe in a process that has run no probe before (see :meth:`probe`).

        With ``fresh_each_probe`` every probe is one already; otherwise the current worker is
        stopped first, so the probe runs in a new process (a confirmation must not inherit the
        allocator of a process that ran other sizes: which sizes fit depends on it).
        """
        if self.running and (self._ran or not self.fresh_each_probe):
            self._stop_current()
        return self.probe(batch_size, timeout)

    def _may_reuse(self, batch_size: int) -> bool:
        """Whether the current process may run ``batch_size`` (it ran only fits, all smaller)."""
        return (not self.fresh_each_probe) or (self.reuse_fits and batch_size > max(self._ran))

    def prefetch(self, spares: int, *, size: int | None = None) -> None:
        """Keep ``spares`` fresh processes started ahead (building and tracing the model in
        parallel) from now on, e.g. before confirmations, each of which needs a fresh process.
        Beyond the first, a spare is started only while the host's available memory exceeds
        the budget plus :data:`SPARE_OVERHEAD_BYTES` (each holds its whole budget).
        ``size``: as :meth:`expect` (given before the spares start).
        """
        self.spares_wanted = max(0, int(spares))
        if size is not None:
            self.expect(size)
        self._top_up_spares()

    def expect(self, size: int | None) -> None:
        """Have the spares started from now on prepare a probe at ``size`` (``None``: no
        size): build the batches and trace the step for it while the current probe runs
        (:meth:`batchfit.backend.tensorflow.probe.ProbeRunner.prepare`), for probes whose size
        is known ahead, such as the ``k`` confirmations of one size. A spare prepared for a
        size is used only for a probe at that size (:meth:`start`).
        ``BATCHFIT_PREPARE_AHEAD=0`` turns this off.
        """
        on = size is not None and switched_on("BATCHFIT_PREPARE_AHEAD")
        self._expect = int(size) if on else None

    def _top_up_spares(self) -> None:
        if not (self.fresh_each_probe and self.prestart):
            return
        while len(self._spares) < self.spares_wanted and (
                not self._spares or _room_for_another(self.config.budget_bytes)):
            self._spares.append(self._launch(self._expect))

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
        self._ran = []

    def _stop_current(self) -> None:
        """Stop the current worker process (politely, then by force); keep the spare.

        It gets :data:`STOP_GRACE_SECONDS`: after answering, a worker deletes its probe's
        ``tf.data`` iterators, which can take seconds (see
        :func:`batchfit.backend.tensorflow.probe.in_step`), and has nothing to save.
        """
        t0 = time.perf_counter()
        if self._proc is not None and self._proc.poll() is None and self._send_conn is not None:
            try:
                self._send_conn.send(("stop",))
                self._proc.wait(STOP_GRACE_SECONDS)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        _record("stop", time.perf_counter() - t0)

    def close(self, *, keep_log: bool = False) -> None:
        """Stop the worker and any pre-started one, and remove their logs."""
        self._stop_current()
        while self._spares:
            _end_process(self._spares.pop())
        self._prepared_for.clear()
        if self._server is not None:
            release_fork_server(self._server)  # kept for the next search a while
            self._server = None
        if not keep_log:
            for path in self._log_paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._log_paths.clear()
        if self._cache_dir:
            if self.config.compile_cache == self._cache_dir:
                self.config.compile_cache = ""
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = ""

    def __enter__(self) -> ProbeWorker:  # noqa: PYI034 - never subclassed
        try:
            self.start()
        except BaseException:
            self.close()  # no __exit__ follows a failed __enter__
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end_process(launched: tuple[Any, Any, Any, str]) -> None:
    """Kill a started process that will run nothing (a spare) and close its pipes."""
    proc, send_conn, conn, _ = launched
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    for c in (send_conn, conn):
        with contextlib.suppress(OSError):
            c.close()


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


# close_fork_server lives in .server; importable here too, where the README has long named it.
__all__ = ["ModelSource", "ProbeWorker", "WorkerConfig", "close_fork_server",
           "worker_environment"]
