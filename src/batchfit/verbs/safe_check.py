"""``safe_batch_size`` confirmed under the framework's default settings.

The probes run under the emulation's settings (on a capped CPU: one op at a time, one thread
per op, the budget reserved as one region), and ``max_batch_size`` is an answer for exactly
those. A user who caps the allocator and trains with TensorFlow's defaults otherwise runs ops
side by side, each with several threads, so more tensors are alive at once: measured on
ResNet50 (64x64, Adam) under 512 MiB, ``max_batch_size`` 21 trained 3 of 3 in the emulation,
and ``safe_batch_size`` 19 (the 3% margin) 0 of 3 under the defaults (its first epoch peaked
at 465 MiB, then it ran out of memory). The margin that covers this is not a property of the
band the probes see, so it is measured: the safe size is probed ``k`` times more, each in a
fresh process under the default settings, and steps down on any failure, as the answer's own
confirmation does (:class:`~batchfit.core.confirm.ConfirmPolicy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..backend import get_backend
from ..core.confirm import ConfirmPolicy, band_of, run_confirmation
from ..core.search import Trial
from ..errors import ModelLoadError, NothingFitsError, ProbeFailedError
from ..results import Probe

__all__ = ["SAFE_PHASE", "SafeCheck", "check_safe_by_default"]

#: ``Probe.phase`` of a probe of the safe size under the framework's default settings.
SAFE_PHASE = "safe"


@dataclasses.dataclass(frozen=True)
class SafeCheck:
    """What checking the safe size under the default settings gave.

    Attributes:
        batch_size: the safe size after the check (the one given when nothing was checked).
        checks: fresh processes asked for (0: not checked).
        confirmed: ``batch_size`` fitted ``checks`` times under the default settings.
        settings: the default settings, in words (empty when not checked).
    """

    batch_size: int
    checks: int = 0
    confirmed: bool = False
    settings: str = ""


def check_safe_by_default(config: Any, safe: int, *, k: int, granularity: int,
                          per_sample_bytes: float | None, probe_timeout: float,
                          probes: list[Probe],
                          on_probe: Callable[[Probe], None] | None,
                          notes: list[str]) -> SafeCheck:
    """Probe ``safe`` in ``k`` fresh processes under the framework's default settings.

    Args:
        config: the search's :class:`~batchfit.workers.worker.WorkerConfig`.
        safe: the safe size the band and the memory model gave.
        k: fresh processes the safe size must fit in (0: no check).
        granularity: sizes are multiples of this.
        per_sample_bytes: the memory model's slope, for the step down (``None``: none).
        probe_timeout: seconds one probe may take.
        probes: the search's probes; the checks are appended (``phase="safe"``).
        on_probe: called with each probe.
        notes: the search's notes; what the check found is appended.

    Returns:
        A :class:`SafeCheck`. A worker that cannot start leaves the safe size as it was, with
        a note: a failed check never costs the search's answer.
    """
    from ..workers.worker import ProbeWorker

    settings = get_backend().default_settings(config.device, config.budget_bytes)
    if settings is None or k <= 0 or safe <= 0:
        return SafeCheck(safe)
    worker = ProbeWorker(dataclasses.replace(config, settings="default", warm_up=False),
                         probe_timeout=probe_timeout, fresh_each_probe=True)
    policy = ConfirmPolicy(k=k, granularity=granularity, budget_bytes=config.budget_bytes,
                           per_sample_bytes=per_sample_bytes)
    seed = [Trial(safe, True)]

    def trial(b: int) -> Trial:
        worker.expect(b)  # the process started meanwhile prepares the next check (same size)
        p = dataclasses.replace(worker.probe_fresh(b, probe_timeout), phase=SAFE_PHASE)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return Trial(b, p.fits, p.peak_bytes)

    try:
        worker.prefetch(1, size=safe)
        made = run_confirmation(policy, seed, trial)
    except (ProbeFailedError, ModelLoadError, NothingFitsError) as exc:
        notes.append(f"safe_batch_size {safe} was not checked under {settings}: the worker "
                     f"failed ({str(exc)[:160]})")
        return SafeCheck(safe, k, False, settings)
    finally:
        worker.close()
    return _outcome(policy, seed, made, safe, k, settings, notes)


def _outcome(policy: ConfirmPolicy, seed: list[Trial], made: list[Trial], safe: int, k: int,
             settings: str, notes: list[str]) -> SafeCheck:
    """The safe size the checks leave, and a note saying what they saw."""
    failed = sorted({t.batch_size for t in made if not t.fits}, reverse=True)
    edge = band_of(made).reliable
    if policy.is_confirmed(seed, made):
        if failed:
            notes.append(f"safe_batch_size {safe} ran out of memory under {settings} (at "
                         f"{', '.join(map(str, failed))}); stepped down to {edge}, which fitted "
                         f"{k} of {k} fresh processes there")
        else:
            notes.append(f"safe_batch_size {safe} also fitted {k} of {k} fresh processes "
                         f"under {settings}")
        return SafeCheck(edge, k, True, settings)
    size = edge if edge > 0 else policy.granularity
    notes.append(f"safe_batch_size could not be confirmed under {settings}: it failed at "
                 f"{', '.join(map(str, failed))}; {size} is the largest size seen fitting "
                 f"there, without {k} confirmations")
    return SafeCheck(size, k, False, settings)
