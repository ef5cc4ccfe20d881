"""benchmarks/peer_planners.py: Megatron-core's hybrid-CP schedule converted into our StepPlan.

The conversion is tested on hand-written schedules of the shape ``BalancedCPScheduler.get_groups_and_subsamples``
returns (rounds x ranks x sample ids, in run order), so megatron-core is not needed; the last test runs
the real scheduler where megatron-core is installed (it is no dependency of hf_hdp).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from hf_hdp.planning import CostModel, PlanError, plan_metrics

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "peer_planners.py")
_spec = importlib.util.spec_from_file_location("peer_planners", _PATH)
pp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pp)

W, C = 4, 8
# sample: 0 -> 20 tokens (Megatron: 2**ceil(log2(2.5)) = 4 ranks), 1 -> 10 (2 ranks), 2..4 short
LENGTHS = [20, 10, 3, 4, 5]
SCHEDULE = [
    [[0], [0], [0], [0]],  # round 0: sample 0 on all four ranks
    [[1], [1], [2, 3], [4]],  # round 1: sample 1 on ranks 0-1, samples 2 and 3 one after the other on rank 2
]


def _by(plan):
    return {(mb.slot, mb.rank): mb for mb in plan.micro_batches}


def test_rounds_become_barrier_slots():
    plan = pp.megatron_to_plan(LENGTHS, W, C, SCHEDULE)
    assert plan.meta["slot_barrier"] is True and plan.meta["rounds"] == 2
    assert plan.num_slots == 2 and plan.tokens_per_rank == C and plan.meta["over_capacity_micro_batches"] == 0
    mbs = _by(plan)
    assert {r for (s, r) in mbs if s == 0} == {0, 1, 2, 3}
    assert all(mbs[0, r].pieces[0].group == (0, 1, 2, 3) for r in range(W))
    assert mbs[1, 0].pieces == mbs[1, 1].pieces and mbs[1, 0].pieces[0].group == (0, 1)
    assert [(p.sample, p.group) for p in mbs[1, 2].pieces] == [(2, (2,)), (3, (2,))]  # packed into one micro-batch
    assert mbs[1, 3].pieces[0].k == 1
    assert sum(mb.num_tokens for mb in plan.micro_batches) == sum(LENGTHS)
    assert plan.group_sizes() == {1: 3, 2: 1, 4: 1}
    plan.validate()


def test_sequential_form_keeps_capacity_and_round_barriers():
    plan = pp.megatron_to_plan(LENGTHS, W, C, SCHEDULE, sequential=True)
    assert "slot_barrier" not in plan.meta and plan.meta["round_slots"] == [[0, 1], [1, 3]]
    mbs = _by(plan)
    assert [p.sample for p in mbs[1, 2].pieces] == [2] and [p.sample for p in mbs[2, 2].pieces] == [3]
    assert all(len(mb.pieces) == 1 for mb in plan.micro_batches)
    cost = CostModel.default()
    barrier = pp.round_barrier_metrics(plan, cost)
    free = plan_metrics(pp.without_barriers(plan), cost)
    assert barrier.step_time_s >= free.step_time_s > 0
    assert barrier.busy_s == free.busy_s
    # one round: the barrier at its end changes nothing
    one = pp.megatron_to_plan(LENGTHS[:1], W, C, SCHEDULE[:1], sequential=True)
    assert pp.round_barrier_metrics(one, cost).step_time_s == pytest.approx(plan_metrics(one, cost).step_time_s)


def test_over_capacity_round_is_kept_and_reported():
    lengths = [6, 5, 4, 4, 4]  # one round: rank 0 runs 10 tokens, rank 1 13, one sample at a time
    plan = pp.megatron_to_plan(lengths, 2, 8, [[[0, 2], [1, 3, 4]]])
    assert plan.tokens_per_rank == plan.meta["max_tokens_on_rank"] == 13
    assert plan.meta["requested_tokens_per_rank"] == 8 and plan.meta["over_capacity_micro_batches"] == 2
    assert sum(mb.num_tokens for mb in plan.micro_batches) == sum(lengths)
    seq = pp.megatron_to_plan(lengths, 2, 8, [[[0, 2], [1, 3, 4]]], sequential=True)
    assert seq.tokens_per_rank == 8 and seq.num_slots == 3


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([[[0], [0], [0], [0]], [[0, 1], [1], [2, 3], [4]]], "rounds"),
        ([[[0], [0], [0], [0]], [[1], [1], [2], [4]]], "leaves 1 samples out"),
        ([[[0], [0], [0], [0]], [[7], [1], [2, 3], [4]]], "outside"),
    ],
)
def test_broken_schedules_are_refused(schedule, message):
    with pytest.raises(PlanError, match=message):
        pp.megatron_to_plan(LENGTHS, W, C, schedule)


def test_sequential_needs_one_order_per_group():
    with pytest.raises(PlanError, match="sub-sample"):
        pp.megatron_to_plan([3, 4], 2, 8, [[[0, 1], [1, 0]]], sequential=True)


def test_power_of_two_waste_and_minimal_groups():
    plan = pp.megatron_to_plan(LENGTHS, W, C, SCHEDULE)
    cost = CostModel.default()
    waste = pp.pow2_waste(plan, C, cost)
    assert waste["wider_samples"] == 1 and waste["extra_ranks"] == 1  # sample 0: 4 ranks, ceil(20/8) = 3
    assert waste["extra_rank_s"] == pytest.approx(waste["rank_s_wide"] - waste["rank_s_minimal"])
    cut = pp.minimal_groups(plan, C)
    assert {p.sample: p.group for p in cut.pieces()}[0] == (0, 1, 2)
    assert cut.meta["slot_barrier"] is True and cut.num_slots == 2
    assert pp.misaligned_groups(plan) == 0 and pp.misaligned_groups(cut) == 0
    assert pp.megatron_groups_needed(20, 8) == 4 and pp.megatron_groups_needed(3, 8) == 1


def test_barriers_never_shorten_a_step():
    plan = pp.megatron_to_plan(LENGTHS, W, C, SCHEDULE)
    cost = CostModel.default()
    assert plan_metrics(plan, cost).step_time_s >= plan_metrics(pp.without_barriers(plan), cost).step_time_s


def test_real_scheduler_converts():
    pytest.importorskip("megatron.core")
    scheduler, _ = pp.load_megatron()
    lengths = [30000, 9000, 8000, 5000, 3000, 2500, 2000, 1500, 1200, 900, 800, 700, 600, 500, 400, 300]
    rounds, _ = pp.megatron_schedule(scheduler, lengths, 8, 8192)
    for sequential in (False, True):
        plan = pp.megatron_to_plan(lengths, 8, 8192, rounds, sequential=sequential)
        assert sum(mb.num_tokens for mb in plan.micro_batches) == sum(lengths)
        assert max(p.k for p in plan.pieces()) == 4  # 30000 / 8192 = 3.7 -> 4 ranks
