"""``distribute=`` on JAX: Keras's ``keras.distribution.DataParallel`` over this host's devices.

A data-parallel distribution replicates the model on every device of a one-axis mesh and
splits each global batch among them, as TensorFlow's ``MirroredStrategy`` does: ``max``
probes one replica on one device (in a worker process, where no distribution is set) and
reports the global batch as per-replica x replicas. ``distribute="data_parallel"`` (or
``"mirrored"``, TensorFlow's word) builds one over ``jax.devices()``; a model built while a
distribution was set (``keras.distribution.set_distribution``) is found by ``None``. Several
CPU devices for tests: ``XLA_FLAGS=--xla_force_host_platform_device_count=2``.

Example:

>>> resolve_distribution(None) is None
True
"""

from __future__ import annotations

from typing import Any

from ...errors import InvalidInputError

NAMES = ("data_parallel", "mirrored")


def resolve_distribution(distribute: Any, model: Any = None) -> Any:
    """The ``DataParallel`` for ``distribute`` (``None``: the one set globally, if any)."""
    import keras

    if distribute is None:
        current = keras.distribution.distribution()
        return current if model is not None or current is not None else None
    if isinstance(distribute, str):
        if distribute.strip().lower() not in NAMES:
            raise InvalidInputError(
                f"distribute={distribute!r}: on JAX batchfit takes 'data_parallel' (or "
                f"'mirrored'), a keras.distribution.DataParallel, or None")
        import jax

        return keras.distribution.DataParallel(devices=jax.devices())
    if isinstance(distribute, keras.distribution.DataParallel):
        return distribute
    raise InvalidInputError(
        f"distribute= on JAX must be a keras.distribution.DataParallel, 'data_parallel' or "
        f"None; got {type(distribute).__name__} (ModelParallel is not supported)")


def num_replicas(distribution: Any) -> int:
    """Devices the batch is split among (1 for ``None``)."""
    if distribution is None:
        return 1
    return int(distribution.device_mesh.devices.size)


def smallest_device_memory(distribution: Any) -> tuple[int | None, str]:
    """``(bytes, note)``: the smallest device's memory limit, where JAX reports one."""
    limits = []
    for device in (distribution.device_mesh.devices.flatten() if distribution is not None
                   else []):
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    if not limits:
        return None, ("the devices report no memory (JAX on CPU): pass memory= for the "
                      "per-replica budget")
    return min(limits), f"the smallest of {len(limits)} device(s)"
