"""The distributed part of one micro-batch's attention layer: every segment, ring or head-parallel, in one autograd node.

The segments (:mod:`hf_hdp.attention.metadata`) run in metadata order, the same order on every
member, forward and backward, so no placement can deadlock (docs/design.md §7): a
:class:`~.metadata.RingSegment` runs the zigzag ring (:mod:`.ring`, or :mod:`.halo` for a windowed or
chunked layer), a :class:`~.metadata.UlyssesSegment` the head-parallel or hybrid piece (:mod:`.ulysses`).

The layer's :class:`~.features.LayerFeatures` go to every segment. Attention sinks (:mod:`.sinks`) join
each row's softmax once, after all its blocks: a ring segment merges them into its merged output, a
head-parallel one into each member's head slice; their gradient is summed over this rank's segments
here, over micro-batches by autograd and over ranks by the gradient all-reduce.
"""

from __future__ import annotations

import torch

from .backends import AttentionBackend, get_backend
from .features import PLAIN, LayerFeatures
from .metadata import RingSegment, UlyssesSegment
from .ring import ring_backward, ring_forward
from .sinks import merge_sinks, sink_grad
from .ulysses import ulysses_backward, ulysses_forward


class SegmentAttention(torch.autograd.Function):
    """All distributed segments of one micro-batch's attention layer, in metadata order."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, segments, scale, backend, mesh, features):
        outs, saved, counts = [], [], []
        base = segments[0].start
        for seg in segments:
            sl = slice(seg.start - base, seg.end - base)
            if isinstance(seg, UlyssesSegment):
                o, kept = ulysses_forward(q[sl], k[sl], v[sl], seg, scale, backend, mesh, features, sinks)
            else:
                o, lse = ring_forward(q[sl], k[sl], v[sl], seg, scale, backend, mesh, features)
                if sinks is not None:
                    o, lse = merge_sinks(o, lse, sinks)
                o = o.to(q.dtype)
                kept = (o, lse)
            outs.append(o)
            saved.extend(kept)
            counts.append(len(kept))
        out = torch.cat(outs)
        ctx.save_for_backward(q, k, v, sinks, *saved)
        ctx.segments, ctx.counts, ctx.scale, ctx.backend, ctx.mesh = segments, counts, scale, backend, mesh
        ctx.features = features
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, *saved = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        d_sinks = None if sinks is None else torch.zeros_like(sinks)
        base = ctx.segments[0].start
        at = 0
        for seg, n in zip(ctx.segments, ctx.counts):
            sl = slice(seg.start - base, seg.end - base)
            kept, at = saved[at : at + n], at + n
            if isinstance(seg, UlyssesSegment):
                sq, sk, sv, ds = ulysses_backward(
                    dout[sl], kept, seg, ctx.scale, ctx.backend, ctx.mesh, k.shape[1], ctx.features, sinks
                )
                if ds is not None:
                    d_sinks += ds
            else:
                out, lse = kept
                sq, sk, sv = ring_backward(
                    dout[sl], q[sl], k[sl], v[sl], out, lse, seg, ctx.scale, ctx.backend, ctx.mesh, ctx.features
                )
                if sinks is not None:
                    d_sinks += sink_grad(dout[sl], out, lse, sinks)
            dq[sl], dk[sl], dv[sl] = sq, sk, sv
        return dq, dk, dv, d_sinks, None, None, None, None, None


def distributed_attention(
    q,
    k,
    v,
    segments: tuple[RingSegment | UlyssesSegment, ...],
    scale: float,
    backend: AttentionBackend | str,
    mesh,
    features: LayerFeatures = PLAIN,
    sinks: torch.Tensor | None = None,
):
    """Attention of the rows ``segments[0].start .. segments[-1].end`` of a micro-batch, every segment with its
    group. ``q``: ``[n, Hq, D]``, ``k``/``v``: ``[n, Hkv, D]`` holding exactly those rows (contiguous).
    ``backend``: an :class:`AttentionBackend`, or a name for :func:`get_backend` (``"auto"`` picks by
    ``q``'s device and dtype). ``features``: the layer's window, chunk and soft-cap; ``sinks``: ``[Hq]`` or
    ``None``."""
    if isinstance(backend, str):
        backend = get_backend(backend, q.device, q.dtype)
    return SegmentAttention.apply(q, k, v, sinks, tuple(segments), scale, backend, mesh, features)


def ring_attention(
    q,
    k,
    v,
    segments: tuple[RingSegment, ...],
    scale: float,
    backend: AttentionBackend | str,
    mesh,
    features: LayerFeatures = PLAIN,
    sinks: torch.Tensor | None = None,
):
    """Zigzag ring attention for the rows ``segments[0].start .. segments[-1].end`` of a micro-batch.

    ``q``/``k``: ``[n, Hq or Hkv, Dk]``, ``v``: ``[n, Hkv, Dv]`` holding exactly those rows (contiguous).
    ``backend``: an :class:`AttentionBackend`, or a name for :func:`get_backend` (``"auto"`` picks by
    ``q``'s device and dtype). One autograd node for every segment (:func:`distributed_attention`).
    """
    return distributed_attention(q, k, v, segments, scale, backend, mesh, features, sinks)
