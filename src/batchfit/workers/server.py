"""The fork server: a process that imports the Keras backend once, then forks a worker per probe.

Searches run every probe in a fresh process; on Linux, for the CPU, those are forked from a
server process that has imported TensorFlow once (:class:`_ForkServer`: ~1.5 s per probe
instead of ~8 s), kept between the searches of a process that share its environment
(:class:`_SharedServer`). :func:`fork_server_status` says which server is kept and for how many
searches; :func:`close_fork_server` closes it. This module imports no TensorFlow: the server
process does, in :func:`batchfit.workers.child._server_entry`.

Example:

>>> fork_server_status().users
0
>>> close_fork_server()  # a no-op when no server was started
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from .child import _SERVER_ENTRY
from .stall import stat_fields


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


def acquire_fork_server(env: dict[str, str]) -> _ForkServer:
    """The fork server for ``env``: the one this process keeps, started if needed (a search
    holds it until :func:`release_fork_server`)."""
    return _SHARED_SERVER.acquire(env)


def release_fork_server(server: _ForkServer, *, broken: bool = False) -> None:
    """A search is done with ``server`` (``broken``: it failed; never hand it out again)."""
    _SHARED_SERVER.release(server, broken=broken)


@dataclass(frozen=True)
class ForkServerStatus:
    """The fork server this process keeps between searches, as :func:`fork_server_status` saw it.

    Attributes:
        pid: the server's process id (``None``: no server kept).
        users: searches holding it now (0: idle, closed after :data:`SERVER_IDLE_SECONDS`).
        usable: whether it is alive and can fork workers.
    """

    pid: int | None
    users: int
    usable: bool


def fork_server_status() -> ForkServerStatus:
    """A read-only view of the fork server this process keeps (for tests and diagnostics).

    Example:

    >>> status = fork_server_status()
    >>> status.users >= 0 and (status.pid is not None or not status.usable)
    True
    """
    shared = _SHARED_SERVER
    with shared.lock:
        server = shared.server
        if server is None:
            return ForkServerStatus(pid=None, users=shared.users, usable=False)
        return ForkServerStatus(pid=server.proc.pid, users=shared.users, usable=server.usable())


def close_fork_server() -> None:
    """Close the fork server this process keeps between searches, if any (it also closes
    itself after :data:`SERVER_IDLE_SECONDS` unused, and at exit)."""
    _SHARED_SERVER.close()


__all__ = ["SERVER_IDLE_SECONDS", "ForkServerStatus", "acquire_fork_server", "close_fork_server",
           "fork_server_status", "release_fork_server"]


