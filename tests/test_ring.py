"""Ring attention (forward and backward) over real gloo processes equals full causal attention.

Each case is a step plan over a global batch of sequences. Every rank packs its micro-batches with
the real collator (token ids encode global row numbers, so we know which rows each rank holds),
runs the registered ``"hdp"`` attention on those rows of random Q/K/V, and back-propagates random
output gradients. The parent checks every output row and every dQ/dK/dV row against dense causal
attention on each whole sequence in float64.
"""

from __future__ import annotations

import random

import pytest
import torch

from hf_hdp.planning import StepPlan, plan_naive, plan_static
from tests.dist_utils import run_distributed
from tests.plan_helpers import random_plan

D = 8


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
    from hf_hdp.mesh import DynamicMesh

    mesh = DynamicMesh()
    collator = HDPCollator()
    module = _Attn().eval()
    results = []
    for plan_json, hq, hkv, seed in cases:
        plan = StepPlan.from_json(plan_json)
        q_all, k_all, v_all, dout_all = _tensors(plan.lengths, hq, hkv, seed)
        offsets = [0]
        for n in plan.lengths:
            offsets.append(offsets[-1] + n)
        samples = {s: {"input_ids": list(range(offsets[s], offsets[s + 1]))} for s in range(len(plan.lengths))}
        case = []
        for mb in plan.for_rank(rank):
            packed = collator(mb, samples)
            meta = packed["hdp_metadata"]
            meta.mesh, meta.backend = mesh, "reference"
            rows = packed["input_ids"][0]
            q, k, v = (x[rows].clone().requires_grad_(True) for x in (q_all, k_all, v_all))
            out, _ = hdp_attention_forward(
                module, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                scaling=D**-0.5, hdp_metadata=meta,
            )
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
    for c, (plan_json, hq, hkv, seed) in enumerate(cases):
        plan = StepPlan.from_json(plan_json)
        ref = _reference(plan.lengths, hq, hkv, seed)
        total = sum(plan.lengths)
        got = [torch.zeros_like(x) for x in ref]
        hits = torch.zeros(total, dtype=torch.long)
        for rank_results in per_rank:
            for rows, *tensors in rank_results[c]:
                hits[rows] += 1
                for acc, t in zip(got, tensors):
                    acc[rows] = t
        assert torch.equal(hits, torch.ones(total, dtype=torch.long)), f"case {c}: rows not covered exactly once"
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"case {c} ({plan.planner}) {name}: {m}")


def _case(plan: StepPlan, hq=4, hkv=2, seed=0):
    return (plan.to_json(), hq, hkv, seed)


def test_ring_attention_group_sizes_1_to_5_uneven_lengths():
    C = 8
    # k = ceil(s / C) = 1..5, no length divisible by 2k
    lengths = [7, 13, 23, 31, 37]
    cases = [_case(plan_naive([s], 5, C), seed=i) for i, s in enumerate(lengths)]
    cases.append(_case(plan_naive(lengths + [3, 5, 2], 5, C), hq=4, hkv=1, seed=9))
    cases.append(_case(plan_naive([37, 6], 5, C), hq=2, hkv=2, seed=10))
    for (pj, *_), s in zip(cases, lengths):
        assert StepPlan.from_json(pj).pieces()[0].k == -(-s // C)
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
    per_rank = run_distributed(_ring_worker, 4, cases)
    _check(cases, per_rank)


@pytest.mark.parametrize("world", [2])
def test_ring_attention_two_member_ring_sends_both_ways_to_one_peer(world):
    cases = [_case(plan_naive([15, 9], world, 8), seed=40)]
    _check(cases, run_distributed(_ring_worker, world, cases))
