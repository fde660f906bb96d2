"""``distribute=`` on JAX: Keras's ``keras.distribution.DataParallel`` over this host's devices.

A data-parallel distribution replicates the model on every device of a one-axis mesh and
splits each global batch among them, as TensorFlow's ``MirroredStrategy`` does: ``max``
probes one replica on one device (in a worker process, where no distribution is set) and
reports the global batch as per-replica x replicas. ``distribute="data_parallel"`` (or
``"mirrored"``, TensorFlow's word) builds one over ``jax.devices()``; a model built while a
distribution was set (``keras.distribution.set_distribution``, or in its ``scope()``) is found
by ``None`` (its variables are replicated over the devices); a model object given with
``distribute=`` has its variables replicated so (:func:`replicate`). Several
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
        if current is None and model is not None:
            current = model_distribution(model)
        return current
    if isinstance(distribute, str):
        if distribute.strip().lower() not in NAMES:
            raise InvalidInputError(
                f"distribute={distribute!r}: on JAX batchfit takes 'data_parallel' (or "
                f"'mirrored'), a keras.distribution.DataParallel, or None")
        import jax

        distribution = keras.distribution.DataParallel(devices=jax.devices())
    elif isinstance(distribute, keras.distribution.DataParallel):
        distribution = distribute
    else:
        raise InvalidInputError(
            f"distribute= on JAX must be a keras.distribution.DataParallel, 'data_parallel' or "
            f"None; got {type(distribute).__name__} (ModelParallel is not supported)")
    if model is not None:
        replicate(model, distribution)
    return distribution


def model_distribution(model: Any) -> Any:
    """The ``DataParallel`` a model lives under: its variables replicated over several
    devices (built in ``distribution.scope()``, or replicated by :func:`replicate`); ``None``
    when they are on one device."""
    import keras

    for variable in getattr(model, "variables", []) or []:
        devices = _devices_of(variable)
        if len(devices) > 1:
            return keras.distribution.DataParallel(devices=devices)
    return None


def replicate(model: Any, distribution: Any) -> None:
    """Place a built model's variables (optimizer's too) replicated over ``distribution``'s
    devices, as building it in ``distribution.scope()`` would have: the model then carries
    its distribution (:func:`model_distribution`) to every verb."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec())
    opt = getattr(model, "optimizer", None)
    for variable in [*getattr(model, "variables", []), *(getattr(opt, "variables", []) or [])]:
        if len(_devices_of(variable)) != num_replicas(distribution):
            variable.assign(jax.device_put(variable.value, replicated))


def _devices_of(variable: Any) -> list[Any]:
    sharding = getattr(getattr(variable, "value", None), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and getattr(mesh, "devices", None) is not None:
        return list(mesh.devices.flatten())
    return sorted(getattr(sharding, "device_set", ()) or (), key=lambda d: d.id)


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


class Placement:
    """Where a step's state and batches live: one device, or a ``DataParallel``'s mesh (the
    state replicated, each batch sharded along its batch axis)."""

    def __init__(self, distribution: Any) -> None:
        self.replicas = 1
        self.data = self.replicated = None
        self.platform = ""
        if distribution is not None:
            self.platform = distribution.device_mesh.devices.flatten()[0].platform
            from jax.sharding import NamedSharding, PartitionSpec

            mesh = distribution.device_mesh.backend_mesh
            self.replicas = int(distribution.device_mesh.devices.size)
            self.data = NamedSharding(mesh, PartitionSpec(distribution.batch_dim_name))
            self.replicated = NamedSharding(mesh, PartitionSpec())

    def state(self, arrays: list[Any]) -> list[Any]:
        import jax

        if self.replicated is None:
            return arrays
        return [jax.device_put(a, self.replicated) for a in arrays]

    def batch(self, tree: Any, n: int) -> Any:
        """``tree`` sharded along its batch axis (replicated when the devices do not divide
        ``n``)."""
        import jax

        if self.data is None or tree is None:
            return tree
        sharding = self.data if n % self.replicas == 0 else self.replicated
        return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)
