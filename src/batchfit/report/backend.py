"""One line saying which Keras backend measured a result, for the reports.

A result's ``environment`` records the backend (``"backend"``; TensorFlow results of earlier
versions name none and read as TensorFlow). Reports print the line only for a backend other
than TensorFlow, so TensorFlow's reports read as before; on JAX on a CPU the line also says
where the memory figures come from.

Example:

>>> backend_line({"backend": "jax", "memory_source": "compile-time"})
'measured with Keras on jax (memory: compile-time)'
>>> backend_line({"backend": "jax", "memory_source": "compile-time"}, memory=False)
'measured with Keras on jax'
>>> backend_line({"tensorflow": "2.21.0"}) is None
True
"""

from __future__ import annotations

from collections.abc import Mapping


def backend_line(environment: Mapping[str, str] | None, *, memory: bool = True) -> str | None:
    """``"measured with Keras on NAME ..."`` for a non-TensorFlow backend, else ``None``;
    ``memory=False`` leaves out where memory figures come from (a result without any)."""
    name = (environment or {}).get("backend", "tensorflow")
    if name == "tensorflow":
        return None
    source = (environment or {}).get("memory_source") if memory else None
    return f"measured with Keras on {name}" + (f" (memory: {source})" if source else "")
