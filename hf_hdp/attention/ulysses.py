"""Head-parallel (Ulysses) attention of one sequence over a group of ranks, with P2P on the one global group.

The ring (:mod:`hf_hdp.attention.ring`) moves every member's K/V past every other member, so each
member's traffic is about the whole sequence's K/V whatever the group size. Ulysses (DeepSpeed-Ulysses,
Jacobs et al. 2023) splits the *heads* instead: member ``j`` of a group of ``u`` gathers the whole
sequence for its ``Hq / u`` query heads (and the K/V heads they use), runs one local causal kernel
over the whole sequence, and sends each member its rows back. Per member that is about ``1/u`` of
the sequence's Q, K, V and output in each direction, so traffic falls with the degree.

Read top to bottom:

- :func:`head_split`: which query and K/V heads member ``j`` computes. The degree must divide the
  query heads. GQA with fewer K/V heads than the degree replicates K/V heads (members whose query
  heads share a K/V head each receive it); a K/V grouping that does not align with the split sends
  one K/V head per query head. Either way the replicated traffic is real and counted.
- :func:`all_to_all`: ``u - 1`` rounds of pairwise exchanges (round ``r``: send to member
  ``i + r``, receive from ``i - r``), every member in the same order, over the mesh's bounded P2P.
- :class:`UlyssesAttention`: forward (rows → heads, local kernel, heads → rows) and backward (the
  same two all-to-alls around the backend's backward; the gradients of replicated K/V heads are
  summed back onto the head they copy).

A sequence's rows lie on its members in contiguous shards, member ``i`` holding ``shards[i]`` rows
in sequence order, so the gathered sequence is the members' shards end to end and causal balance is
free: every member computes the whole sequence for its heads.

This is the head-parallel piece of issue 11 at kernel level; planning Ulysses and hybrid pieces per
sample, and their metadata in the collator, come next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import AttentionBackend


@dataclass(frozen=True)
class HeadSplit:
    """Member ``j``'s heads: query heads ``[q_start, q_stop)`` and, for each of them in order, the K/V
    head it uses (``kv_heads``: the distinct K/V heads sent to the member; ``kv_of_query[t]``: the index
    into ``kv_heads`` that local query head ``t`` uses)."""

    q_start: int
    q_stop: int
    kv_heads: tuple[int, ...]

    @property
    def num_q(self) -> int:
        return self.q_stop - self.q_start


def head_split(num_q_heads: int, num_kv_heads: int, degree: int) -> list[HeadSplit]:
    """Every member's heads for a Ulysses group of ``degree`` (see the module docstring)."""
    if degree < 1 or num_q_heads % degree:
        raise ValueError(
            f"a Ulysses degree of {degree} must divide the {num_q_heads} query heads; use a degree that divides them "
            "(or a ring for this sample)"
        )
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"the query heads ({num_q_heads}) must be a multiple of the key/value heads ({num_kv_heads})")
    per, group = num_q_heads // degree, num_q_heads // num_kv_heads
    splits = []
    for j in range(degree):
        start, stop = j * per, (j + 1) * per
        used = [h // group for h in range(start, stop)]
        distinct = tuple(sorted(set(used)))
        # the backend maps local query head t to K/V head t // (per / len(kv)): that must be the one it uses
        ratio = per // len(distinct) if per % len(distinct) == 0 else 0
        if not ratio or any(distinct[t // ratio] != used[t] for t in range(per)):
            distinct = tuple(used)  # one K/V head per query head: always right, more traffic
        splits.append(HeadSplit(start, stop, distinct))
    return splits


def all_to_all(mesh, group: tuple[int, ...], member: int, sends: list[torch.Tensor],
               receives: list[torch.Tensor], what: str) -> None:
    """Member ``member`` of ``group`` sends ``sends[j]`` to member ``j`` and receives ``receives[j]``
    from member ``j`` (its own part is copied), in ``len(group) - 1`` pairwise rounds."""
    u = len(group)
    receives[member].copy_(sends[member])
    for r in range(1, u):
        dst, src = (member + r) % u, (member - r) % u
        handles = mesh.exchange(sends[dst], group[dst], receives[src], group[src], what=f"{what}, round {r}")
        mesh.wait(handles)


def _kv_rows(x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    return x.index_select(1, torch.tensor(heads, device=x.device)).contiguous()


class UlyssesAttention(torch.autograd.Function):
    """Causal attention of one sequence split over ``group`` in row shards ``shards``, by heads.

    ``q`` ``[n, Hq, D]``, ``k``/``v`` ``[n, Hkv, D]``: this member's rows. Returns ``[n, Hq, D]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, group: tuple[int, ...], member: int, shards: tuple[int, ...], scale: float,
                backend: AttentionBackend, mesh):
        u, n, hq, d = len(group), q.shape[0], q.shape[1], q.shape[2]
        hkv = k.shape[1]
        if len(shards) != u or shards[member] != n:
            raise ValueError(f"member {member} holds {n} rows but the shards are {shards} for a group of {u}")
        splits = head_split(hq, hkv, u)
        mine = splits[member]
        s = sum(shards)
        offsets = [sum(shards[:i]) for i in range(u)]
        # rows -> heads: member j gets this member's rows of its query heads and of the K/V heads they use
        q_parts = [torch.empty(shards[i], mine.num_q, d, dtype=q.dtype, device=q.device) for i in range(u)]
        all_to_all(mesh, group, member, [q[:, sp.q_start : sp.q_stop].contiguous() for sp in splits], q_parts,
                   "Ulysses forward Q")
        kv_send = [torch.cat([_kv_rows(k, sp.kv_heads), _kv_rows(v, sp.kv_heads)], dim=1) for sp in splits]
        nkv = len(mine.kv_heads)
        kv_parts = [torch.empty(shards[i], 2 * nkv, d, dtype=k.dtype, device=k.device) for i in range(u)]
        all_to_all(mesh, group, member, kv_send, kv_parts, "Ulysses forward K/V")
        q_all = torch.cat(q_parts)
        kv_all = torch.cat(kv_parts)
        k_all, v_all = kv_all[:, :nkv].contiguous(), kv_all[:, nkv:].contiguous()
        cu = torch.tensor([0, s], dtype=torch.int32, device=q.device)
        with torch.no_grad():
            out_all, lse_all = backend.forward(q_all, k_all, v_all, cu, cu, s, s, True, scale)
        out_all = out_all.to(q.dtype)
        # heads -> rows: member i gets its rows of this member's heads
        back = [torch.empty(n, sp.num_q, d, dtype=q.dtype, device=q.device) for sp in splits]
        all_to_all(mesh, group, member, [out_all[offsets[i] : offsets[i] + shards[i]].contiguous() for i in range(u)],
                   back, "Ulysses forward output")
        out = torch.cat(back, dim=1)
        ctx.save_for_backward(q_all, k_all, v_all, out_all, lse_all)
        ctx.args = (group, member, shards, scale, backend, mesh, splits, hkv)
        return out

    @staticmethod
    def backward(ctx, dout):
        q_all, k_all, v_all, out_all, lse_all = ctx.saved_tensors
        group, member, shards, scale, backend, mesh, splits, hkv = ctx.args
        u, n, d = len(group), dout.shape[0], dout.shape[2]
        mine, s = splits[member], sum(shards)
        offsets = [sum(shards[:i]) for i in range(u)]
        parts = [torch.empty(shards[i], mine.num_q, d, dtype=dout.dtype, device=dout.device) for i in range(u)]
        all_to_all(mesh, group, member, [dout[:, sp.q_start : sp.q_stop].contiguous() for sp in splits], parts,
                   "Ulysses backward dO")
        cu = torch.tensor([0, s], dtype=torch.int32, device=dout.device)
        dq_all, dk_all, dv_all = backend.backward(torch.cat(parts), q_all, k_all, v_all, out_all, lse_all, cu, cu,
                                                  s, s, True, scale)
        # heads -> rows: dQ of this member's heads, dK/dV of the K/V heads it received
        dq_back = [torch.empty(n, sp.num_q, d, dtype=dq_all.dtype, device=dout.device) for sp in splits]
        all_to_all(mesh, group, member, [dq_all[offsets[i] : offsets[i] + shards[i]].contiguous() for i in range(u)],
                   dq_back, "Ulysses backward dQ")
        dkv_all = torch.cat([dk_all, dv_all], dim=1)
        dkv_back = [torch.empty(n, 2 * len(sp.kv_heads), d, dtype=dkv_all.dtype, device=dout.device) for sp in splits]
        all_to_all(mesh, group, member, [dkv_all[offsets[i] : offsets[i] + shards[i]].contiguous() for i in range(u)],
                   dkv_back, "Ulysses backward dK/dV")
        dq = torch.cat(dq_back, dim=1)
        dk = torch.zeros(n, hkv, d, dtype=dkv_all.dtype, device=dout.device)
        dv = torch.zeros_like(dk)
        for sp, got in zip(splits, dkv_back):
            index = torch.tensor(sp.kv_heads, device=dout.device)
            m = len(sp.kv_heads)
            dk.index_add_(1, index, got[:, :m])  # a replicated K/V head's gradients are summed onto it
            dv.index_add_(1, index, got[:, m:])
        return dq, dk, dv, None, None, None, None, None, None


def ulysses_attention(q, k, v, group: tuple[int, ...], member: int, shards: tuple[int, ...], scale: float,
                      backend: AttentionBackend, mesh) -> torch.Tensor:
    """Head-parallel causal attention of one sequence over ``group`` (see :class:`UlyssesAttention`)."""
    return UlyssesAttention.apply(q, k, v, tuple(group), int(member), tuple(shards), float(scale), backend, mesh)
