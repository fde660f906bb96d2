"""The verbs: ``max``, ``tune``, ``fit``, ``check``, ``noise`` and their distributed forms.

Each module orchestrates one verb: it checks arguments (:mod:`batchfit.core.validate`), resolves
the model (:mod:`batchfit.backend`), asks :mod:`batchfit.core` for decisions and the Keras
backend for execution, and returns plain results (:mod:`batchfit.results`).
"""
