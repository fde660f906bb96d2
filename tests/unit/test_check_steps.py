"""The order and prerequisites of ``batchfit check``'s layer checks, without a framework.

The runner (:func:`batchfit.verbs.check.run_steps`) is exercised on fake steps: each check
gets the values of the checks it needs, a check whose prerequisite rules it out is reported as
skipped with the reason, and a framework-specific check the backend does not run is reported as
not applicable.
"""

from __future__ import annotations

from batchfit.results import CHECKS, Finding
from batchfit.verbs.check import STEPS, DynamicBatch, Outcome, Step, run_steps


def _finding(check: str, severity: str) -> Finding:
    return Finding("layer", check, severity, f"{check} {severity}")


def test_the_listed_order_puts_eager_calls_first_and_every_check_once() -> None:
    names = [s.name for s in STEPS]
    assert names[0] == "eager"
    assert sorted(n for n in names if n in CHECKS) == sorted(CHECKS)
    for i, step in enumerate(STEPS):   # every prerequisite runs before the step that needs it
        assert all(n in names[:i] for n in step.needs), step.name


def test_each_step_gets_the_values_of_its_prerequisites_in_order() -> None:
    seen = []
    steps = (
        Step("batch_limit", lambda ctx: Outcome(32, details={"batch_limit": "32"})),
        Step("static_shape", lambda ctx: Outcome(["x.shape[0]"])),
        Step("dynamic_batch", lambda ctx, limit, uses: seen.append((limit, uses)) or Outcome(
            DynamicBatch(True, True)), ("batch_limit", "static_shape")),
    )
    record = run_steps(object(), steps)
    assert seen == [(32, ["x.shape[0]"])]
    assert record.details == {"batch_limit": "32"}


def test_a_step_ruled_out_by_a_prerequisite_is_skipped_and_so_are_its_dependents() -> None:
    ran = []

    def builds(dynamic: DynamicBatch) -> str | None:
        return None if dynamic.builds else "no None-batch build"

    def present(value: object) -> str | None:
        return None if value is not None else "no None-batch build"

    steps = (
        Step("dynamic_batch", lambda ctx: Outcome(DynamicBatch(False, True),
                                                  [_finding("dynamic_batch", "error")])),
        Step("traced", lambda ctx, d: ran.append("traced") or Outcome(2), ("dynamic_batch",),
             builds),
        Step("partial_batch", lambda ctx, t: ran.append("partial") or Outcome(1), ("traced",),
             present),
        Step("sample_mixing", lambda ctx: Outcome(findings=[_finding("sample_mixing", "info")])),
    )
    record = run_steps(object(), steps)
    assert ran == []
    assert record.statuses == {"dynamic_batch": "error",
                               "partial_batch": "skipped: no None-batch build",
                               "sample_mixing": "info"}
    assert [f.check for f in record.findings] == ["dynamic_batch", "sample_mixing"]


def test_a_check_may_skip_itself_and_the_worst_finding_sets_its_status() -> None:
    steps = (
        Step("sample_mixing", lambda ctx: Outcome(skipped="one example at a time")),
        Step("retracing", lambda ctx: Outcome(findings=[_finding("retracing", "info"),
                                                        _finding("retracing", "warning"),
                                                        _finding("retracing", "info")])),
    )
    record = run_steps(object(), steps, applicable=("retracing",))
    assert record.statuses == {"sample_mixing": "skipped: one example at a time",
                               "retracing": "warning"}


def test_framework_checks_the_backend_does_not_run_are_not_applicable() -> None:
    ran = []
    steps = (Step("export", lambda ctx: ran.append("export") or Outcome()),
             Step("retracing", lambda ctx: ran.append("retracing") or Outcome()),
             Step("batch_limit", lambda ctx: ran.append("batch_limit") or Outcome()))
    record = run_steps(object(), steps, applicable=(), backend_name="jax")
    assert ran == ["batch_limit"]
    assert record.statuses == {"export": "skipped: not applicable on the jax backend",
                               "retracing": "skipped: not applicable on the jax backend"}
