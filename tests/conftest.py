"""Test-wide settings, applied before any test imports TensorFlow.

- Quiet TensorFlow's C++ logging.
- Use TensorFlow's BFC allocator on CPU (no cap), so in-process probes can read allocator
  statistics: on this machine the default CPU allocator keeps none
  (``get_memory_info('CPU:0')`` raises "Allocator stats not available").
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
