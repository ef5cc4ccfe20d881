"""Zigzag ring attention over a per-sample group of ranks, with P2P on the one global group.

Read top to bottom: :func:`ring_forward` and :func:`ring_backward` are the algorithm for one
ring segment (see :mod:`hf_hdp.attention.metadata` for the row layout); :mod:`.segments` wraps
every segment of a micro-batch in one autograd Function (its :func:`~.segments.ring_attention` is the
public entry point for rings).

Forward, for member ``i`` of a group of ``k``: at step ``t`` it holds the K/V rows of member
``j = i - t (mod k)``; it starts passing them on to ``i + 1`` while it computes the block
(see :meth:`RingSegment.block`), and merges the block into its running output with the
log-sum-exp rule. K and V travel as one message, with their KV heads unrepeated (GQA), each at its own head
size (:mod:`.kv`: multi-head latent attention's K heads are wider than its V heads).

Backward follows ring-flash-attention's scheme: the K/V rows go round again, and with them an
accumulator of their gradient. Each member adds its block's dK/dV to the accumulator it holds and
passes it on, so after ``k`` hops the accumulator of member ``j``'s K/V returns to ``j`` complete.
Blocks use the *merged* output and log-sum-exp of the forward, which makes each block's gradient
its exact share of the full attention gradient.

Every segment of a micro-batch runs inside one autograd node, in the order of the metadata, the
same order on every member, so no placement can deadlock (docs/design.md §7).

Layer features (:mod:`.features`): soft-capping goes into every block's kernel call. A layer whose
sliding window or attention chunk is shorter than a document of the segment does not run the relay
ring: it exchanges only the rows its window reaches (:mod:`.halo`).
"""

from __future__ import annotations

import torch

from .backends import AttentionBackend
from .features import PLAIN, LayerFeatures
from .halo import halo_backward, halo_forward
from .kv import KVLayout, pack_kv, unpack_kv
from .merge import accumulator_dtype, merge_attention
from .metadata import RingSegment


def _rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(0, index)


def _accumulate(acc: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor) -> None:
    if index is None:
        acc.add_(value.to(acc.dtype))
    else:
        acc.index_add_(0, index, value.to(acc.dtype))


def ring_forward(
    q, k, v, seg: RingSegment, scale: float, backend: AttentionBackend, mesh, features: LayerFeatures = PLAIN
):
    """Output ``[n, Hq, Dv]`` and log-sum-exp ``[n, Hq]`` of this member's rows, in the accumulator dtype."""
    mask = seg.layer_mask(features.mask)
    if not mask.full:
        return halo_forward(q, k, v, seg, mask, scale, backend, mesh, features.softcap)
    kernel = features.kernel(window=False)
    n, hq = q.shape[:2]
    layout = KVLayout.of(k, v)
    acc = accumulator_dtype(q)
    out = torch.zeros(n, hq, layout.v_dim, dtype=acc, device=q.device)
    lse = torch.full((n, hq), float("-inf"), dtype=acc, device=q.device)
    kv = pack_kv(k, v)  # one message per hop
    for step in range(seg.k):
        pending = []
        if step + 1 < seg.k:
            incoming = torch.empty(seg.rows_of(seg.source_at(step + 1)), layout.width, dtype=kv.dtype, device=kv.device)
            pending = mesh.exchange(kv, seg.next_rank, incoming, seg.prev_rank, what=_label(seg, "forward K/V", step))
        block = seg.block(step, q.device)
        if not block.empty:
            src_k, src_v = unpack_kv(_rows(kv, block.kv_index), layout)
            b_out, b_lse = backend.forward(
                _rows(q, block.q_index),
                src_k,
                src_v,
                block.cu_q,
                block.cu_k,
                block.max_q,
                block.max_k,
                block.causal,
                scale,
                **kernel,
            )
            if block.q_index is None:
                out, lse = merge_attention(out, lse, b_out, b_lse)
            else:
                m_out, m_lse = merge_attention(
                    out.index_select(0, block.q_index), lse.index_select(0, block.q_index), b_out, b_lse
                )
                out.index_copy_(0, block.q_index, m_out)
                lse.index_copy_(0, block.q_index, m_lse)
        if pending:
            mesh.wait(pending)
            kv = incoming
    return out, lse


def ring_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    seg: RingSegment,
    scale: float,
    backend: AttentionBackend,
    mesh,
    features: LayerFeatures = PLAIN,
):
    """Gradients of this member's q, k, v rows, in the accumulator dtype."""
    mask = seg.layer_mask(features.mask)
    if not mask.full:
        return halo_backward(dout, q, k, v, out, lse, seg, mask, scale, backend, mesh, features.softcap)
    kernel = features.kernel(window=False)
    layout = KVLayout.of(k, v)
    acc = accumulator_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = pack_kv(k, v)
    dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # gradient of the K/V we hold (packed the same way)
    for step in range(seg.k):
        pending = []
        if step + 1 < seg.k:
            incoming = torch.empty(seg.rows_of(seg.source_at(step + 1)), layout.width, dtype=kv.dtype, device=kv.device)
            pending = mesh.exchange(kv, seg.next_rank, incoming, seg.prev_rank, what=_label(seg, "backward K/V", step))
        block = seg.block(step, q.device)
        if not block.empty:
            src_k, src_v = unpack_kv(_rows(kv, block.kv_index), layout)
            b_dq, b_dk, b_dv = backend.backward(
                _rows(dout, block.q_index),
                _rows(q, block.q_index),
                src_k,
                src_v,
                _rows(out, block.q_index),
                _rows(lse, block.q_index),
                block.cu_q,
                block.cu_k,
                block.max_q,
                block.max_k,
                block.causal,
                scale,
                **kernel,
            )
            _accumulate(dq, block.q_index, b_dq)
            _accumulate(dkv, block.kv_index, pack_kv(b_dk, b_dv))
        if pending:
            mesh.wait(pending)
            kv = incoming
        if seg.k > 1:
            # pass the accumulator on with the K/V it belongs to; receive the one for our next K/V
            # (after the last hop that is the complete gradient of our own K/V)
            nxt = seg.source_at(step + 1)
            dkv_in = torch.empty(seg.rows_of(nxt), layout.width, dtype=acc, device=kv.device)
            mesh.wait(
                mesh.exchange(dkv, seg.next_rank, dkv_in, seg.prev_rank, what=_label(seg, "backward dK/dV", step))
            )
            dkv = dkv_in
    return (dq, *unpack_kv(dkv, layout))


def _label(seg: RingSegment, what: str, step: int) -> str:
    return (
        f"{what} (global step {seg.step}, slot {seg.slot}, ring hop {step}, group {list(seg.group)}, "
        f"samples {list(seg.samples)})"
    )
