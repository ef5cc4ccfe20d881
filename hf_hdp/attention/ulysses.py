"""Head-parallel (Ulysses) and hybrid attention of one segment over a group of ranks, with P2P on the one global group.

The ring (:mod:`hf_hdp.attention.ring`) moves every member's K/V past every other member, so each
member's traffic is about the whole sequence's K/V whatever the group size. Ulysses (DeepSpeed-Ulysses,
Jacobs et al. 2023) splits the *heads* instead: sub-member ``j`` of a sub-group of ``u`` gathers its
position's rows for its ``Hq / u`` query heads (and the K/V heads they use), attends, and sends each
sub-member its rows back. Per member that is about ``1/u`` of the rows' Q, K, V and output in each
direction, so traffic falls with the degree.

A *hybrid* piece (USP, Fang and Zhao 2024; LoongTrain, Gu et al. 2024) of ``k = u x r`` ranks is a
zigzag ring over ``r`` positions, each position one Ulysses sub-group (:mod:`hf_hdp.planning.layout`).
After the all-to-all, sub-member ``j`` of every position holds its position's whole rows for head
slice ``j``, and the ``r`` sub-members ``j`` run the zigzag ring (:func:`~.ring.ring_forward`) for
those heads; each ring member's traffic is ``1/u`` of a plain ring's. Pure Ulysses is ``r = 1``: the
"ring" is one causal kernel over the whole sequence, and causal balance is free.

Read top to bottom:

- :func:`all_to_all`: ``u - 1`` rounds of pairwise exchanges (round ``t``: send to sub-member
  ``j + t``, receive from ``j - t``), every member in the same order, over the mesh's bounded P2P.
- :func:`ulysses_forward`: rows to heads (Q, then K/V as one message, each at its own head size:
  :mod:`.kv`), the ring over the positions, heads back to rows (the output, at V's head size).
- :func:`ulysses_backward`: dO to heads, the ring's backward, dQ and dK/dV back to rows in the
  accumulator dtype; the gradients of replicated K/V heads are summed back onto the head they copy.

Heads: :func:`~hf_hdp.planning.layout.head_split`. The degree must divide the query heads; GQA with
fewer K/V heads than the degree replicates K/V heads, and that traffic is real and counted.
"""

from __future__ import annotations

import torch

from ..planning.layout import head_split
from .features import PLAIN, LayerFeatures
from .kv import KVLayout, pack_kv, unpack_kv
from .merge import accumulator_dtype
from .metadata import UlyssesSegment
from .ring import ring_backward, ring_forward
from .sinks import merge_sinks, sink_grad


def all_to_all(
    mesh, group: tuple[int, ...], member: int, sends: list[torch.Tensor], receives: list[torch.Tensor], what: str
) -> None:
    """Member ``member`` of ``group`` sends ``sends[j]`` to member ``j`` and receives ``receives[j]``
    from member ``j`` (its own part is copied), in ``len(group) - 1`` pairwise rounds."""
    u = len(group)
    receives[member].copy_(sends[member])
    for r in range(1, u):
        dst, src = (member + r) % u, (member - r) % u
        mesh.wait(mesh.exchange(sends[dst], group[dst], receives[src], group[src], what=f"{what}, round {r}"))


def _kv_heads(x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    return x.index_select(1, torch.tensor(heads, device=x.device))


def _rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(0, index)


def _label(seg: UlyssesSegment, what: str) -> str:
    return (
        f"Ulysses {what} (global step {seg.step}, slot {seg.slot}, sub-group {list(seg.subgroup)} of group "
        f"{list(seg.group)}, samples {list(seg.samples)})"
    )


def _to_heads(seg: UlyssesSegment, x: torch.Tensor, pick, shape: tuple[int, ...], what: str, mesh) -> torch.Tensor:
    """This member's rows ``x`` to its position's rows of its own heads: sub-member ``j`` gets ``pick(x, j)``
    (rows of ``shape`` for this member), received in sub-member order, then put in position row order."""
    j, u = seg.sub_member, seg.ulysses
    parts = [x.new_empty(seg.rows_from(i), *shape) for i in range(u)]
    all_to_all(mesh, seg.subgroup, j, [pick(x, i).contiguous() for i in range(u)], parts, _label(seg, what))
    return _rows(torch.cat(parts), seg.position_index(x.device))


def _to_rows(
    seg: UlyssesSegment, x: torch.Tensor, shapes: list[tuple[int, ...]], what: str, mesh
) -> list[torch.Tensor]:
    """The position's rows ``x`` of this member's heads back to their sub-members; returns, per sub-member
    ``i``, this member's rows of ``i``'s heads (rows of ``shapes[i]``)."""
    j, u = seg.sub_member, seg.ulysses
    x = _rows(x, seg.concat_index(x.device))
    sends, at = [], 0
    for i in range(u):
        sends.append(x[at : at + seg.rows_from(i)].contiguous())
        at += seg.rows_from(i)
    n = seg.rows_from(j)
    back = [x.new_empty(n, *shapes[i]) for i in range(u)]
    all_to_all(mesh, seg.subgroup, j, sends, back, _label(seg, what))
    return back


def ulysses_forward(
    q,
    k,
    v,
    seg: UlyssesSegment,
    scale: float,
    backend,
    mesh,
    features: LayerFeatures = PLAIN,
    sinks: torch.Tensor | None = None,
):
    """This member's output rows ``[n, Hq, Dv]`` (``q``'s dtype), and what :func:`ulysses_backward` needs.

    The ring over the positions runs the layer's ``features`` (a windowed layer exchanges only what its
    window reaches); ``sinks`` (``[Hq]``) are merged into this member's head slice after it."""
    hq, dq_dim = q.shape[1:]
    layout = KVLayout.of(k, v)
    splits = head_split(hq, layout.heads, seg.ulysses)
    mine = splits[seg.sub_member]
    mine_kv = layout.with_heads(len(mine.kv_heads))
    q_pos = _to_heads(
        seg, q, lambda x, i: x[:, splits[i].q_start : splits[i].q_stop], (mine.num_q, dq_dim), "forward Q", mesh
    )
    kv_pos = _to_heads(
        seg,
        k,
        lambda x, i: pack_kv(_kv_heads(k, splits[i].kv_heads), _kv_heads(v, splits[i].kv_heads)),
        (mine_kv.width,),
        "forward K/V",
        mesh,
    )
    k_pos, v_pos = (t.contiguous() for t in unpack_kv(kv_pos, mine_kv))
    out_pos, lse_pos = ring_forward(q_pos, k_pos, v_pos, seg.ring, scale, backend, mesh, features)
    if sinks is not None:
        out_pos, lse_pos = merge_sinks(out_pos, lse_pos, sinks[mine.q_start : mine.q_stop])
    out_pos = out_pos.to(q.dtype)
    back = _to_rows(seg, out_pos, [(sp.num_q, layout.v_dim) for sp in splits], "forward output", mesh)
    return torch.cat(back, dim=1), (q_pos, k_pos, v_pos, out_pos, lse_pos)


def ulysses_backward(
    dout,
    saved,
    seg: UlyssesSegment,
    scale: float,
    backend,
    mesh,
    num_kv_heads: int,
    features: LayerFeatures = PLAIN,
    sinks: torch.Tensor | None = None,
):
    """Gradients of this member's q, k, v rows, in the accumulator dtype, and of the sinks (``None`` without):
    this member's head slice's share, zero for the other heads."""
    q_pos, k_pos, v_pos, out_pos, lse_pos = saved
    hq, v_dim = dout.shape[1:]
    layout = KVLayout(num_kv_heads, k_pos.shape[2], v_pos.shape[2])
    splits = head_split(hq, num_kv_heads, seg.ulysses)
    mine = splits[seg.sub_member]
    dout_pos = _to_heads(
        seg, dout, lambda x, i: x[:, splits[i].q_start : splits[i].q_stop], (mine.num_q, v_dim), "backward dO", mesh
    )
    dq_pos, dk_pos, dv_pos = ring_backward(
        dout_pos, q_pos, k_pos, v_pos, out_pos, lse_pos, seg.ring, scale, backend, mesh, features
    )
    d_sinks = None
    if sinks is not None:
        d_sinks = torch.zeros_like(sinks)
        d_sinks[mine.q_start : mine.q_stop] = sink_grad(dout_pos, out_pos, lse_pos, sinks[mine.q_start : mine.q_stop])
    dq = torch.cat(_to_rows(seg, dq_pos, [(sp.num_q, layout.k_dim) for sp in splits], "backward dQ", mesh), dim=1)
    got = _to_rows(
        seg,
        pack_kv(dk_pos, dv_pos),
        [(layout.with_heads(len(sp.kv_heads)).width,) for sp in splits],
        "backward dK/dV",
        mesh,
    )
    n = dout.shape[0]
    acc = accumulator_dtype(dout)
    dk = torch.zeros(n, num_kv_heads, layout.k_dim, dtype=acc, device=dout.device)
    dv = torch.zeros(n, num_kv_heads, layout.v_dim, dtype=acc, device=dout.device)
    for sp, g in zip(splits, got):
        index = torch.tensor(sp.kv_heads, device=dout.device)
        g_k, g_v = unpack_kv(g, layout.with_heads(len(sp.kv_heads)))
        dk.index_add_(1, index, g_k.to(acc))  # a replicated K/V head's gradients are summed onto it
        dv.index_add_(1, index, g_v.to(acc))
    return dq, dk, dv, d_sinks
