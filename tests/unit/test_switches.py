"""The environment switches of the probe processes: on unless set to 0, unknown names refused."""

from __future__ import annotations

import pytest

from batchfit.errors import InvalidInputError
from batchfit.workers.switches import SWITCHES, switched_on


@pytest.mark.parametrize("name", SWITCHES)
def test_a_switch_is_on_unless_it_is_zero(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(name, raising=False)
    assert switched_on(name)
    monkeypatch.setenv(name, "0")
    assert not switched_on(name)
    monkeypatch.setenv(name, " 0 ")
    assert not switched_on(name)
    monkeypatch.setenv(name, "1")
    assert switched_on(name)


def test_an_unknown_switch_is_refused_with_the_known_ones() -> None:
    with pytest.raises(InvalidInputError, match="BATCHFIT_STALL_WATCH"):
        switched_on("BATCHFIT_STAL_WATCH")


def test_prepare_ahead_off_leaves_the_spares_unprepared(monkeypatch: pytest.MonkeyPatch) -> None:
    # expect() is the only way a size reaches a spare; with the switch off it keeps none (no
    # process is started here: the worker starts them on its first probe)
    from batchfit.workers.worker import ModelSource, ProbeWorker, WorkerConfig

    w = ProbeWorker(WorkerConfig(source=ModelSource.from_model("m.py:f"), budget_bytes=1 << 26),
                    fresh_each_probe=True)
    monkeypatch.delenv("BATCHFIT_PREPARE_AHEAD", raising=False)
    w.expect(96)
    assert w._expect == 96
    monkeypatch.setenv("BATCHFIT_PREPARE_AHEAD", "0")
    w.expect(96)
    assert w._expect is None
