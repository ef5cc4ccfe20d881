"""No hangs: a missing ring partner times out with a useful error; disagreeing plans stop before P2P."""

from __future__ import annotations

import time

import torch

from hf_hdp.planning import plan_naive
from tests.dist_utils import run_distributed


def _absent_partner_worker(rank, world_size, plan_json, timeout_s):
    from hf_hdp.attention.interface import hdp_attention_forward
    from hf_hdp.collators import HDPCollator
    from hf_hdp.mesh import DynamicMesh, P2PTimeoutError
    from hf_hdp.planning import StepPlan

    plan = StepPlan.from_json(plan_json)
    if rank == 1:  # never reaches the ring
        time.sleep(timeout_s + 4)
        return None
    mesh = DynamicMesh(p2p_timeout_s=timeout_s)
    (mb,) = plan.for_rank(0)
    packed = HDPCollator()(mb, {0: {"input_ids": list(range(plan.lengths[0]))}}, rows={0: 1234}, step=7)
    meta = packed["hdp_metadata"]
    meta.mesh, meta.backend = mesh, "reference"
    t = packed["input_ids"].shape[1]
    q = torch.randn(1, 2, t, 8)
    module = torch.nn.Module()
    module.is_causal, module.layer_idx = True, 0
    started = time.monotonic()
    try:
        hdp_attention_forward(module, q, q, q, None, hdp_metadata=meta)
    except P2PTimeoutError as err:
        return time.monotonic() - started, str(err)
    return None


def test_missing_ring_partner_raises_within_the_timeout_naming_rank_peer_slot_and_sample():
    plan = plan_naive([30], 2, 16)  # one sample on ranks 0 and 1
    elapsed, message = run_distributed(_absent_partner_worker, 2, plan.to_json(), 2.0, timeout=60)[0]
    assert elapsed < 10, elapsed
    assert "rank 0" in message and "rank 1" in message
    assert "slot 0" in message and "samples [1234]" in message and "training step 7" in message


def _mismatch_worker(rank, world_size):
    from hf_hdp.mesh import DynamicMesh, PlanMismatchError

    lengths = [30, 5, 7] if rank != 2 else [30, 5, 8]  # rank 2 read a different dataset
    plan = plan_naive(lengths, world_size, 16)
    try:
        DynamicMesh().check_plan(plan.fingerprint(), step=3)
    except PlanMismatchError as err:
        return str(err)
    return None


def test_ranks_with_different_plans_are_stopped_before_any_p2p():
    messages = run_distributed(_mismatch_worker, 3, timeout=60)
    for m in messages:
        assert m is not None and "step 3" in m and "ranks [2]" in m and "ranks [0, 1]" in m
