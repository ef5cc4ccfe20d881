"""Windowed and chunked layers of a distributed segment: each member receives only the K/V rows it can see.

A full causal layer of a ring segment runs the relay ring (:mod:`.ring`): every member's K/V passes
every other member. A sliding-window or chunked layer sees far less: with a window ``w`` much shorter
than the zigzag chunks, a member's rows see only their own chunks and the last ``w - 1`` rows of the
chunk just before each of them; with chunked attention, only the rows of the same attention chunk.
:mod:`hf_hdp.planning.reach` computes, from the segment's layout alone, which rows member ``i`` needs
from member ``j`` (:func:`~hf_hdp.planning.reach.needed_rows`) and the pairs of zigzag chunks it
computes with them; both partners of a message compute the same sets, so they agree on every message
without talking about it, and a message of no rows is not sent at all.

Forward, member ``i`` of ``k``: for ``t = 1 .. k-1``, ONE message to member ``i + t`` with the rows of
its K and V that member needs, and one from ``i - t`` with the rows of its K/V we need, pairwise
(``batch_isend_irecv`` on the one global group, every member in the same round order, so it cannot
deadlock); round ``t + 1`` is in flight while round ``t``'s blocks compute. Blocks are pairs of chunks
with their positions (the backend contract's ``positions``/``window``/``softcap``), merged with the
log-sum-exp rule exactly like the ring's.

Backward: the same K/V messages again (nothing of the forward is kept, as in the ring), each block's
``dQ`` added to ours, and the ``dK``/``dV`` of the received rows sent straight back to their owner in
the accumulator dtype, which adds them to its own. Bytes per layer of member ``i``: K/V
``2 · Σ_m |needed(m ← i)|`` rows, dK/dV ``Σ_j |needed(i ← j)|`` rows; the planner prices exactly that
(:meth:`~hf_hdp.planning.cost.CostModel.segment_bytes_by_member`).
"""

from __future__ import annotations

import torch

from ..planning.reach import LayerMask
from .kv import KVLayout, pack_kv, unpack_kv
from .merge import accumulator_dtype, merge_attention
from .metadata import RingSegment


def _rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(0, index)


def _label(seg: RingSegment, what: str, step: int) -> str:
    return (
        f"windowed {what} (global step {seg.step}, slot {seg.slot}, round {step}, group {list(seg.group)}, "
        f"samples {list(seg.samples)})"
    )


def _exchange_kv(seg: RingSegment, kv: torch.Tensor, step: int, mask: LayerMask, mesh, what: str):
    """Start round ``step``: our rows that member ``i + step`` needs out, the rows of ``i - step`` we need in.
    Returns ``(handles, buffer or None)``."""
    send_index = seg.reach_send(step, mask, kv.device)
    n_in = seg.reach_recv(step, mask)
    send = None if send_index is None else kv.index_select(0, send_index)
    recv = None if n_in == 0 else kv.new_empty(n_in, *kv.shape[1:])  # packed rows (:mod:`.kv`)
    handles = mesh.exchange(send, seg.next_at(step), recv, seg.prev_at(step), what=_label(seg, what, step))
    return handles, recv


def halo_forward(q, k, v, seg: RingSegment, mask: LayerMask, scale: float, backend, mesh, softcap: float | None):
    """Output ``[n, Hq, Dv]`` and log-sum-exp ``[n, Hq]`` of this member's rows under ``mask``, accumulator dtype."""
    kernel = {"window": mask.window, "softcap": softcap}
    n, hq = q.shape[:2]
    layout = KVLayout.of(k, v)
    acc = accumulator_dtype(q)
    out = torch.zeros(n, hq, layout.v_dim, dtype=acc, device=q.device)
    lse = torch.full((n, hq), float("-inf"), dtype=acc, device=q.device)
    kv = pack_kv(k, v)
    buffer = kv
    for step in range(seg.k):
        nxt, nxt_buffer = [], None
        if step + 1 < seg.k:
            nxt, nxt_buffer = _exchange_kv(seg, kv, step + 1, mask, mesh, "forward K/V")
        if buffer is not None:
            for block in seg.reach_blocks(step, mask, q.device):
                src_k, src_v = unpack_kv(_rows(buffer, block.kv_index), layout)
                b_out, b_lse = backend.forward(
                    _rows(q, block.q_index),
                    src_k,
                    src_v,
                    block.cu_q,
                    block.cu_k,
                    block.max_q,
                    block.max_k,
                    True,
                    scale,
                    positions=block.positions,
                    **kernel,
                )
                m_out, m_lse = merge_attention(
                    out.index_select(0, block.q_index), lse.index_select(0, block.q_index), b_out, b_lse
                )
                out.index_copy_(0, block.q_index, m_out)
                lse.index_copy_(0, block.q_index, m_lse)
        mesh.wait(nxt)
        buffer = nxt_buffer
    return out, lse


def halo_backward(
    dout, q, k, v, out, lse, seg: RingSegment, mask: LayerMask, scale: float, backend, mesh, softcap: float | None
):
    """Gradients of this member's q, k, v rows under ``mask``, in the accumulator dtype."""
    kernel = {"window": mask.window, "softcap": softcap}
    layout = KVLayout.of(k, v)
    acc = accumulator_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = pack_kv(k, v)
    dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
    for step in range(seg.k):
        if step == 0:
            buffer, d_buffer = kv, dkv
        else:
            handles, buffer = _exchange_kv(seg, kv, step, mask, mesh, "backward K/V")
            mesh.wait(handles)
            d_buffer = None if buffer is None else torch.zeros(buffer.shape, dtype=acc, device=kv.device)
        if buffer is not None:
            for block in seg.reach_blocks(step, mask, q.device):
                src_k, src_v = unpack_kv(_rows(buffer, block.kv_index), layout)
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
                    True,
                    scale,
                    positions=block.positions,
                    **kernel,
                )
                dq.index_add_(0, block.q_index, b_dq.to(acc))
                d_buffer.index_add_(0, block.kv_index, pack_kv(b_dk, b_dv).to(acc))
        if step == 0:
            continue
        # the dK/dV of the rows we received go back to their owner; ours come back from those we sent rows to
        send_index = seg.reach_send(step, mask, kv.device)
        back = (
            None if send_index is None else torch.empty(send_index.numel(), *kv.shape[1:], dtype=acc, device=kv.device)
        )
        mesh.wait(
            mesh.exchange(
                d_buffer, seg.prev_at(step), back, seg.next_at(step), what=_label(seg, "backward dK/dV", step)
            )
        )
        if back is not None:
            dkv.index_add_(0, send_index, back)
    return (dq, *unpack_kv(dkv, layout))
