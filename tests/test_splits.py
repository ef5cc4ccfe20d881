"""Head-parallel and hybrid pieces in full HDP steps: the loss and every gradient equal one process's, and the
P2P bytes each rank sends equal the plan's estimate.

Four gloo processes run Llama and Qwen2 tiny models (4 query heads, 2 K/V heads) through the collator and
the ``"hdp"`` attention on plans of the balanced planner under ``attention_split`` = ``"ulysses"``,
``"hybrid"`` (two "nodes" of 2 ranks) and ``"auto"``, and on a hand-made plan of wider-than-minimal
groups of every split. The planner-side rules (degrees, refusals) are tested here too."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_hdp.planning import CostModel, Piece, PlanError, StepPlan, build_plan, plan_balanced
from hf_hdp.planning.metrics import plan_metrics
from hf_hdp.planning.splits import choose_shape
from tests.dist_utils import run_distributed
from tests.models import MIXED_LENGTHS, load_model, mixed_batch, reference_step, save_tiny_model

WORLD = 4
C = 16
LENGTHS = MIXED_LENGTHS  # [40, 5, 9, 60, 12, 3, 16, 7, 33, 2]: three samples longer than C
FAMILIES = ["llama", "qwen2"]


def _cost(path: str) -> CostModel:
    """The tiny model on CPU ranks, float64 on the wire, two ranks per "node"."""
    cost = CostModel.from_config(load_model(path).config, "cpu", bytes_per_value=8)
    return dataclasses.replace(cost, ranks_per_node=2)


def _wide_plan() -> StepPlan:
    """Every split on groups wider than the minimum: 60 tokens Ulysses x4, 40 hybrid 2x2 (3 would do), 33 a
    ring of 4 (3 would do), 16 Ulysses x2 (1 would do) on ranks 3 and 1 beside whole samples."""
    L = LENGTHS
    placements = [
        *[(r, 0, [Piece(3, L[3], (0, 1, 2, 3), ulysses=4)]) for r in range(4)],
        *[(r, 1, [Piece(0, L[0], (2, 3, 0, 1), ulysses=2)]) for r in range(4)],
        *[(r, 2, [Piece(8, L[8], (0, 1, 2, 3))]) for r in range(4)],
        (0, 3, [Piece(1, L[1], (0,)), Piece(2, L[2], (0,))]),
        (1, 3, [Piece(6, L[6], (3, 1), ulysses=2), Piece(7, L[7], (1,))]),
        (2, 3, [Piece(4, L[4], (2,)), Piece(5, L[5], (2,))]),
        (3, 3, [Piece(6, L[6], (3, 1), ulysses=2), Piece(9, L[9], (3,))]),
    ]
    return build_plan(L, WORLD, C, placements, planner="wide").validate(num_heads=4)


def _plans(path: str) -> dict[str, StepPlan]:
    cost = _cost(path)
    plans = {
        split: plan_balanced(LENGTHS, WORLD, C, cost, attention_split=split) for split in ("ulysses", "hybrid", "auto")
    }
    plans["wide"] = _wide_plan()
    return plans


def _worker(rank, world_size, paths: dict, plan_jsons: dict):
    from hf_hdp.collators import HDPCollator, count_loss_tokens
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import enable_hdp_attention, run_micro_batches

    torch.use_deterministic_algorithms(True)
    mesh = DynamicMesh()
    samples = dict(enumerate(mixed_batch(0)))
    n_loss = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in samples.values())
    collator = HDPCollator()
    out = {}
    for family, path in paths.items():
        model = load_model(path)
        enable_hdp_attention(model)
        for name, pj in plan_jsons[family].items():
            plan = StepPlan.from_json(pj)
            mesh.check_plan(plan.fingerprint(), 0)
            model.zero_grad(set_to_none=True)
            micro = [collator(mb, samples) for mb in plan.for_rank(rank)]
            sent = mesh.stats.bytes_sent
            loss = run_micro_batches(model, micro, n_loss, mesh, "reference", torch.device("cpu"))
            sent = mesh.stats.bytes_sent - sent
            (total,) = mesh.reduce_gradients([p for p in model.parameters() if p.requires_grad], extras=[loss])
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            out[family, name] = (total, grads if rank == 0 else {k: v.sum() for k, v in grads.items()}, sent)
    return out


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("splits")
    paths = {f: save_tiny_model(f, str(base / f)) for f in FAMILIES}
    plans = {f: _plans(paths[f]) for f in FAMILIES}
    jsons = {f: {name: p.to_json() for name, p in plans[f].items()} for f in FAMILIES}
    return paths, plans, run_distributed(_worker, WORLD, paths, jsons, timeout=400)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["ulysses", "hybrid", "auto", "wide"])
def test_split_steps_equal_one_process_and_send_what_the_plan_estimates(split_runs, family, name):
    paths, plans, runs = split_runs
    plan = plans[family][name]
    ref_loss, ref_grads = reference_step(load_model(paths[family]), mixed_batch(0))
    loss, grads, _ = runs[0][family, name]
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name} {n}: {m}")
    for r in range(1, WORLD):
        assert runs[r][family, name][0] == pytest.approx(loss, rel=1e-12)
        for n, s in runs[r][family, name][1].items():
            torch.testing.assert_close(s, grads[n].sum(), rtol=1e-12, atol=1e-12)
    estimate = plan_metrics(plan, _cost(paths[family])).p2p_bytes_per_rank
    assert [runs[r][family, name][2] for r in range(WORLD)] == [round(b) for b in estimate]


def test_forced_splits_make_the_pieces_they_promise(split_runs):
    _, plans, _ = split_runs
    for family in FAMILIES:
        p = {name: {q.sample: q for q in plan.pieces()} for name, plan in plans[family].items()}
        # ulysses: k_min = 3 does not divide the 4 heads, so 40 and 33 get the next degree that does: 4
        assert [(p["ulysses"][s].k, p["ulysses"][s].split) for s in (0, 3, 8)] == [(4, "ulysses")] * 3
        # hybrid (2 ranks per node): k_min = 4 is 2 x 2; k_min = 3 stays a ring of 3 (u = 1 is valid, 3 < 4)
        assert (p["hybrid"][3].k, p["hybrid"][3].ulysses, p["hybrid"][3].split) == (4, 2, "hybrid")
        assert [(p["hybrid"][s].k, p["hybrid"][s].split) for s in (0, 8)] == [(3, "ring")] * 2
        # hybrid sub-groups are whole nodes of 2
        assert {tuple(sorted(p["hybrid"][3].group[:2])), tuple(sorted(p["hybrid"][3].group[2:]))} == {(0, 1), (2, 3)}
    splits = plans["llama"]["wide"].splits()
    assert splits == {"ulysses": 2, "hybrid": 1, "ring": 1, "local": 6}


def test_a_degree_that_does_not_divide_the_heads_is_refused_before_any_p2p():
    bad = build_plan([20], 3, 10, [(r, 0, [Piece(0, 20, (0, 1, 2), ulysses=3)]) for r in range(3)], planner="bad")
    bad.validate()  # structurally fine ...
    with pytest.raises(PlanError, match="Ulysses degree of 3 does not divide the model's 4 query heads"):
        bad.validate(num_heads=4)  # ... but not for a model of 4 heads
    with pytest.raises(PlanError, match="does not divide its group of 3"):
        build_plan([20], 3, 10, [(r, 0, [Piece(0, 20, (0, 1, 2), ulysses=2)]) for r in range(3)], "bad").validate()


def test_the_step_loader_refuses_a_bad_degree_before_the_collator_runs():
    import numpy as np
    from datasets import Dataset

    from hf_hdp.collators import HDPCollator
    from hf_hdp.data.loader import GlobalBatchSampler, HDPStepDataset

    data = Dataset.from_dict({"input_ids": [list(range(1, 21))]})

    def planner(lengths, world, capacity):
        return build_plan(
            lengths, world, capacity, [(r, 0, [Piece(0, 20, (0, 1, 2), ulysses=3)]) for r in range(3)], planner="bad"
        )

    steps = HDPStepDataset(
        data,
        np.array([20]),
        np.array([19]),
        GlobalBatchSampler(1, 1, seed=0),
        planner,
        3,
        0,
        10,
        HDPCollator(),
        num_heads=4,
    )
    with pytest.raises(PlanError, match="does not divide the model's 4 query heads"):
        steps[0, 0]


def test_auto_widens_only_the_samples_that_would_set_the_step():
    cost = CostModel.default()  # LLaMA-7B on H100, 8 ranks per node, 32 heads
    lengths = [200_000] + [4096] * 8000
    target = sum(cost.local_time(s) for s in lengths) / 1024
    long = choose_shape(cost, 200_000, 25, 1024, "auto", target)
    assert long.k > 25 and long.ulysses == 8  # wider than ceil(s / C), head-parallel inside nodes
    short = choose_shape(cost, 16_384, 2, 1024, "auto", target)
    assert short.k == 2  # not on the critical path: the fewest rank-seconds
    ring = choose_shape(cost, 200_000, 25, 1024, "ring", target)
    assert (ring.k, ring.ulysses) == (25, 1)
    plan = plan_balanced(lengths, 1024, 8192, cost)
    plan.validate(num_heads=32)
    (piece,) = [p for p in plan.pieces() if p.length == 200_000]
    assert piece.split == "hybrid" and piece.ulysses == 8
    assert all(len({r // 8 for r in piece.group[i : i + 8]}) == 1 for i in range(0, piece.k, 8))  # sub-groups in nodes
    assert (
        plan_metrics(plan, cost).step_time_s
        < plan_metrics(plan_balanced(lengths, 1024, 8192, cost, attention_split="ring"), cost).step_time_s
    )
