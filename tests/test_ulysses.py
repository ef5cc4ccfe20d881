"""Head-parallel (Ulysses) and hybrid attention segments (:mod:`hf_hdp.attention.ulysses`, run through the
one autograd node of :mod:`hf_hdp.attention.segments`) against one process's causal attention of each
whole sequence: output and dQ/dK/dV of every member's rows (float64, the reference backend).

Cases: Ulysses degrees 2 and 4, hybrid 2 x 2 (ranks in any order), MHA, GQA with fewer K/V heads than
the degree (replicated), a K/V grouping that does not align with the split, lengths not divisible by
the degree, several documents in one segment, and a ring and a hybrid segment of the same group in
one micro-batch. The P2P bytes each member sends equal the cost model's count
(:meth:`~hf_hdp.planning.cost.CostModel.segment_bytes_by_member`), which is what plans estimate."""

from __future__ import annotations

import pytest
import torch

from hf_hdp.planning.cost import CostModel
from hf_hdp.planning.layout import head_split
from tests.dist_utils import run_distributed
from tests.plan_helpers import segment_rows

# (Hq, Hkv, segments): each segment (group, Ulysses degree, document lengths)
CASES = [
    (8, 8, [((0, 1, 2, 3), 4, (37,))]),
    (8, 2, [((0, 1, 2, 3), 4, (13, 6))]),  # fewer K/V heads than the degree: replicated
    (8, 1, [((0, 1, 2, 3), 4, (35,))]),
    (12, 6, [((0, 1, 2, 3), 4, (26,))]),  # 3 query heads per member over pairs: one K/V head per query head
    (4, 2, [((3, 1), 2, (21,))]),  # degree 2 on ranks 3 and 1, in that order
    (4, 1, [((0, 1, 2, 3), 2, (19, 5))]),  # hybrid: Ulysses 2 x ring 2, GQA
    (8, 8, [((2, 3, 0, 1), 2, (10,))]),  # hybrid with the positions' ranks in another order
    (4, 2, [((0, 1, 2, 3), 1, (17,)), ((0, 1, 2, 3), 2, (12, 3))]),  # a ring, then a hybrid, one micro-batch
    (6, 2, [((0, 2), 2, (4,)), ((1, 3), 2, (2,))]),  # tiny documents: empty slices
]
D = 8


def _cost(hq, hkv) -> CostModel:
    return CostModel(
        a=0, b=0, c=0, num_layers=1, kv_bytes_per_token=2 * hkv * D * 8, value_bytes=8, num_heads=hq, num_kv_heads=hkv
    )


def _worker(rank, world):
    from hf_hdp.attention.backends import get_backend
    from hf_hdp.attention.segments import distributed_attention
    from hf_hdp.distributed.mesh import DynamicMesh

    backend = get_backend("reference", torch.device("cpu"), torch.float64)
    mesh = DynamicMesh()
    out = []
    for c, (hq, hkv, segments) in enumerate(CASES):
        g = torch.Generator().manual_seed(c)
        docs = []  # per segment, per document: q, k, v, w and the reference output and gradients
        for _group, _u, lengths in segments:
            per = []
            for s in lengths:
                q, k, v = (torch.randn(s, h, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
                w = torch.randn(s, hq, D, generator=g, dtype=torch.float64)
                qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
                cu = torch.tensor([0, s], dtype=torch.int32)
                o = backend.varlen(qr, kr, vr, cu, cu, s, s, True, D**-0.5)
                (o * w).sum().backward()
                per.append((q, k, v, w, o.detach(), qr.grad, kr.grad, vr.grad))
            docs.append(per)
        rows, segs = segment_rows(segments, rank)
        if not segs:
            out.append(None)
            continue

        def take(field):
            return torch.cat([docs[i][d][field][a:b] for i, d, a, b in rows])

        ql, kl, vl = (take(f).clone().requires_grad_() for f in range(3))
        before = mesh.stats.bytes_sent
        o = distributed_attention(ql, kl, vl, tuple(segs), D**-0.5, backend, mesh)
        (o * take(3)).sum().backward()
        sent = mesh.stats.bytes_sent - before
        diffs = [float((x - take(f)).abs().max()) for x, f in ((o, 4), (ql.grad, 5), (kl.grad, 6), (vl.grad, 7))]
        out.append((diffs, sent))
    return out


def test_head_split_gives_each_member_its_heads_and_the_kv_heads_they_use():
    mha = head_split(8, 8, 4)
    assert [(s.q_start, s.q_stop) for s in mha] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.kv_heads for s in mha] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [s.kv_heads for s in head_split(8, 2, 4)] == [(0,), (0,), (1,), (1,)]  # replicated
    assert [s.kv_heads for s in head_split(12, 6, 4)] == [(0, 0, 1), (1, 2, 2), (3, 3, 4), (4, 5, 5)]
    with pytest.raises(ValueError, match="must divide the 8 query heads"):
        head_split(8, 2, 3)


def test_ulysses_and_hybrid_segments_equal_one_process_and_send_what_the_cost_model_counts():
    results = run_distributed(_worker, 4, timeout=240)
    for c, (hq, hkv, segments) in enumerate(CASES):
        cost = _cost(hq, hkv)
        for rank in range(4):
            got = results[rank][c]
            held = [(g, u, ls) for g, u, ls in segments if rank in g]
            if not held:
                assert got is None
                continue
            diffs, sent = got
            assert max(diffs) <= 1e-12, (c, rank, diffs)
            expected = sum(cost.segment_bytes_by_member(ls, len(g), u)[g.index(rank)] for g, u, ls in held)
            assert sent == expected, (c, rank, sent, expected)
