"""One step's gradient reduction, bucket by bucket, started while the last backward still runs.

HDP ranks run different numbers of micro-batches, so the gradients can be reduced only once a
rank's last micro-batch is done; but the buckets of that last backward need not wait for all of
it. :class:`GradientReduction` holds the step's buckets (:func:`~hf_hdp.distributed.buckets.plan_buckets`:
the same on every rank) and sends them in one fixed order, the **reverse** of the parameters'
order, which is the order backward makes their gradients ready (the head's first, the embeddings'
last):

1. before the last micro-batch's backward, :meth:`GradientReduction.watch` hooks every parameter
   (``register_post_accumulate_grad_hook``: called once a parameter's gradient of this backward has
   been added to ``.grad``); a bucket whose parameters are all done, and every bucket before it in
   the order, starts at once, asynchronously, while backward goes on with the earlier layers;
2. :meth:`GradientReduction.finish` starts the rest (a rank without a micro-batch starts all of
   them here, with zeros for the gradients it does not have), waits for each bucket within the
   mesh's bound, and returns the extras' sums.

Every rank starts the same collectives in the same order, whatever its micro-batches: the order
is fixed by the layout, and a bucket starts only after all buckets before it. The scalars that
ride along (the step's loss, P2P bytes and label count) are known only after the backward, so
the bucket that holds them is sent last (bucket 0 of an all-reduce; a reduce-scatter's last). At most :data:`MAX_IN_FLIGHT` buckets are in flight: the
oldest is waited for before another starts, so the buffers alive at once stay a few buckets, never
a second copy of the gradients; inside backward nothing waits (a ring partner may need this
rank's next P2P message before it reaches the reduction): with the buckets in flight not done yet,
the next ones wait for a later hook or for :meth:`finish`. A bucket that is one piece of one
gradient is reduced in place.

A parameter whose gradient changes after its bucket was sent (a hook firing twice for it in one
backward) would be reduced wrongly; that is refused at :meth:`finish`, naming the parameter, with
``HDPConfig(overlap_grad_reduction=False)`` as the fix.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

import torch

from .buckets import pack, plan_buckets, unpack

MAX_IN_FLIGHT = 2
"""Buckets in flight at once: starting another waits for the oldest."""


class GradientReduction:
    """The step's bucketed gradient sum over all ranks (see the module docstring).

    ``owners=None``: all-reduces; ``owners[i]``: the rank that keeps ``params[i]``'s summed gradient
    (ZeRO stage 2, reduce-scatters; ``None`` in it: every rank keeps that one). ``num_extras``
    scalars ride along (their values go to :meth:`finish`).
    """

    def __init__(
        self,
        mesh,
        params: list[torch.nn.Parameter],
        owners: Sequence[int | None] | None = None,
        num_extras: int = 0,
        step: int | None = None,
    ):
        self.mesh, self.params, self.step = mesh, list(params), step
        self.sharded = owners is not None
        if self.sharded and len(owners) != len(self.params):
            raise ValueError(f"reduce_gradients: {len(owners)} owners for {len(self.params)} parameters")
        # the extras' dtype must not depend on which gradients exist: every rank sends the same bytes
        self.extras_dtype = torch.float32
        for p in self.params:
            self.extras_dtype = torch.promote_types(self.extras_dtype, p.dtype)
        self.num_extras = num_extras
        # tensor 0: the extras (first, so in bucket 0 of an all-reduce); tensor i + 1: params[i]
        specs = [(num_extras, self.extras_dtype)] + [(p.numel(), p.dtype) for p in self.params]
        self.holders = [None, *owners] if self.sharded else None
        self.buckets = plan_buckets(specs, mesh.bucket_bytes, self.holders, mesh.world_size)
        members = [sorted({s.tensor for chunk in b.chunks for s in chunk}) for b in self.buckets]
        backwards = list(range(len(self.buckets)))[::-1]  # the extras' bucket(s) last: known only at the end
        self.order = [b for b in backwards if 0 not in members[b]] + [b for b in backwards if 0 in members[b]]
        self.position = {b: i for i, b in enumerate(self.order)}
        self.pending = [len(m) for m in members]  # tensors of each bucket whose gradient is not final yet
        self.buckets_of: dict[int, list[int]] = {}
        for b, tensors in enumerate(members):
            for t in tensors:
                self.buckets_of.setdefault(t, []).append(b)
        self.index = {id(p): i + 1 for i, p in enumerate(self.params)}
        self.flats: list[torch.Tensor | None] = [None] * len(specs)
        self.received: list[torch.Tensor | None] = [None] * len(specs)
        self.prepared: set[int] = set()
        self.next = 0  # position in self.order of the next bucket to start
        self.sent: set[int] = set()
        self.in_flight: deque = deque()
        self.started_in_backward = 0  # buckets started by the hooks (for tests and benchmarks)
        self.late: list[int] = []  # parameters whose gradient changed after their bucket was sent

    # ------------------------------------------------------------ the last backward
    @contextlib.contextmanager
    def watch(self):
        """Around the last micro-batch's backward: buckets start as their gradients become final."""
        if self.mesh.world_size == 1:
            yield
            return
        handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, param) -> None:
        t = self.index[id(param)]
        if any(b in self.sent for b in self.buckets_of.get(t, ())):
            self.late.append(t - 1)
            return
        for b in self.buckets_of.get(t, ()):
            self.pending[b] -= 1
        # never wait inside backward: a ring partner may need this rank's next P2P before it reaches the
        # reduction, so only buckets already done are collected here, and a bucket starts only with room
        while self.in_flight and self.mesh._done(self.in_flight[0][3]):
            self._complete(self.in_flight.popleft())
        while (
            self.next < len(self.order)
            and self.pending[self.order[self.next]] <= 0
            and len(self.in_flight) < MAX_IN_FLIGHT
        ):
            self._start(self.order[self.next])
            self.next += 1
            self.started_in_backward += 1
            self.mesh.stats.buckets_started_in_backward += 1

    # ------------------------------------------------------------ buckets
    def _keeps(self, t: int) -> bool:
        return not self.sharded or self.holders[t] is None or self.holders[t] == self.mesh.rank

    def _prepare(self, t: int) -> None:
        """The flat gradient of tensor ``t`` (a zero one where this rank keeps it but has none)."""
        if t in self.prepared or t == 0:
            return
        self.prepared.add(t)
        p = self.params[t - 1]
        if p.grad is None and self._keeps(t):
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)  # it receives the sum
        elif p.grad is not None and not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        self.flats[t] = p.grad.view(-1) if p.grad is not None else None
        # a reduce-scatter's tensor that every rank keeps: its sums go apart, the values sent stay
        shared = self.sharded and self.holders[t] is None
        self.received[t] = torch.zeros_like(self.flats[t]) if shared and self.flats[t] is not None else self.flats[t]

    def _what(self, b: int) -> str:
        return f"gradient reduction, bucket {self.position[b] + 1} of {len(self.buckets)}"

    def _start(self, b: int) -> None:
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            self._complete(self.in_flight.popleft())
        bucket, mesh = self.buckets[b], self.mesh
        for chunk in bucket.chunks:
            for s in chunk:
                self._prepare(s.tensor)
        self.sent.add(b)
        if not self.sharded:
            (segments,) = bucket.chunks
            if len(segments) == 1:  # one piece of one gradient: reduced where it lies
                s = segments[0]
                work = mesh._start_all_reduce(self.flats[s.tensor][s.start : s.stop], self._what(b), self.step)
                self.in_flight.append((b, None, None, work))
                return
            buffer = mesh._buffer(bucket.numel, bucket.dtype)
            pack(buffer, segments, self.flats)
            self.in_flight.append((b, buffer, None, mesh._start_all_reduce(buffer, self._what(b), self.step)))
            return
        size = bucket.chunk_numel
        buffer = mesh._buffer(bucket.numel, bucket.dtype)
        for r, segments in enumerate(bucket.chunks):
            pack(buffer[r * size : (r + 1) * size], segments, self.flats)
        mine = mesh._buffer(size, bucket.dtype)
        self.in_flight.append((b, buffer, mine, mesh._start_reduce_scatter(mine, buffer, self._what(b), self.step)))

    def _complete(self, entry) -> None:
        b, buffer, mine, work = entry
        self.mesh._finish(work)
        bucket = self.buckets[b]
        if mine is not None:
            unpack(mine, bucket.chunks[self.mesh.rank], self.received)
        elif buffer is not None:
            unpack(buffer, bucket.chunks[0], self.flats)

    # ------------------------------------------------------------ the end
    def finish(self, extras: Sequence[float] = ()) -> list[float]:
        """Start the buckets not started yet, wait for all, and return the extras' sums. Every rank."""
        extras = [float(x) for x in extras]
        if len(extras) != self.num_extras:
            raise ValueError(f"{len(extras)} extras for a reduction planned with {self.num_extras}")
        mesh = self.mesh
        if self.step is not None:
            mesh.current_step = self.step
        if mesh.world_size == 1:
            return extras
        if self.late:
            names = ", ".join(f"{i} ({tuple(self.params[i].shape)})" for i in self.late[:5])
            raise RuntimeError(
                f"rank {mesh.rank}: the gradient of parameter(s) {names} changed after its bucket was sent to the "
                "other ranks (its gradient hook ran twice in one backward: a parameter used in two checkpointed "
                "segments, or a custom autograd setup), so the reduction would miss part of it; the optimizer step "
                "was not taken. Set HDPConfig(overlap_grad_reduction=False)."
            )
        if self.num_extras:
            self.flats[0] = torch.tensor(extras, dtype=self.extras_dtype, device=mesh.device)
            self.received[0] = torch.zeros_like(self.flats[0]) if self.sharded else self.flats[0]
        while self.next < len(self.order):
            self._start(self.order[self.next])
            self.next += 1
        while self.in_flight:
            self._complete(self.in_flight.popleft())
        if self.sharded:
            for t in range(1, len(self.flats)):
                p, owner = self.params[t - 1], self.holders[t]
                if owner is None:
                    if p.grad is not None:
                        p.grad.view(-1).copy_(self.received[t])
                elif owner != mesh.rank:
                    p.grad = None  # another rank's shard: its summed gradient lives there
        mesh.gradients_sharded = self.sharded
        return self.received[0].tolist() if self.num_extras else []
