"""Seeing a probe stuck in the capped allocator's wait for memory, from outside its process.

When TensorFlow's BFC allocator cannot serve a request it does not fail at once: it waits up to
10 s for another op to free memory, retrying on every free, and only then raises
``ResourceExhaustedError``. A probe worker runs one op at a time, so nothing is left to free
memory: the wait ends in the error (or, for some sizes, in a segfault), and each probe of a size
that does not fit cost 10 s or more (near the limit an LSTM's loop waited a minute). Measured in
a probe worker (demo_model, 96 MiB, batch 600): for the whole 10 s the process used no CPU and
the allocator's bytes in use did not move, while a running step keeps a core busy.

:class:`QuietClock` turns samples of a worker's CPU time and thread states (read from
``/proc`` by :func:`sample_process`, so a wait that holds Python's lock is seen too) into how
long the process has been quiet: no CPU used, no thread running, runnable or in uninterruptible
sleep. A worker quiet for a second *inside a compiled step* is waiting on memory that nothing
can free; the worker marks its steps, and the parent counts quiet time only between the marks
(:meth:`batchfit.workers.worker.ProbeWorker._receive`). Outside a step, quiet means nothing:
deleting a ``tf.data`` iterator (``fit``'s, at the end of each epoch) joins its autotuning
thread, which wakes only at its next optimization period (doubling from 10 ms as the iterator
lives), and measured ResNet50 probes that fitted sat still there 1-5 s with every thread asleep
(a stack taken in one: ``~IteratorResource`` waiting on ``Model::OptimizeLoop``). Counted, those
were reported as out of memory (batch 5 of ResNet50 at 64x64 under 768 MiB, peak 480 MiB).
Used for the CPU only: on a GPU the host may wait idle on a long kernel. This module imports no
TensorFlow.
"""

from __future__ import annotations

import os

__all__ = ["QuietClock", "sample_process", "stat_fields"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def stat_fields(path: str) -> list[str]:
    """The fields of a ``/proc/.../stat`` file after the command name (state first).

    The name, in parentheses, may hold spaces, so the line is split after its last ``)``.
    Raises ``OSError`` if the file cannot be read (the process or thread is gone).
    """
    with open(path) as fh:
        return fh.read().rsplit(")", 1)[1].split()


def sample_process(pid: int) -> tuple[float, bool] | None:
    """``(cpu_seconds, active)`` of process ``pid`` from ``/proc``, or ``None`` if unreadable.

    ``cpu_seconds`` is its user and system time, all threads; ``active`` whether any of its
    threads is running, runnable (``R``) or in uninterruptible sleep (``D``: e.g. paging).

    Example:

    >>> import os
    >>> sample = sample_process(os.getpid())
    >>> sample is None or (sample[0] > 0 and sample[1])  # this thread is running
    True
    """
    try:
        fields = stat_fields(f"/proc/{pid}/stat")
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
        active = False
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                state = stat_fields(f"/proc/{pid}/task/{tid}/stat")[0]
            except (OSError, IndexError):
                continue
            if state in ("R", "D"):
                active = True
                break
    except (OSError, IndexError, ValueError):
        return None
    return cpu, active


class QuietClock:
    """How long a process has been quiet, from successive samples.

    Quiet: no thread active in any sample since the span began, and the CPU time grown by at
    most ``cpu_fraction`` of the span's wall time, plus two ticks of 10 ms (``/proc`` counts
    CPU in ticks; a running op uses a whole core, a stalled process reads 0).

    Args:
        cpu_fraction: CPU seconds per wall second still counted as quiet (default 0.05).

    Example:

    >>> clock = QuietClock()
    >>> clock.update(0.0, 5.00, False), clock.update(0.5, 5.00, False)
    (0.0, 0.5)
    >>> clock.update(1.2, 5.01, False)  # one tick of CPU in 1.2 s: still quiet
    1.2
    >>> clock.update(1.5, 5.30, False)  # it ran again
    0.0
    """

    SLACK_SECONDS = 0.02

    def __init__(self, cpu_fraction: float = 0.05) -> None:
        if not 0 <= cpu_fraction < 1:
            raise ValueError(f"cpu_fraction must be in [0, 1), got {cpu_fraction}")
        self.cpu_fraction = cpu_fraction
        self._since: tuple[float, float] | None = None

    def update(self, wall: float, cpu: float, active: bool) -> float:
        """Add a sample (wall seconds, CPU seconds, any thread active); return the quiet seconds."""
        since = self._since
        if since is None or active or (
                cpu - since[1] > self.cpu_fraction * (wall - since[0]) + self.SLACK_SECONDS):
            self._since = (wall, cpu)
            return 0.0
        return wall - since[0]
