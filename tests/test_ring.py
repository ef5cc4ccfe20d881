"""Ring attention (forward and backward) over real gloo processes equals full causal attention.

Each case is a step plan over a global batch of sequences and an attention backend. Every rank packs
its micro-batches with the real collator (token ids encode global row numbers, so we know which rows
each rank holds), runs the registered ``"hdp"`` attention on those rows of random Q/K/V, and
back-propagates random output gradients. The parent checks every output row and every dQ/dK/dV row
against dense causal attention on each whole sequence in float64. The ``"reference"`` backend runs
in float64 (tolerance 1e-9), ``"cpu_flash"`` and ``"auto"`` (which picks cpu_flash) in float32
(tolerance 1e-5).
"""

from __future__ import annotations

import random

import pytest
import torch

from hf_hdp.planning import StepPlan, plan_naive, plan_static
from tests.dist_utils import run_distributed
from tests.plan_helpers import random_plan

D = 8
#: backend -> (dtype of Q/K/V and of the ring's accumulators, tolerance against float64 dense attention)
PRECISION = {"reference": (torch.float64, 1e-9), "cpu_flash": (torch.float32, 1e-5), "auto": (torch.float32, 1e-5)}


def _tensors(lengths, hq, hkv, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(total, hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(total, hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(total, hq, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


class _Attn(torch.nn.Module):
    is_causal = True
    layer_idx = 0


def _ring_worker(rank, world_size, cases):
    from hf_hdp.attention.interface import hdp_attention_forward
    from hf_hdp.collators import HDPCollator
    from hf_hdp.distributed.mesh import DynamicMesh

    mesh = DynamicMesh()
    collator = HDPCollator()
    module = _Attn().eval()
    results = []
    for plan_json, hq, hkv, seed, backend in cases:
        plan = StepPlan.from_json(plan_json)
        dtype = PRECISION[backend][0]
        q_all, k_all, v_all, dout_all = (x.to(dtype) for x in _tensors(plan.lengths, hq, hkv, seed))
        offsets = [0]
        for n in plan.lengths:
            offsets.append(offsets[-1] + n)
        samples = {s: {"input_ids": list(range(offsets[s], offsets[s + 1]))} for s in range(len(plan.lengths))}
        case = []
        for mb in plan.for_rank(rank):
            packed = collator(mb, samples)
            meta = packed["hdp_metadata"]
            meta.bind(mesh, backend)
            rows = packed["input_ids"][0]
            q, k, v = (x[rows].clone().requires_grad_(True) for x in (q_all, k_all, v_all))
            out, _ = hdp_attention_forward(
                module,
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                None,
                scaling=D**-0.5,
                hdp_metadata=meta,
            )
            assert out.dtype == dtype
            out[0].backward(dout_all[rows])
            case.append((rows, out[0].detach(), q.grad, k.grad, v.grad))
        results.append(case)
    return results


def _reference(lengths, hq, hkv, seed):
    q, k, v, dout = (x.clone() for x in _tensors(lengths, hq, hkv, seed))
    for x in (q, k, v):
        x.requires_grad_(True)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        qs = q[sl].transpose(0, 1)
        ks = k[sl].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        vs = v[sl].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) * D**-0.5
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    out = torch.cat(outs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check(cases, per_rank):
    for c, (plan_json, hq, hkv, seed, backend) in enumerate(cases):
        plan = StepPlan.from_json(plan_json)
        tol = PRECISION[backend][1]
        ref = _reference(plan.lengths, hq, hkv, seed)
        total = sum(plan.lengths)
        got = [torch.zeros_like(x) for x in ref]
        hits = torch.zeros(total, dtype=torch.long)
        for rank_results in per_rank:
            for rows, *tensors in rank_results[c]:
                hits[rows] += 1
                for acc, t in zip(got, tensors):
                    acc[rows] = t.double()
        assert torch.equal(hits, torch.ones(total, dtype=torch.long)), f"case {c}: rows not covered exactly once"
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(
                a, b, rtol=tol, atol=tol, msg=lambda m: f"case {c} ({plan.planner}, {backend}) {name}: {m}"
            )


def _case(plan: StepPlan, hq=4, hkv=2, seed=0, backend="reference"):
    return (plan.to_json(), hq, hkv, seed, backend)


def test_ring_attention_group_sizes_1_to_5_uneven_lengths():
    """Every case twice: the float64 reference backend, and cpu_flash in float32 (one gloo run)."""
    C = 8
    # k = ceil(s / C) = 1..5, no length divisible by 2k
    lengths = [7, 13, 23, 31, 37]
    plans = [(plan_naive([s], 5, C), 4, 2, i) for i, s in enumerate(lengths)]
    plans.append((plan_naive(lengths + [3, 5, 2], 5, C), 4, 1, 9))
    plans.append((plan_naive([37, 6], 5, C), 2, 2, 10))
    for (plan, *_), s in zip(plans, lengths):
        assert plan.pieces()[0].k == -(-s // C)
    cases = [
        _case(plan, hq, hkv, seed, backend) for backend in ("reference", "cpu_flash") for plan, hq, hkv, seed in plans
    ]
    per_rank = run_distributed(_ring_worker, 5, cases)
    _check(cases, per_rank)


def test_ring_attention_static_and_random_plans_with_empty_chunks():
    C = 8
    rng = random.Random(3)
    cases = [
        # static mesh: every sequence split over the CP group of 4, short ones leave members empty
        _case(plan_static([29, 2, 5, 11, 3], 4, C), seed=20),
        # a 3-token sequence on 3 ranks: every front chunk is empty
        _case(StepPlan.from_json(plan_naive([3], 4, 1).to_json()), seed=21),
    ]
    for i in range(4):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(2, 7))]
        cases.append(_case(random_plan(lengths, 4, C, rng), hq=4, hkv=rng.choice([1, 2, 4]), seed=30 + i))
    cases.append(_case(plan_static([29, 2, 5, 11, 3], 4, C), seed=22, backend="auto"))  # auto: cpu_flash
    per_rank = run_distributed(_ring_worker, 4, cases)
    _check(cases, per_rank)


@pytest.mark.parametrize("world", [2])
def test_ring_attention_two_member_ring_sends_both_ways_to_one_peer(world):
    cases = [_case(plan_naive([15, 9], world, 8), seed=40)]
    _check(cases, run_distributed(_ring_worker, world, cases))
