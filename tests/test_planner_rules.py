"""Rules kept in one place: the sharding a run resolves, the split names, and the planner's picture (legend, idle time)."""

from __future__ import annotations

import pytest

from hf_hdp.planning import Piece, build_plan, lockstep
from hf_hdp.planning.cost import CostModel, ModelSpec, memory_breakdown, tokens_per_rank_for_memory
from hf_hdp.planning.metrics import plan_metrics, plan_timeline
from hf_hdp.planning.report import KIND_COLORS, legend_entries
from hf_hdp.planning.sharding import FSDP_MODES, resolve_sharding
from hf_hdp.planning.splits import HEAD_PARALLEL, SPLIT_KINDS, SPLITS, split_kind

SPEC = ModelSpec(
    "tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128, vocab_size=100
)


# ------------------------------------------------------------------ sharding


def test_resolve_sharding_defaults_one_rank_and_fsdp():
    assert [resolve_sharding(None, None, w) for w in (1, 2, 8)] == [(0, None), (1, None), (1, None)]
    assert resolve_sharding(2, None, 4) == (2, None) and resolve_sharding(2, None, 1) == (0, None)
    assert resolve_sharding(0, None, 4) == (0, None)
    for mode in FSDP_MODES:
        assert resolve_sharding(None, mode, 4) == (0, mode) and resolve_sharding(None, mode, 1) == (0, mode)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_zero_stage_beside_fsdp_is_refused_naming_both_and_the_fix(zero_stage):
    with pytest.raises(ValueError) as err:
        resolve_sharding(
            zero_stage, "full_shard", 4, zero_name="HDPConfig.zero_stage", fsdp_name="TrainingArguments.fsdp"
        )
    text = str(err.value)
    assert f"HDPConfig.zero_stage={zero_stage} and TrainingArguments.fsdp='full_shard' are both set" in text
    assert "drop HDPConfig.zero_stage (leave it unset)" in text and "drop TrainingArguments.fsdp" in text
    with pytest.raises(ValueError, match="--zero-stage 1 and --fsdp shard_grad_op are both set"):
        resolve_sharding(1, "shard_grad_op", 4, zero_name="--zero-stage", fsdp_name="--fsdp")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(zero_stage=3), "zero_stage must be 0, 1 or 2"),
        (dict(zero_stage=True), "zero_stage must be 0, 1 or 2"),
        (dict(fsdp="zero3"), "fsdp must be None"),
        (dict(world_size=0), "world_size must be a positive integer"),
    ],
)
def test_resolve_sharding_refuses_values_out_of_range(kw, match):
    args = {"zero_stage": None, "fsdp": None, "world_size": 4, **kw}
    with pytest.raises(ValueError, match=match):
        resolve_sharding(args["zero_stage"], args["fsdp"], args["world_size"])


def test_the_memory_estimate_resolves_as_the_rule_does():
    kw = dict(weight_bytes=4, grad_bytes=4, optimizer_bytes=8)
    # zero_stage None: ZeRO-1 on several ranks; the same C as the resolved stage given explicitly
    for world in (1, 4):
        stage, _ = resolve_sharding(None, None, world)
        assert tokens_per_rank_for_memory(SPEC, 1e8, world_size=world, **kw) == tokens_per_rank_for_memory(
            SPEC, 1e8, world_size=world, zero_stage=stage, **kw
        )
    # a stage on one rank shards nothing
    assert memory_breakdown(SPEC, 10, world_size=1, zero_stage=2) == memory_breakdown(SPEC, 10, world_size=1)
    with pytest.raises(ValueError, match="are both set"):
        tokens_per_rank_for_memory(SPEC, 1e8, world_size=4, zero_stage=1, fsdp="full_shard")
    with pytest.raises(ValueError, match="are both set"):
        memory_breakdown(SPEC, 10, world_size=4, zero_stage=2, fsdp="shard_grad_op")


# ------------------------------------------------------------------ split names


def test_split_names_are_one_set():
    assert set(HEAD_PARALLEL) < set(SPLITS) and set(SPLITS) - {"auto"} < set(SPLIT_KINDS)
    shapes = {(1, 1): "local", (4, 1): "ring", (4, 4): "ulysses", (4, 2): "hybrid", (8, 2): "hybrid"}
    for (k, u), kind in shapes.items():
        assert split_kind(k, u) == kind
        assert Piece(0, 10, tuple(range(k)), u).split == kind
    assert {split_kind(k, u) for k, u in shapes} == set(SPLIT_KINDS)


# ------------------------------------------------------------------ the picture

COST = CostModel(
    1e-6,
    1e-4,
    1e-3,
    num_layers=2,
    kv_bytes_per_token=64,
    intra_bandwidth=1e6,
    intra_latency=1e-4,
    inter_bandwidth=1e6,
    inter_latency=1e-4,
    ranks_per_node=8,
    num_heads=8,
    num_kv_heads=8,
    grad_bytes=1e5,
)


def _mixed_plan():
    """Slot 0: a ring piece on ranks 0-1, a Ulysses piece on 2-3, a hybrid (u=2, r=2) piece on 4-7; slot 1: a
    whole sequence on rank 0."""
    lengths = [400, 600, 800, 50]
    ring, uly, hyb = Piece(0, 400, (0, 1)), Piece(1, 600, (2, 3), 2), Piece(2, 800, (4, 5, 6, 7), 2)
    placements = [(r, 0, [p]) for p in (ring, uly, hyb) for r in p.group] + [(0, 1, [Piece(3, 50, (0,))])]
    return build_plan(lengths, 8, 1000, placements, planner="hand").validate(num_heads=8)


def test_each_piece_kind_has_its_own_legend_entry():
    plan = _mixed_plan()
    timeline = plan_timeline(plan, COST)
    assert {iv.split for iv in timeline if iv.kind in ("distributed", "p2p")} == {"ring", "ulysses", "hybrid"}
    by_rank = {iv.rank: iv.split for iv in timeline if iv.kind == "distributed"}
    assert [by_rank[r] for r in range(8)] == ["ring"] * 2 + ["ulysses"] * 2 + ["hybrid"] * 4
    labels = [label for _, label in legend_entries(timeline)]
    assert labels == [
        "whole sequences (no communication)",
        "ring piece: compute",
        "ring piece: exposed P2P",
        "Ulysses piece: compute",
        "Ulysses piece: exposed all-to-alls",
        "hybrid piece: compute",
        "hybrid piece: exposed all-to-alls and ring",
        "gradient all-reduce (communication)",
    ]
    assert len({color for color, _ in legend_entries(timeline)}) == len(labels)
    # only the kinds present: a ring-only plan names no Ulysses or hybrid piece
    ring_only = build_plan([400], 2, 1000, [(r, 0, [Piece(0, 400, (0, 1))]) for r in (0, 1)], planner="hand")
    labels = [label for _, label in legend_entries(plan_timeline(ring_only, COST))]
    assert not any("Ulysses" in label or "hybrid" in label for label in labels)
    assert KIND_COLORS["distributed"][1] in labels


def test_a_micro_batch_of_several_split_kinds_is_drawn_as_mixed():
    pieces = [Piece(0, 400, (0, 1)), Piece(1, 600, (0, 1), 2)]
    plan = build_plan([400, 600], 2, 1000, [(r, 0, pieces) for r in (0, 1)], planner="hand").validate(num_heads=8)
    timeline = plan_timeline(plan, COST)
    assert {iv.split for iv in timeline if iv.kind == "distributed"} == {"mixed"}
    assert any("several split kinds" in label for _, label in legend_entries(timeline))


@pytest.mark.parametrize("locked", [False, True])
def test_idle_is_the_waiting_not_the_all_reduce(locked):
    plan = _mixed_plan()
    plan = lockstep(plan) if locked else plan
    m = plan_metrics(plan, COST)
    ar = COST.allreduce_time(None, 8)
    # the all-reduce once at the end, or lockstep's 1.5 all-reduces per slot: communication, never idle
    assert m.collective_s == pytest.approx(1.5 * ar * plan.num_slots if locked else ar)
    timeline = plan_timeline(plan, COST)
    waits = sum(iv.duration for iv in timeline if iv.kind == "wait")
    reduces = sum(iv.duration for iv in timeline if iv.kind == "allreduce")
    assert reduces == pytest.approx(8 * m.collective_s)
    assert m.idle_fraction == pytest.approx(waits / (8 * m.step_time_s))
    assert m.idle_fraction == pytest.approx(1 - (sum(m.busy_s) + 8 * m.collective_s) / (8 * m.step_time_s))
