"""Multi-head latent attention (q/k heads wider than v heads) in every split, against one process's dense attention,
and the P2P bytes of each member against the cost model's estimate.

DeepSeek-V3's attention sees q/k heads of ``qk_nope_head_dim + qk_rope_head_dim`` (192) and v heads of
``v_head_dim`` (128); here 24 and 16. Every case runs the one autograd node of :mod:`hf_hdp.attention.segments`
on 4 gloo processes (float64, the reference backend; one case with cpu_flash in float32): zigzag rings of 2-4
members, Ulysses of degree 2 and 4 (GQA with replicated K/V heads), hybrid 2 x 2, windowed exchanges
(:mod:`hf_hdp.attention.halo`) in a ring and a hybrid piece, and chunked attention. Each member's output and
dQ/dK/dV rows are compared with a dense attention of each whole document written here, and the bytes each member
sends with :meth:`~hf_hdp.planning.cost.CostModel.segment_bytes_by_member` of a cost model that knows the two head
sizes (``layer_heads``): K at the q/k size, V at the v size, no padding on the wire.
"""

from __future__ import annotations

import torch

from hf_hdp.attention.features import LayerFeatures
from hf_hdp.planning.cost import CostModel
from hf_hdp.planning.reach import LayerMask
from tests.dist_utils import run_distributed
from tests.plan_helpers import segment_rows

DK, DV = 24, 16
WORLD = 4
# (Hq, Hkv, segments, window, chunk, backend): each segment (group, Ulysses degree, document lengths)
CASES = [
    (4, 2, [((0, 1, 2), 1, (29, 5))], None, None, "reference"),  # ring of 3, GQA
    (4, 4, [((3, 1), 1, (17,))], None, None, "reference"),  # ring of 2, ranks out of order, MHA
    (8, 2, [((0, 1, 2, 3), 4, (37,))], None, None, "reference"),  # Ulysses 4: K/V heads replicated
    (4, 2, [((0, 1, 2, 3), 2, (23, 6))], None, None, "reference"),  # hybrid 2 x 2
    (4, 2, [((0, 1, 2, 3), 1, (45,))], 5, None, "reference"),  # windowed ring: direct exchange
    (4, 1, [((0, 1, 2, 3), 2, (41,))], 4, None, "reference"),  # windowed hybrid
    (4, 2, [((2, 0, 1), 1, (40, 3))], None, 8, "reference"),  # chunked ring
    (4, 2, [((0, 1, 2, 3), 1, (33,)), ((0, 1, 2, 3), 2, (19, 4))], None, None, "reference"),  # ring + hybrid
    (4, 2, [((0, 1, 2, 3), 1, (31,))], None, None, "cpu_flash"),  # the CPU default's kernel, float32
]
TOL = {"reference": 1e-12, "cpu_flash": 1e-5}


def dense(q, k, v, window, chunk, scale):
    """One document's causal attention (window, chunks), K/V heads repeated for GQA: ``[s, Hq, DV]``."""
    s, hq = q.shape[:2]
    rep = hq // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i = torch.arange(s)
    ok = i[None, :] <= i[:, None]
    if window is not None:
        ok &= i[:, None] - i[None, :] < window
    if chunk is not None:
        ok &= i[:, None] // chunk == i[None, :] // chunk
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~ok, float("-inf")).softmax(-1), vv)


def _worker(rank, world):
    from hf_hdp.attention.backends import get_backend
    from hf_hdp.attention.segments import distributed_attention
    from hf_hdp.distributed.mesh import DynamicMesh

    mesh = DynamicMesh()
    out = []
    for c, (hq, hkv, segments, window, chunk, name) in enumerate(CASES):
        dtype = torch.float64 if name == "reference" else torch.float32
        g = torch.Generator().manual_seed(c)
        docs = []
        for _group, _u, lengths in segments:
            per = []
            for s in lengths:
                q, k = (torch.randn(s, h, DK, generator=g, dtype=torch.float64) for h in (hq, hkv))
                v = torch.randn(s, hkv, DV, generator=g, dtype=torch.float64)
                w = torch.randn(s, hq, DV, generator=g, dtype=torch.float64)
                qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
                o = dense(qr, kr, vr, window, chunk, DK**-0.5)
                (o * w).sum().backward()
                per.append((q, k, v, w, o.detach(), qr.grad, kr.grad, vr.grad))
            docs.append(per)
        rows, segs = segment_rows(segments, rank)
        if not segs:
            out.append(None)
            continue

        def take(field):
            return torch.cat([docs[i][d][field][a:b] for i, d, a, b in rows])

        ql, kl, vl = (take(f).to(dtype).requires_grad_() for f in range(3))
        backend = get_backend(name, torch.device("cpu"), dtype)
        before = mesh.stats.bytes_sent
        o = distributed_attention(
            ql, kl, vl, tuple(segs), DK**-0.5, backend, mesh, LayerFeatures(LayerMask(window, chunk))
        )
        (o * take(3).to(dtype)).sum().backward()
        sent = mesh.stats.bytes_sent - before
        shapes = [tuple(t.shape) for t in (o, ql.grad, kl.grad, vl.grad)]
        diffs = [
            float((x.double() - take(f)).abs().max() / take(f).abs().max())
            for x, f in ((o, 4), (ql.grad, 5), (kl.grad, 6), (vl.grad, 7))
        ]
        out.append((diffs, sent, shapes))
    return out


def _cost(hq, hkv, window, chunk, value_bytes) -> CostModel:
    """One layer of these heads as the planner prices it: K at DK, V at DV (``layer_heads``), the layer's mask."""
    mask = LayerMask(window, chunk)
    return CostModel(
        a=0,
        b=0,
        c=0,
        num_layers=1,
        kv_bytes_per_token=hkv * (DK + DV) * value_bytes,
        value_bytes=value_bytes,
        num_heads=hq,
        num_kv_heads=hkv,
        layer_heads=((hkv, DK, DV),),
        layer_masks=() if mask.full else (mask,),
    )


def test_mla_splits_equal_dense_attention_and_send_what_the_cost_model_counts():
    results = run_distributed(_worker, WORLD, timeout=300)
    for c, (hq, hkv, segments, window, chunk, name) in enumerate(CASES):
        cost = _cost(hq, hkv, window, chunk, 8 if name == "reference" else 4)
        for rank in range(WORLD):
            got = results[rank][c]
            held = [(g, u, ls) for g, u, ls in segments if rank in g]
            if not held:
                assert got is None
                continue
            diffs, sent, shapes = got
            n = shapes[0][0]
            assert shapes == [(n, hq, DV), (n, hq, DK), (n, hkv, DK), (n, hkv, DV)], (c, rank, shapes)
            assert max(diffs) <= TOL[name], (c, rank, diffs)
            expected = sum(cost.segment_bytes_by_member(list(ls), len(g), u)[g.index(rank)] for g, u, ls in held)
            assert sent == expected, (c, rank, sent, expected)


def test_mla_bytes_are_k_at_the_qk_size_and_v_at_the_v_size():
    """A ring moves K and V rows together, so an MLA layer's bytes are exactly the mean of a model whose heads are all
    q/k-sized and one whose heads are all v-sized; head-parallel pieces also move Q/dQ (q/k size) and the output/dO
    (v size), so theirs lie strictly between."""
    mla = _cost(4, 2, None, None, 2)

    def uniform(d):
        return CostModel(
            a=0, b=0, c=0, num_layers=1, kv_bytes_per_token=2 * 2 * d * 2, value_bytes=2, num_heads=4, num_kv_heads=2
        )

    for u in (1, 2, 4):
        got = mla.segment_bytes_by_member([40, 9], 4, u)
        wide, narrow = (
            uniform(DK).segment_bytes_by_member([40, 9], 4, u),
            uniform(DV).segment_bytes_by_member([40, 9], 4, u),
        )
        if u == 1:
            assert got == [(a + b) / 2 for a, b in zip(wide, narrow)]
        else:
            assert all(b < g < a for g, a, b in zip(got, wide, narrow)), (u, got, wide, narrow)
