"""Sliding windows, chunked attention, soft-capping and sinks in distributed segments, against a dense reference.

Every case runs the one autograd node of :mod:`hf_hdp.attention.segments` on 5 gloo processes (float64, the
reference backend) and compares each member's output and dQ/dK/dV rows, and the sinks' gradient summed over
ranks, with one process's dense attention of each whole document under the same mask and transform
(explicit scores, written here). Ring pieces of group sizes 1-5 (windows of 1, 3 and 8 tokens, several
documents, documents shorter than the group), head-parallel pieces of degree 2 and 4 and a hybrid 2 x 2.

Windowed and chunked layers exchange only the rows a window reaches (:mod:`hf_hdp.attention.halo`): the P2P
bytes every member sends equal the count :func:`hf_hdp.planning.reach.needed_rows` gives (the planner's
estimate), and are far below the relay ring's for long documents.
"""

from __future__ import annotations

import pytest
import torch

from hf_hdp.attention.features import LayerFeatures
from hf_hdp.planning.cost import CostModel
from hf_hdp.planning.layout import zigzag_front_back
from hf_hdp.planning.reach import LayerMask, needed_count
from tests.dist_utils import run_distributed
from tests.plan_helpers import segment_rows

D = 8
WORLD = 5
# (Hq, Hkv, segments, window, chunk, softcap, sinks): each segment (group, Ulysses degree, document lengths)
CASES = [
    (4, 2, [((0,), 1, (23, 5))], 3, None, None, False),
    (4, 2, [((0, 1), 1, (40,))], 8, None, None, False),
    (4, 2, [((2, 0, 1), 1, (50, 7))], 3, None, None, False),
    (4, 1, [((0, 1, 2, 3), 1, (61,))], 1, None, None, False),
    (4, 2, [((0, 1, 2, 3, 4), 1, (70, 3))], 8, None, None, False),  # a document shorter than the group
    (4, 2, [((4, 3, 2, 1, 0), 1, (64,))], None, 8, None, False),  # chunked
    (4, 2, [((0, 1, 2), 1, (45,))], 5, 16, None, False),  # both
    (4, 2, [((0, 1, 2, 3), 1, (37, 11))], None, None, 2.0, False),  # soft-capping, the relay ring
    (4, 2, [((0, 1, 2, 3, 4), 1, (33,))], None, None, None, True),  # sinks, the relay ring
    (4, 2, [((1, 3, 0), 1, (52,))], 6, None, 2.0, True),  # gpt-oss-like: window, sinks (and a cap)
    (4, 2, [((0, 1), 2, (31,))], 4, None, None, True),  # Ulysses 2
    (8, 2, [((0, 1, 2, 3), 4, (43,))], 5, None, 1.5, True),  # Ulysses 4
    (4, 2, [((0, 1, 2, 3), 2, (57, 9))], None, 8, None, False),  # hybrid 2 x 2, chunked
    (4, 2, [((0, 1, 2, 3), 2, (48,))], 7, None, None, True),  # hybrid 2 x 2, windowed, sinks
    # a ring and a hybrid segment in one micro-batch, windowed
    (4, 2, [((0, 1, 2, 3), 1, (29,)), ((0, 1, 2, 3), 2, (26, 4))], 4, None, None, False),
]


def dense(q, k, v, window, chunk, softcap, sinks, scale):
    """One document's attention ``[s, Hq, D]`` by explicit scores (autograd), causal plus the features."""
    s, hq = q.shape[0], q.shape[1]
    g = hq // k.shape[1]
    qq, kk, vv = q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1), v.repeat_interleave(g, 1).transpose(0, 1)
    scores = qq @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(s)
    ok = pos[None, :] <= pos[:, None]
    if window is not None:
        ok &= pos[:, None] - pos[None, :] < window
    if chunk is not None:
        ok &= pos[:, None] // chunk == pos[None, :] // chunk
    scores = scores.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(-1, 1, 1).expand(-1, s, 1)], dim=-1)
    p = torch.softmax(scores, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return (p @ vv).transpose(0, 1)


def _worker(rank, world):
    from hf_hdp.attention.backends import get_backend
    from hf_hdp.attention.segments import distributed_attention
    from hf_hdp.distributed.mesh import DynamicMesh

    backend = get_backend("reference", torch.device("cpu"), torch.float64)
    mesh = DynamicMesh()
    out = []
    for c, (hq, hkv, segments, window, chunk, softcap, with_sinks) in enumerate(CASES):
        g = torch.Generator().manual_seed(c)
        sinks = torch.randn(hq, generator=g, dtype=torch.float64) if with_sinks else None
        ref_sinks = sinks.clone().requires_grad_() if with_sinks else None
        docs = []
        for _group, _u, lengths in segments:
            per = []
            for s in lengths:
                q, k, v = (torch.randn(s, h, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
                w = torch.randn(s, hq, D, generator=g, dtype=torch.float64)
                qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
                o = dense(qr, kr, vr, window, chunk, softcap, ref_sinks, D**-0.5)
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
        my_sinks = sinks.clone().requires_grad_() if with_sinks else None
        features = LayerFeatures(LayerMask(window, chunk), softcap)
        before = mesh.stats.bytes_sent
        o = distributed_attention(ql, kl, vl, tuple(segs), D**-0.5, backend, mesh, features, my_sinks)
        (o * take(3)).sum().backward()
        sent = mesh.stats.bytes_sent - before
        diffs = [float((x - take(f)).abs().max()) for x, f in ((o, 4), (ql.grad, 5), (kl.grad, 6), (vl.grad, 7))]
        out.append((diffs, sent, my_sinks.grad if with_sinks else None, ref_sinks.grad if with_sinks else None))
    return out


def _cost(hq, hkv, mask: LayerMask | None = None) -> CostModel:
    """The planner's cost model of one float64 layer of these heads, with the layer's mask."""
    return CostModel(
        a=0,
        b=0,
        c=0,
        num_layers=1,
        kv_bytes_per_token=2 * hkv * D * 8,
        value_bytes=8,
        num_heads=hq,
        num_kv_heads=hkv,
        layer_masks=(mask,) if mask is not None else (),
    )


def _halo_bytes(lengths, k, member, mask, row_bytes) -> int:
    """What the protocol of :mod:`hf_hdp.attention.halo` sends, counted here from the rows each member needs:
    K/V twice to every member that needs our rows, the dK/dV of every member's rows we needed back to it
    (float64 here: the accumulator is the model dtype)."""
    layout = tuple(tuple(zigzag_front_back(s, k)[m] for s in lengths) for m in range(k))
    out = sum(2 * needed_count(layout, m, member, mask) for m in range(k) if m != member)
    back = sum(needed_count(layout, member, j, mask) for j in range(k) if j != member)
    return (out + back) * row_bytes


def _expected_bytes(hq, hkv, group, u, lengths, rank, window, chunk) -> int:
    """Bytes ``rank`` sends for one segment, as the plan estimates them (the cost model with the layer's mask);
    for a windowed ring piece, also counted directly from the rows each member needs."""
    mask = LayerMask(window, chunk)
    member = group.index(rank)
    estimate = _cost(hq, hkv, mask).segment_bytes_by_member(lengths, len(group), u)[member]
    if u == 1 and mask.restricts(max(lengths)):
        assert estimate == _halo_bytes(lengths, len(group), member, mask.for_length(max(lengths)), 2 * hkv * D * 8)
    return int(estimate)


def test_features_in_distributed_segments_equal_dense_attention_and_send_only_what_windows_reach():
    results = run_distributed(_worker, WORLD, timeout=300)
    for c, (hq, hkv, segments, window, chunk, _softcap, with_sinks) in enumerate(CASES):
        sink_total = None
        for rank in range(WORLD):
            got = results[rank][c]
            held = [(g, u, ls) for g, u, ls in segments if rank in g]
            if not held:
                assert got is None
                continue
            diffs, sent, d_sinks, ref = got
            assert max(diffs) <= 1e-12, (c, rank, diffs)
            expected = sum(_expected_bytes(hq, hkv, g, u, list(ls), rank, window, chunk) for g, u, ls in held)
            assert sent == expected, (c, rank, sent, expected)
            if with_sinks:
                sink_total = d_sinks if sink_total is None else sink_total + d_sinks
        if with_sinks:  # each rank has its rows' share; the gradient all-reduce sums them
            torch.testing.assert_close(sink_total, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window,chunk", [(16, None), (None, 64), (1, None)])
def test_a_windowed_ring_piece_sends_far_less_than_the_relay_ring(window, chunk):
    lengths, k = [4096], 4
    mask = LayerMask(window, chunk)
    for m in range(k):
        full = _cost(4, 2).segment_bytes_by_member(lengths, k)[m]
        halo = _cost(4, 2, mask).segment_bytes_by_member(lengths, k)[m]
        assert halo == _halo_bytes(lengths, k, m, mask, 2 * 2 * D * 8)
        assert halo < 0.1 * full, (m, halo, full)


class _Layer(torch.nn.Module):
    """What the "hdp" attention reads from a transformers attention module: its index, causality, window and the
    config's layer types and attention chunk."""

    def __init__(self, window=None, chunk=None, heads=4, kv_heads=2):
        super().__init__()
        from transformers import PretrainedConfig

        self.layer_idx, self.is_causal, self.sliding_window = 0, True, window
        self.num_key_value_groups = heads // kv_heads
        types = ["chunked_attention" if chunk else "full_attention"]
        self.config = PretrainedConfig(
            num_hidden_layers=1, layer_types=types, attention_chunk_size=chunk, num_attention_heads=heads
        )


LOCAL = [
    (3, None, None, False),
    (None, 4, None, True),
    (2, None, 1.5, True),
    (None, None, 3.0, False),
    (5, 8, None, True),
]


@pytest.mark.parametrize("window,chunk,softcap,with_sinks", LOCAL)
def test_local_sequences_and_the_padded_fallback_honour_every_feature(window, chunk, softcap, with_sinks):
    """A micro-batch of whole local sequences (one varlen call; chunked layers cut at chunk boundaries, sinks in
    their own autograd node), and a call without HDP metadata on a right-padded batch (generation, evaluation),
    both equal the dense attention of each sequence, outputs and gradients (sinks' included)."""
    from hf_hdp.attention.interface import hdp_attention_forward
    from hf_hdp.attention.metadata import HDPAttentionMetadata

    g = torch.Generator().manual_seed(7)
    lengths, hq, hkv = (13, 1, 20, 6), 4, 2
    layer = _Layer(window, chunk, hq, hkv)
    sinks = torch.randn(hq, generator=g, dtype=torch.float64, requires_grad=True) if with_sinks else None
    T = sum(lengths)
    q, k, v = (torch.randn(1, h, T, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    w = torch.randn(T, hq, D, generator=g, dtype=torch.float64)
    meta = HDPAttentionMetadata(num_tokens=T, local_len=T, local_seqlens=lengths, rings=()).bind(None, "reference")
    kwargs = {"sliding_window": window, "softcap": softcap, "s_aux": sinks}
    out, _ = hdp_attention_forward(layer, q, k, v, None, scaling=D**-0.5, hdp_metadata=meta, **kwargs)
    grads = torch.autograd.grad((out[0] * w).sum(), [q, k, v] + ([sinks] if with_sinks else []))
    ref, at = [], 0
    for s in lengths:
        piece = [x[0, :, at : at + s].transpose(0, 1) for x in (q, k, v)]
        ref.append(dense(*piece, window, chunk, softcap, sinks, D**-0.5))
        at += s
    ref = torch.cat(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), [q, k, v] + ([sinks] if with_sinks else []))
    torch.testing.assert_close(out[0], ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # the same sequences as a right-padded batch, without metadata
    longest = max(lengths)
    pad = torch.zeros(len(lengths), longest, dtype=torch.long)
    qb, kb, vb = (torch.zeros(len(lengths), x.shape[1], longest, D, dtype=torch.float64) for x in (q, k, v))
    at = 0
    for i, s in enumerate(lengths):
        pad[i, :s] = 1
        for dst, src in ((qb, q), (kb, k), (vb, v)):
            dst[i, :, :s] = src[0, :, at : at + s].detach()
        at += s
    padded, _ = hdp_attention_forward(layer, qb, kb, vb, pad, scaling=D**-0.5, **kwargs)
    at = 0
    for i, s in enumerate(lengths):
        torch.testing.assert_close(padded[i, :s], ref[at : at + s].detach(), rtol=1e-12, atol=1e-12)
        at += s
