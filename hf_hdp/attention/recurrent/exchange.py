"""Row messages between the members of a group, as one autograd node: the P2P of the state-carrying layers.

A state-carrying layer's split (:mod:`.split`) moves three kinds of message over the one global group's
bounded P2P (:meth:`hf_hdp.distributed.mesh.DynamicMesh.exchange`): convolution halos, chunk states, and the rows of
head shards. Each is a list of *moves*; move ``i`` of a member sends a tensor to one rank and receives one
from another (either side may be empty, which both partners know from the same metadata), and the
partner of every move runs it in the same order, so no placement deadlocks.

:class:`Exchange` runs a layer's moves of one phase, for all its segments in metadata order, in one
autograd node; its backward runs the same moves in the same order with the roles swapped: the gradient
of each received tensor goes back to its sender, and each sent tensor's gradient comes back from its
receiver. ``after`` tensors are not sent: they make this node's backward run before the backward of the
node that produced them (a fixed order of phases on every member, whatever else its graph holds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Move:
    """Send ``send`` (an index into the node's tensors, or ``None``) to rank ``dst``; receive a tensor of
    ``shape`` (or nothing: ``None``) from rank ``src``."""

    dst: int
    send: int | None
    src: int
    shape: tuple[int, ...] | None
    what: str


def group_rounds(group: tuple[int, ...], member: int):
    """``(dst_member, src_member)`` of the ``k - 1`` pairwise rounds of an all-to-all (round ``r``: send to
    ``member + r``, receive from ``member - r``)."""
    k = len(group)
    return [((member + r) % k, (member - r) % k) for r in range(1, k)]


class Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, moves, mesh, dtype, n_sends, *tensors):
        sends = tensors[:n_sends]
        device = tensors[0].device
        received = []
        for mv in moves:
            send = sends[mv.send] if mv.send is not None else None
            recv = None if mv.shape is None else torch.empty(mv.shape, dtype=dtype, device=device)
            mesh.wait(mesh.exchange(send, mv.dst, recv, mv.src, what=mv.what))
            if recv is not None:
                received.append(recv)
        ctx.moves, ctx.mesh, ctx.n_sends, ctx.n_after = moves, mesh, n_sends, len(tensors) - n_sends
        ctx.send_shapes = [t.shape for t in sends]
        ctx.dtype, ctx.device = dtype, device
        # a scalar the caller adds (times zero) to its output: this node's backward runs on every member that
        # ran its forward, also one that received nothing (its partners wait for its gradients)
        return (*received, torch.zeros((), dtype=dtype, device=device))

    @staticmethod
    def backward(ctx, *grads):
        d_sends = [torch.zeros(s, dtype=ctx.dtype, device=ctx.device) for s in ctx.send_shapes]
        at = 0
        for mv in ctx.moves:
            back = None
            if mv.shape is not None:
                back = grads[at] if grads[at] is not None else torch.zeros(mv.shape, dtype=ctx.dtype, device=ctx.device)
                at += 1
            recv = None if mv.send is None else torch.empty_like(d_sends[mv.send])
            # the roles swap: our receive's gradient goes to its sender, our send's gradient comes from its receiver
            ctx.mesh.wait(ctx.mesh.exchange(back, mv.src, recv, mv.dst, what=f"{mv.what} (backward)"))
            if recv is not None:
                d_sends[mv.send] += recv
        return (None, None, None, None, *d_sends, *([None] * ctx.n_after))


def exchange(moves: list[Move], sends: list[torch.Tensor], mesh, after: tuple[torch.Tensor, ...]):
    """Run ``moves`` (see :class:`Exchange`); returns the received tensors in move order, then a zero scalar
    to add to the output. ``after`` must hold at least one tensor (the dtype and device of the messages)."""
    return Exchange.apply(moves, mesh, after[0].dtype, len(sends), *sends, *after)
