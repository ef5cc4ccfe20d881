"""The distributed part of one micro-batch's attention layer: every segment, ring or head-parallel, in one autograd node.

The segments (:mod:`hf_hdp.attention.metadata`) run in metadata order, the same order on every
member, forward and backward, so no placement can deadlock (DESIGN §4): a
:class:`~.metadata.RingSegment` runs the zigzag ring (:mod:`.ring`), a
:class:`~.metadata.UlyssesSegment` the head-parallel or hybrid piece (:mod:`.ulysses`).
"""

from __future__ import annotations

import torch

from .backends import AttentionBackend, get_backend
from .metadata import RingSegment, UlyssesSegment
from .ring import ring_backward, ring_forward
from .ulysses import ulysses_backward, ulysses_forward


class SegmentAttention(torch.autograd.Function):
    """All distributed segments of one micro-batch's attention layer, in metadata order."""

    @staticmethod
    def forward(ctx, q, k, v, segments, scale, backend, mesh):
        outs, saved, counts = [], [], []
        base = segments[0].start
        for seg in segments:
            sl = slice(seg.start - base, seg.end - base)
            if isinstance(seg, UlyssesSegment):
                o, kept = ulysses_forward(q[sl], k[sl], v[sl], seg, scale, backend, mesh)
            else:
                o, lse = ring_forward(q[sl], k[sl], v[sl], seg, scale, backend, mesh)
                o = o.to(q.dtype)
                kept = (o, lse)
            outs.append(o)
            saved.extend(kept)
            counts.append(len(kept))
        out = torch.cat(outs)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.segments, ctx.counts, ctx.scale, ctx.backend, ctx.mesh = segments, counts, scale, backend, mesh
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, *saved = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        base = ctx.segments[0].start
        at = 0
        for seg, n in zip(ctx.segments, ctx.counts):
            sl = slice(seg.start - base, seg.end - base)
            kept, at = saved[at : at + n], at + n
            if isinstance(seg, UlyssesSegment):
                sq, sk, sv = ulysses_backward(dout[sl], kept, seg, ctx.scale, ctx.backend, ctx.mesh, k.shape[1])
            else:
                out, lse = kept
                sq, sk, sv = ring_backward(dout[sl], q[sl], k[sl], v[sl], out, lse, seg, ctx.scale, ctx.backend,
                                           ctx.mesh)
            dq[sl], dk[sl], dv[sl] = sq, sk, sv
        return dq, dk, dv, None, None, None, None


def distributed_attention(q, k, v, segments: tuple[RingSegment | UlyssesSegment, ...], scale: float,
                          backend: AttentionBackend | str, mesh):
    """Attention of the rows ``segments[0].start .. segments[-1].end`` of a micro-batch, every segment with its
    group. ``q``: ``[n, Hq, D]``, ``k``/``v``: ``[n, Hkv, D]`` holding exactly those rows (contiguous).
    ``backend``: an :class:`AttentionBackend`, or a name for :func:`get_backend` (``"auto"`` picks by
    ``q``'s device and dtype)."""
    if isinstance(backend, str):
        backend = get_backend(backend, q.device, q.dtype)
    return SegmentAttention.apply(q, k, v, tuple(segments), scale, backend, mesh)
