"""Buckets of a bounded collective: how flattened tensors are cut into chunks of at most ``bucket_bytes``.

Pure layout, no communication: :func:`plan_buckets` depends only on the tensors' sizes and dtypes
(and, for a reduce-scatter or all-gather, on which rank keeps each tensor), so every rank computes
the same buckets in the same order. :class:`~hf_hdp.distributed.mesh.DynamicMesh` runs one collective per bucket
(the gradient reduction, ZeRO's weight all-gather) and packs tensors in and out of it with
:func:`pack` and :func:`unpack`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, stop)`` of the flattened tensor number ``tensor``, at ``offset`` in a bucket chunk."""

    tensor: int
    start: int
    stop: int
    offset: int


@dataclass(frozen=True)
class Bucket:
    """One collective of a bucketed reduction or gather, in one dtype.

    ``chunks[r]`` lists what lies in the ``r``-th chunk of ``chunk_numel`` elements: one chunk (an
    all-reduce: every rank sends and gets the same layout) or one per rank (a reduce-scatter or
    all-gather: chunk ``r`` is what rank ``r`` keeps, or sends). Unused elements of a chunk are zeros.
    """

    dtype: torch.dtype
    chunk_numel: int
    chunks: tuple[tuple[Segment, ...], ...]

    @property
    def numel(self) -> int:
        return self.chunk_numel * len(self.chunks)


def plan_buckets(
    tensors: Sequence[tuple[int, torch.dtype]],
    bucket_bytes: int,
    owners: Sequence[int | None] | None = None,
    world_size: int = 1,
) -> list[Bucket]:
    """Cut flattened tensors (``(numel, dtype)`` each) into buckets of at most ``bucket_bytes``.

    A pure function of its arguments, so every rank computes the same buckets, in the same order:
    per dtype (in order of first appearance), then tensor order. A tensor may span buckets.

    - ``owners=None``: one chunk per bucket, for an all-reduce.
    - ``owners[i]``: the rank that keeps tensor ``i`` (``None``: every rank keeps it). Each bucket
      has ``world_size`` chunks of at most ``bucket_bytes / world_size``; rank ``r``'s chunks hold,
      in order, the tensors it owns and then those every rank keeps (so those travel ``world_size``
      times: meant for a few scalars or stray tensors). A bucket's chunk size is the longest rank's
      part, the others are padded with zeros: uneven ownership costs padding, not correctness.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive number of bytes, got {bucket_bytes}")
    if owners is not None and len(owners) != len(tensors):
        raise ValueError(f"owners has {len(owners)} entries for {len(tensors)} tensors")
    dtypes: list[torch.dtype] = []
    for _, dtype in tensors:
        if dtype not in dtypes:
            dtypes.append(dtype)
    buckets: list[Bucket] = []
    for dtype in dtypes:
        index = [i for i, (n, d) in enumerate(tensors) if d == dtype and n > 0]
        cap = max(1, bucket_bytes // torch.empty((), dtype=dtype).element_size())
        if owners is None:
            streams, size = [index], cap
        else:
            shared = [i for i in index if owners[i] is None]
            streams = [[i for i in index if owners[i] == r] + shared for r in range(world_size)]
            size = max(1, cap // world_size)
        cut = [_cut_stream(stream, tensors, size) for stream in streams]
        for b in range(max(len(c) for c in cut)):
            parts = [c[b] if b < len(c) else ((), 0) for c in cut]
            buckets.append(Bucket(dtype, max(used for _, used in parts), tuple(segs for segs, _ in parts)))
    return buckets


def _cut_stream(stream: list[int], tensors, size: int) -> list[tuple[tuple[Segment, ...], int]]:
    """The tensors of ``stream`` laid end to end, cut into chunks of ``size`` elements: (segments, used) each."""
    chunks, current, used = [], [], 0
    for i in stream:
        numel, start = tensors[i][0], 0
        while start < numel:
            take = min(numel - start, size - used)
            current.append(Segment(i, start, start + take, used))
            start, used = start + take, used + take
            if used == size:
                chunks.append((tuple(current), used))
                current, used = [], 0
    if current:
        chunks.append((tuple(current), used))
    return chunks


def pack(buffer: torch.Tensor, segments, flats: list) -> None:
    for s in segments:
        if flats[s.tensor] is not None:  # a missing gradient sends zeros (the buffer starts zeroed)
            buffer[s.offset : s.offset + s.stop - s.start].copy_(flats[s.tensor][s.start : s.stop])


def unpack(buffer: torch.Tensor, segments, flats: list) -> None:
    for s in segments:
        flats[s.tensor][s.start : s.stop].copy_(buffer[s.offset : s.offset + s.stop - s.start])
