"""Exact and elastic resume, and a rank killed mid-run under torchrun --max-restarts=1.

Each run trains the same tiny saved Llama on the same 40 samples with a fixed global batch of 8
(5 steps an epoch, so 6 steps cross an epoch boundary) with AdamW, as real processes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_utils import run_train_steps
from tests.models import save_tiny_model

STEPS = 6


def _launch(nproc, model, out, *extra, restarts=0):
    return run_train_steps(
        nproc,
        model,
        out,
        "--optim",
        "adamw_torch",
        "--steps",
        str(STEPS),
        "--tokens_per_rank",
        str({1: 64, 2: 32}.get(nproc, 24)),
        *extra,
        restarts=restarts,
    )


def _rows(log):
    return {s["global_step"]: s["rows"] for s in log["steps"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    model = save_tiny_model("llama", str(base / "model"))
    # the uninterrupted run, which also leaves the checkpoint at step 3 that the resumed runs start from
    # (saving changes no weight; one launch instead of two)
    part = str(base / "full")
    full = _launch(4, model, part, "--save_steps", "3")
    return {"base": base, "model": model, "full": full, "part": part}


def test_exact_resume_is_bit_equal_and_sees_the_same_samples_and_plans(runs):
    ckpt = os.path.join(runs["part"], "trainer", "checkpoint-3")
    assert os.path.exists(os.path.join(ckpt, "hdp_state.json"))
    resumed = _launch(4, runs["model"], runs["part"], "--resume", ckpt)
    full = runs["full"]
    assert sorted(_rows(resumed)) == [4, 5, 6]
    for step in (4, 5, 6):
        assert _rows(resumed)[step] == _rows(full)[step]
    assert [s["plan"] for s in resumed["steps"]] == [s["plan"] for s in full["steps"] if s["global_step"] > 3]
    for k, w in full["weights"].items():
        assert torch.equal(resumed["weights"][k], w), f"{k} differs after exact resume"


@pytest.mark.parametrize("before,after", [(4, 3), (2, 4)])
def test_elastic_resume_skips_and_repeats_nothing(runs, before, after):
    part = runs["part"] if before == 4 else str(runs["base"] / f"part{before}")
    if before != 4:
        _launch(before, runs["model"], part, "--save_steps", "3", "--stop_at_step", "3")
    ckpt = os.path.join(part, "trainer", "checkpoint-3")
    out = str(runs["base"] / f"elastic{before}to{after}")
    os.makedirs(out, exist_ok=True)
    resumed = _launch(after, runs["model"], out, "--resume", ckpt)
    full = runs["full"]
    assert resumed["world_size"] == after
    seen = [r for step in sorted(_rows(resumed)) for r in _rows(resumed)[step]]
    assert seen == [r for step in (4, 5, 6) for r in _rows(full)[step]]
    for k, w in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][k], w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_a_killed_rank_restarts_from_the_last_checkpoint_and_finishes_identically(runs):
    out = str(runs["base"] / "killed")
    log = _launch(
        4,
        runs["model"],
        out,
        "--save_steps",
        "2",
        "--resume",
        "last",
        "--kill_rank",
        "2",
        "--kill_at_step",
        "4",
        restarts=1,
    )
    with open(os.path.join(out, "killed.json")) as f:
        killed = json.load(f)
    resumed_from = int(log["resumed_from"].rsplit("-", 1)[1])
    redone = killed["step"] - 1 - resumed_from  # steps completed before the kill that ran again
    restart_s = log["started"] - killed["time"]
    print(
        f"\nfault injection: rank 2 SIGKILLed as step {killed['step']} began; restarted from checkpoint "
        f"{resumed_from}; steps redone: {redone}; restart took {restart_s:.1f} s"
    )
    assert resumed_from == 2 and redone == 1
    assert sorted(_rows(log)) == [3, 4, 5, 6]
    for k, w in runs["full"]["weights"].items():
        assert torch.equal(log["weights"][k], w), f"{k} differs after the restart"
