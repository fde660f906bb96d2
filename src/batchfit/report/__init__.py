"""Rendering of results: terminal tables and progress lines. Imports results, never TensorFlow."""

from .terminal import ProbeLog, render, render_max

__all__ = ["ProbeLog", "render", "render_max"]
