"""Naive Hybrid Data Parallelism: ByteScale's Algorithm 1.

Every sequence gets the fewest ranks that can hold it, ``k = ceil(s / C)`` with ``C`` the
per-rank token capacity of one micro-batch. ``k`` is any value from 1 to the world size (3, 5
and 7 included); nothing is rounded to a power of two, because the ring runs over P2P on the one
global process group and needs no pre-built communicator.

The planner works in two phases over the sequences sorted longest first:

1. **Distributed sequences** (``k > 1``). Each takes the ``k`` ranks with the fewest slots so far,
   then the fewest tokens, then the lowest rank id. All members must run the piece in the same
   slot, so the piece goes into slot ``max(next free slot of the members)``; a member whose next
   free slot is lower skips the slots in between, which stay empty for now. Members are ordered
   by ascending rank (member ``i`` holds zigzag chunks ``i`` and ``2k-1-i``).
2. **Local sequences** (``k == 1``). Each is packed best-fit: into the micro-batch with the least
   remaining capacity that still fits it. Candidates are every slot a rank has used so far: the
   spare capacity ``C - n_i`` next to a distributed piece, earlier local micro-batches, and the
   empty slots skipped in phase 1. When nothing fits, the sequence opens a new slot on the rank
   with the fewest tokens.

Where the paper is silent, the choices are:

- ties are broken by rank id and then slot, never by chance, so every rank computes the same plan
  from the same lengths;
- phase 1 picks ranks by slot count before token count, so that long sequences spread over the
  pool (fewer slots per rank) before any rank takes a second one;
- best-fit ties between bins with equal remaining capacity go to the earliest slot, then the
  lowest rank;
- a distributed piece never shares its micro-batch with another distributed piece; only local
  sequences fill its spare capacity.

Naive HDP removes the static mesh's needless communication but not its imbalance: ranks holding
quadratic-cost long sequences still finish last (ByteScale measured a 4.7x spread). The balance
scheduler addresses that.

The helpers :func:`check_lengths` and :func:`longest_first` are shared with the other planners; the
best-fit packing is :class:`~hf_hdp.planning.packing.BestFit`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from .packing import BestFit
from .plan import Piece, PlanError, StepPlan, build_plan


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_lengths(lengths: Sequence[int], world_size: int, tokens_per_rank: int) -> list[int]:
    """Return ``lengths`` as ints; raise :class:`PlanError` if some sample cannot be placed at all."""
    if world_size < 1:
        raise PlanError(f"world_size must be at least 1, got {world_size}")
    if tokens_per_rank < 1:
        raise PlanError(f"tokens_per_rank must be at least 1, got {tokens_per_rank}")
    limit = world_size * tokens_per_rank
    out = [int(s) for s in lengths]
    for pos, s in enumerate(out):
        if s <= 0:
            raise PlanError(
                f"sample {pos} has length {s}: every sample needs at least one token; "
                f"drop empty samples before planning"
            )
        if s > limit:
            raise PlanError(
                f"sample {pos} has length {s}, more than world_size * tokens_per_rank = "
                f"{world_size} * {tokens_per_rank} = {limit}: raise tokens_per_rank or use more ranks "
                f"(or truncate the sample)"
            )
    return out


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Sample positions sorted by decreasing length, ties by position."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def plan_naive(lengths: Sequence[int], world_size: int, tokens_per_rank: int) -> StepPlan:
    """Plan one step with naive HDP (see the module docstring).

    Phase 1 takes the ``k`` ranks with the smallest ``(next slot, tokens, rank)``; phase 2 opens a
    new slot on the rank with the smallest ``(tokens, next slot, rank)``. Both keys only grow, so
    lazy heaps (stale entries skipped) find those ranks in ``O(log W)``: ``O(n log W)`` in all.
    """
    lengths = check_lengths(lengths, world_size, tokens_per_rank)
    W, C = world_size, tokens_per_rank
    order = longest_first(lengths)

    pieces: dict[tuple[int, int], list[Piece]] = {}
    load: dict[tuple[int, int], int] = {}
    next_slot = [0] * W
    tokens = [0] * W

    def put(piece: Piece, rank: int, slot: int) -> None:
        n = piece.tokens_on(rank)
        pieces.setdefault((rank, slot), []).append(piece)
        load[rank, slot] = load.get((rank, slot), 0) + n
        tokens[rank] += n
        next_slot[rank] = max(next_slot[rank], slot + 1)

    heap = [(0, 0, r) for r in range(W)]
    local = []
    for sample in order:
        s = lengths[sample]
        k = ceil_div(s, C)
        if k == 1:
            local.append(sample)
            continue
        chosen = []
        while len(chosen) < k:
            ns, tk, r = heapq.heappop(heap)
            if ns == next_slot[r] and tk == tokens[r]:
                chosen.append(r)
        members = sorted(chosen)
        slot = max(next_slot[r] for r in members)
        piece = Piece(sample=sample, length=s, group=tuple(members))
        for r in members:
            put(piece, r, slot)
            heapq.heappush(heap, (next_slot[r], tokens[r], r))

    bins = BestFit()
    for r in range(W):
        for slot in range(next_slot[r]):
            bins.add((slot, r), C - load.get((r, slot), 0))
    light = [(tokens[r], next_slot[r], r) for r in range(W)]
    heapq.heapify(light)
    for sample in local:
        s = lengths[sample]
        key = bins.take(s)
        if key is None:
            while True:
                tk, ns, r = light[0]
                if tk == tokens[r] and ns == next_slot[r]:
                    break
                heapq.heappop(light)
            key = (next_slot[r], r)
        slot, r = key
        put(Piece(sample=sample, length=s, group=(r,)), r, slot)
        heapq.heappush(light, (tokens[r], next_slot[r], r))
        bins.add(key, C - load[r, slot])

    placements = ((r, slot, ps) for (r, slot), ps in pieces.items())
    return build_plan(lengths, W, C, placements, planner="naive")
