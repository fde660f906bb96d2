"""The ``tf.distribute`` glue: which strategy, how many replicas, on which devices, how much memory.

Every entry point takes ``distribute=``: a ``tf.distribute.Strategy`` object, ``"mirrored"``,
``"multiworker"``, or ``None``. With ``None`` the strategy a ``keras.Model`` was built under
(``with strategy.scope(): model = ...``) is detected; TensorFlow's default strategy (no
``scope()``) means none. The batch size a user passes under a strategy is *global*; each replica
runs ``global / replicas`` examples, and memory is per device, so batchfit searches the
largest *per-replica* batch on the smallest replica device and reports both.

Example:

>>> import tensorflow as tf
>>> from batchfit.backend.tensorflow.distribute import num_replicas, resolve_strategy
>>> resolve_strategy(None) is None          # no strategy given, no model to detect one from
True
>>> s = resolve_strategy("mirrored")        # doctest: +SKIP
>>> num_replicas(s)                         # doctest: +SKIP
2
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from ...errors import InvalidInputError, error_line
from .. import DEFAULT_COLLECTIVE_TIMEOUT
from .keras_compat import model_distribute_strategy

__all__ = [
    "DISTRIBUTE_CHOICES",
    "distribute_name",
    "is_mirrored",
    "is_multiworker",
    "merge_per_replica",
    "model_strategy",
    "num_replicas",
    "replica_devices",
    "resolve_strategy",
    "smallest_device_memory",
    "split_per_replica",
]

#: The strings ``distribute=`` / ``--distribute`` accept.
DISTRIBUTE_CHOICES = ("mirrored", "multiworker")
DEFAULT_TIMEOUT = DEFAULT_COLLECTIVE_TIMEOUT  # seconds a collective of one step may wait


def _is_default(strategy: Any) -> bool:
    return strategy is None or type(strategy).__name__ == "_DefaultDistributionStrategy"


def is_multiworker(strategy: Any) -> bool:
    """Whether ``strategy`` is a ``tf.distribute.MultiWorkerMirroredStrategy``."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_mirrored(strategy: Any) -> bool:
    """Whether ``strategy`` is a single-host ``tf.distribute.MirroredStrategy``."""
    return isinstance(strategy, tf.distribute.MirroredStrategy)


def model_strategy(model: Any) -> tf.distribute.Strategy | None:
    """The strategy ``model`` was built under (``strategy.scope()``), or ``None``.

    Read from Keras's own record (``model.distribute_strategy``), else from the model's
    variables (a distributed variable knows its strategy). TensorFlow's default strategy
    counts as none.
    """
    if model is None or isinstance(model, str):
        return None
    strategy = model_distribute_strategy(model)
    if _is_default(strategy):
        strategy = None
        for v in getattr(model, "variables", None) or []:
            inner = getattr(v, "value", v)
            if isinstance(inner, tf.distribute.DistributedValues):
                strategy = getattr(inner, "distribute_strategy", None)
                break
    return None if _is_default(strategy) else strategy


def make_strategy(timeout_seconds: float = DEFAULT_TIMEOUT) -> tf.distribute.Strategy:
    """A ``MultiWorkerMirroredStrategy`` (from ``TF_CONFIG``) whose collectives time out.

    A collective that waits longer than ``timeout_seconds`` raises ``DeadlineExceededError``
    (this includes the gradient all-reduce inside the optimizer), so a worker never waits
    forever for one that died. Create it at the start of the program, before other
    TensorFlow work, as TensorFlow requires for this strategy.

    Args:
        timeout_seconds: the longest one collective may wait, in seconds (default 300).

    Returns:
        The strategy.

    Example:

    >>> strategy = make_strategy(timeout_seconds=120)  # doctest: +SKIP
    >>> strategy.num_replicas_in_sync                  # doctest: +SKIP
    2
    """
    if not timeout_seconds > 0:
        raise InvalidInputError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
    from .collective import communication_options

    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=communication_options(timeout_seconds))


def _make(kind: str) -> tf.distribute.Strategy:
    try:
        if kind == "mirrored":
            return tf.distribute.MirroredStrategy()
        return make_strategy()  # collectives time out: a worker that died stops the others
    except (RuntimeError, ValueError) as exc:
        raise InvalidInputError(
            f"could not create a {kind} strategy ({type(exc).__name__}: "
            f"{error_line(exc, limit=None)}); create it yourself at the start "
            "of the program, build the model under strategy.scope(), and pass the model "
            "(or distribute=strategy)") from exc


def resolve_strategy(distribute: Any = None, model: Any = None) -> tf.distribute.Strategy | None:
    """The strategy to use: ``distribute`` as given, or the one ``model`` was built under.

    Args:
        distribute: a ``tf.distribute.Strategy``, ``"mirrored"``, ``"multiworker"`` or ``None``.
        model: a ``keras.Model`` object (its strategy is detected and must agree with
            ``distribute``), or anything else (a factory, a spec: nothing to detect).

    Returns:
        The strategy, or ``None`` for none (one device).

    Raises:
        InvalidInputError: an unknown value (the message names the valid choices), or a model
            built under a different strategy than the one asked for.

    Example:

    >>> resolve_strategy("ring")
    Traceback (most recent call last):
    ...
    batchfit.errors.InvalidInputError: unknown distribute='ring': choose 'mirrored', 'multiworker', a tf.distribute.Strategy object, or None
    """
    detected = model_strategy(model)
    if distribute is None:
        return detected
    if isinstance(distribute, str):
        kind = distribute.strip().lower()
        if kind not in DISTRIBUTE_CHOICES:
            raise InvalidInputError(
                f"unknown distribute={distribute!r}: choose "
                f"{', '.join(repr(c) for c in DISTRIBUTE_CHOICES)}, a tf.distribute.Strategy "
                "object, or None")
        if detected is not None:
            if distribute_name(detected) != kind:
                raise InvalidInputError(
                    f"distribute={kind!r}, but the model was built under "
                    f"{type(detected).__name__}: pass the model built under the strategy you "
                    "want, or leave distribute=None to use the model's own")
            return detected
        return _make(kind)
    if isinstance(distribute, tf.distribute.Strategy):
        if _is_default(distribute):
            return None if detected is None else detected
        if detected is not None and detected is not distribute:
            raise InvalidInputError(
                f"the model was built under another strategy ({type(detected).__name__}) than "
                f"distribute= ({type(distribute).__name__}): build it under "
                "distribute.scope()")
        return distribute
    raise InvalidInputError(
        f"unknown distribute={distribute!r}: choose "
        f"{', '.join(repr(c) for c in DISTRIBUTE_CHOICES)}, a tf.distribute.Strategy object, "
        "or None")


def distribute_name(strategy: Any) -> str:
    """``"mirrored"``, ``"multiworker"``, the class name of another strategy, or ``""``."""
    if strategy is None or _is_default(strategy):
        return ""
    if is_multiworker(strategy):
        return "multiworker"
    if is_mirrored(strategy):
        return "mirrored"
    return type(strategy).__name__


def num_replicas(strategy: Any) -> int:
    """Replicas in sync (1 for none)."""
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def replica_devices(strategy: Any) -> list[str]:
    """The devices of this host's replicas, e.g. ``["/job:localhost/.../device:GPU:0", ...]``."""
    if strategy is None:
        return []
    return [str(d) for d in strategy.extended.worker_devices]


def _kind_index(device: str) -> tuple[str, int]:
    m = re.search(r"(CPU|GPU|TPU):(\d+)\s*$", device, flags=re.IGNORECASE)
    if not m:
        return "CPU", 0
    return m.group(1).upper(), int(m.group(2))


def probe_device(strategy: Any) -> str:
    """The single device a per-replica probe runs on: ``"GPU:0"`` or ``"CPU:0"``."""
    kinds = {_kind_index(d)[0] for d in replica_devices(strategy)}
    return "GPU:0" if "GPU" in kinds else "CPU:0"


def smallest_device_memory(strategy: Any) -> tuple[int | None, str]:
    """``(bytes, note)``: the memory of the smallest replica device on this host.

    GPUs: each one's total through NVML (``nvidia-ml-py``), the smallest; ``None`` when NVML
    is missing. CPU replicas share the host's memory: the available memory less a reserve,
    divided by the number of CPU replicas.
    """
    from ..memory import HOST_RESERVE_BYTES, gpu_total_bytes, host_available_bytes

    devices = [_kind_index(d) for d in replica_devices(strategy)]
    gpus = sorted({i for k, i in devices if k == "GPU"})
    if gpus:
        totals = [gpu_total_bytes(i)[0] for i in gpus]
        if any(t is None for t in totals):
            return None, ("GPU memory unknown (install nvidia-ml-py to read it): the search "
                          "runs until the device refuses")
        smallest = min(t for t in totals if t is not None)
        return smallest, f"per-replica budget: the smallest of {len(gpus)} GPUs"
    cpus = max(1, sum(1 for k, _ in devices if k == "CPU"))
    avail = host_available_bytes()
    if avail is None:
        raise InvalidInputError("cannot read this machine's available memory; pass memory= "
                                "(the memory of one replica's device, e.g. memory='8GiB')")
    budget = max(avail - HOST_RESERVE_BYTES, avail // 2) // cpus
    return budget, (f"CPU replicas share the host's memory: per-replica budget is the available "
                    f"memory less a reserve, divided by {cpus}")


def split_per_replica(strategy: Any, data: Any) -> list[Any]:
    """One structure per replica from a batch of per-replica values (Keras's distributed batch).

    Leaves that are not distributed are given whole to every replica.
    """
    n = num_replicas(strategy)
    if n == 1:
        return [data]

    def local(t: Any) -> tuple[Any, ...]:
        if isinstance(t, tf.distribute.DistributedValues):
            return tuple(strategy.experimental_local_results(t))
        return (t,) * n

    flat = [local(t) for t in tf.nest.flatten(data, expand_composites=False)]
    return [tf.nest.pack_sequence_as(data, [leaf[r] for leaf in flat]) for r in range(n)]


def merge_per_replica(strategy: Any, pieces: Sequence[Any]) -> Any:
    """The distributed batch whose replica ``r`` gets ``pieces[r]`` (inverse of the split)."""
    if num_replicas(strategy) == 1:
        return pieces[0]
    flat = [tf.nest.flatten(p) for p in pieces]

    def leaf(i: int) -> Any:
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: flat[ctx.replica_id_in_sync_group][i])

    return tf.nest.pack_sequence_as(pieces[0], [leaf(i) for i in range(len(flat[0]))])
