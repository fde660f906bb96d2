"""profile_throughput under a real allocator cap, in a capped child process (moved from
tests/integration/test_throughput.py): a size that runs out of memory is reported, larger ones
skipped, the model left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from child_support import ChildRuns

HERE = Path(__file__).resolve().parents[1]  # tests/

# A capped child (tests/fit_child.py, 34 MiB: 64 sequences of 256 overflow it, 32 fit).
_CHILDREN = ChildRuns(HERE / "fit_child.py", {"capped_profile": (["profile_oom"], 34)},
                      timeout=300)


@pytest.fixture(scope="module", autouse=True)
def _child_early(request):
    yield from _CHILDREN.early(request)


@pytest.fixture(scope="module")
def capped_profile() -> dict:
    return _CHILDREN.result("capped_profile")["profile_oom"]


def test_a_size_that_runs_out_of_memory_is_reported_and_larger_ones_skipped(
        capped_profile) -> None:
    points = {p["batch_size"]: p for p in capped_profile["points"]}
    assert [points[b]["outcome"] for b in (8, 32, 64, 128)] == ["ok", "ok", "oom", "skipped"]
    assert points[64]["detail"].startswith("ResourceExhaustedError: OOM when allocating")
    assert "64 ran out of memory" in points[128]["detail"]
    assert points[32]["samples_per_second"] > 0 and points[64]["samples_per_second"] is None
    assert capped_profile["knee"] in (8, 32)  # chosen among the sizes that ran
    assert capped_profile["weights_unchanged"]
