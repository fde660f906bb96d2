"""batchfit.fit under a real out-of-memory error: a capped CPU allocator, in a child process.

A child process (tests/fit_child.py) runs under a capped CPU allocator
(``TF_CPU_BFC_MEM_LIMIT_IN_MB``, oneDNN off; see shared/NOTES-tf-memory.md) with a model whose
memory is quadratic in the sequence length, so long sequences overflow the cap at batch 64 and
fit at 32. Each real OOM costs ~10 s (the allocator retries), so one child runs every capped
scenario once (4 OOMs) and the tests read its JSON. The references they compare with are plain
Keras runs, made here without a cap.
"""

from __future__ import annotations

from pathlib import Path

import fit_child
import numpy as np
import pytest
from child_support import ChildRuns

CHILD = Path(__file__).resolve().parents[1] / "fit_child.py"
CAP_MB = 34   # batch 64 of 256-long sequences needs > 34 MiB; 32 fits; 64 of 16-long fits

_CHILDREN = ChildRuns(CHILD, {"capped": (["first_batch", "mid_epoch", "batch_one"], CAP_MB)},
                      timeout=400)


@pytest.fixture(scope="module", autouse=True)
def _child_early(request):
    """Start the child at the module's first test when any selected test needs it."""
    yield from _CHILDREN.early(request)


@pytest.fixture(scope="module")
def capped() -> dict:
    return _CHILDREN.result("capped")


# --- real out-of-memory errors ---------------------------------------------------------------
def test_oom_at_first_batch_size_finishes_and_matches_accumulation_reference(capped) -> None:
    r = capped["first_batch"]
    assert r["epochs"] == 2                          # one History entry per epoch
    (adj,) = r["adjustments"]
    assert (adj["phase"], adj["epoch"], adj["step"], adj["reason"]) == ("train", 0, 0, "oom")
    assert (adj["from_micro_batch"], adj["to_micro_batch"], adj["accumulation_steps"]) == (64, 32, 2)
    assert "OOM when allocating" in adj["detail"] and adj["seconds"] > 0
    # the reference: Keras at batch 32 with gradient_accumulation_steps=2, same initial weights
    assert r["max_diff"] <= 1e-6
    # effective batch kept: 128 examples / 64 per update * 2 epochs
    assert r["iterations"] == 4
    assert r["accumulation_after"] is None           # the user's optimizer is given back as it was
    assert r["seen"] == 2 * 128                      # every example trained on once per epoch


def test_oom_mid_epoch_loses_no_step_and_repeats_none(capped) -> None:
    r = capped["mid_epoch"]
    lengths = [16, 16, 16, 256, 256, 16]
    train = [a for a in r["adjustments"] if a["phase"] == "train"]
    assert len(train) == 1 and (train[0]["epoch"], train[0]["step"]) == (0, 3)
    assert train[0]["optimizer_step"] == 3           # three updates done before the failed one
    # the counter layer's variable: the failed step's increment was undone, the replay counted
    assert r["seen"] == 2 * len(lengths) * 64
    assert r["iterations"] == 2 * len(lengths)
    assert r["callback_batches"] == list(range(len(lengths))) * 2   # callbacks: one run
    assert r["epochs"] == 2
    # plain Keras, no cap, batch 64 throughout, same initial weights: the same run
    ref = fit_child.make_model()
    ref.set_weights([np.asarray(w, dtype="float32") for w in r["w0"]])
    hist = ref.fit(fit_child.mixed_dataset(64, lengths, 10), epochs=2, verbose=0, shuffle=False,
                   validation_data=fit_child.mixed_dataset(64, [320, 320], 100))
    for got, want in zip(r["weights"], ref.get_weights()):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r["loss"], hist.history["loss"], rtol=1e-5)
    capped["mid_epoch_val_ref"] = hist.history["val_loss"]


def test_oom_in_evaluation_shrinks_only_the_evaluation_batch(capped) -> None:
    r = capped["mid_epoch"]
    evals = [a for a in r["adjustments"] if a["phase"] == "eval"]
    assert len(evals) == 1 and evals[0]["epoch"] == 0
    assert (evals[0]["from_micro_batch"], evals[0]["to_micro_batch"]) == (64, 32)
    # training shrank once, for its own reason; evaluation did not shrink it further
    assert [a["to_micro_batch"] for a in r["adjustments"] if a["phase"] == "train"] == [32]
    if "mid_epoch_val_ref" not in capped:
        pytest.skip("needs test_oom_mid_epoch_loses_no_step_and_repeats_none's reference")
    np.testing.assert_allclose(r["val_loss"], capped["mid_epoch_val_ref"], rtol=1e-5)


def test_batch_of_one_that_does_not_fit_gets_the_clear_error(capped) -> None:
    r = capped["batch_one"]
    assert r["raised"] == "TrainingOutOfMemoryError" and r["is_nothing_fits"]
    assert "micro-batch of 1 example" in r["message"]
    assert "weights and optimizer state alone take" in r["message"]
    assert r["fixed_bytes"] > 0
