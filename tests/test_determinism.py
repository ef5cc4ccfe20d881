"""Determinism (issue 5, item 6): the same seed gives the same plans and the same losses across runs
and across world sizes.

Three real runs of ``tests/scripts/train_steps.py`` (the balanced planner, 6 steps, so the run crosses
an epoch boundary of the 40-sample dataset): twice on 2 ranks under different ``PYTHONHASHSEED``
values (a plan or batch that depended on hash order or on anything but the seed would differ), and
once on 1 rank. Compared:

- same world size: the plan fingerprint and the dataset rows of every step, the logged losses, and
  the final weights, all bit for bit;
- 1 rank vs 2 ranks: the rows of every step (the global batch never depends on the world size) and
  the losses (to float rounding: the loss sum is reduced in another order).

Already proven elsewhere, not repeated: weights of 4 ranks equal 1 rank's
(``test_trainer.py::test_three_steps_on_4_ranks_equal_1_rank``); a resumed run sees the same rows and
plans as an uninterrupted one (``test_resume.py``); every rank computes the same plan for a step
(``test_data.py``, and the plan-hash check before every step).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_train_steps
from tests.models import save_tiny_model

STEPS = 6


def _run(nproc: int, model: str, out: str, hash_seed: str) -> dict:
    return run_train_steps(
        nproc,
        model,
        out,
        "--steps",
        str(STEPS),
        "--planner",
        "balanced",
        "--tokens_per_rank",
        {1: "64", 2: "32"}[nproc],
        env={"PYTHONHASHSEED": hash_seed},
    )


def _losses(log):
    return [e["loss"] for e in log["log_history"] if "loss" in e]


def _per_step(log, key):
    return [(s["epoch"], s["step"], s[key]) for s in sorted(log["steps"], key=lambda s: s["global_step"])]


def test_same_seed_same_plans_rows_and_losses_across_runs_and_world_sizes(tmp_path):
    model = save_tiny_model("llama", str(tmp_path / "model"))
    a = _run(2, model, str(tmp_path / "a"), hash_seed="1")
    b = _run(2, model, str(tmp_path / "b"), hash_seed="2")
    one = _run(1, model, str(tmp_path / "one"), hash_seed="3")

    assert len(a["steps"]) == STEPS and {s["epoch"] for s in a["steps"]} == {0, 1}  # crosses an epoch
    # same world size: identical plans, rows, losses and weights
    assert _per_step(a, "plan") == _per_step(b, "plan")
    assert _per_step(a, "rows") == _per_step(b, "rows")
    assert len(_losses(a)) == STEPS and _losses(a) == _losses(b)
    for k, w in a["weights"].items():
        assert torch.equal(b["weights"][k], w), f"{k} differs between two identical 2-rank runs"
    # the plans really placed samples over 2 ranks, and differ from the 1-rank plans
    assert max(int(k) for k in a["hdp"]["group_sizes"]) == 2
    assert [p for *_, p in _per_step(a, "plan")] != [p for *_, p in _per_step(one, "plan")]
    # any world size: the same rows per step and the same losses
    assert _per_step(one, "rows") == _per_step(a, "rows")
    assert _losses(one) == pytest.approx(_losses(a), rel=1e-6)
