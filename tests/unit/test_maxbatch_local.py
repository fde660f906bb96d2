"""The messages of a search in which nothing fitted (pure: probes as data, no backend)."""

from __future__ import annotations

from batchfit.results import Probe
from batchfit.verbs.maxbatch_local import _nothing_fits


def test_nothing_fits_says_which_failures_were_not_memory() -> None:
    # A search whose every probe failed says so; where workers timed out or crashed, "does not
    # fit" would blame the budget for what the budget did not do.
    oom = [Probe(batch_size=2, fits=False, outcome="oom"),
           Probe(batch_size=1, fits=False, outcome="oom")]
    text = str(_nothing_fits(oom, 1, 48 << 20, None, 8192))
    assert "even batch 1 does not fit in 48.0 MiB" in text and "memory's" not in text
    stalled = [Probe(batch_size=2, fits=False, outcome="oom"),
               Probe(batch_size=1, fits=False, outcome="timeout", detail="ran past 60 s"),
               Probe(batch_size=1, fits=False, outcome="crashed", detail="exit -9")]
    text = str(_nothing_fits(stalled, 1, 48 << 20, None, 8192))
    assert "no probe down to batch 1 succeeded" in text
    assert "1 timed out (first at batch 1: ran past 60 s)" in text
    assert "1 crashed (the worker process died) (first at batch 1: exit -9)" in text
