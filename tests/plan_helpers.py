"""Random valid step plans, for tests that must hold "for any placement the planner chooses".

The gradient-equivalence tests run the same global batch under many placements; a plan from
:func:`random_plan` exercises more shapes than any real planner produces: groups larger than
needed, members in any order (member order matters: ``group[i]`` holds chunks ``i`` and
``2k-1-i``), several distributed pieces in one micro-batch, ranks with gaps between their slots
and whole slots nobody uses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from hf_hdp.planning import Piece, StepPlan, build_plan, zigzag_member_sizes


def random_plan(lengths: Sequence[int], world_size: int, tokens_per_rank: int, rng: random.Random) -> StepPlan:
    """A random plan that passes :meth:`StepPlan.validate`.

    Samples are placed in random order. Each gets a group of ``k`` distinct ranks in random order,
    ``k`` drawn from ``ceil(s / C)`` (the fewest that can hold it) up to ``min(world, s)`` (so
    every member holds at least one token; chunks may still be empty when ``s < 2k``). It goes
    into a random slot, among the slots up to two past the last one used, where every member
    still has room for its share.
    """
    W, C = world_size, tokens_per_rank
    load: dict[tuple[int, int], int] = {}  # (rank, slot) -> tokens
    pieces: dict[tuple[int, int], list[Piece]] = {}  # (rank, slot) -> pieces
    num_slots = 0

    order = list(range(len(lengths)))
    rng.shuffle(order)
    for sample in order:
        s = int(lengths[sample])
        k_min = -(-s // C)
        if not (s > 0 and k_min <= W):
            raise ValueError(f"sample {sample} of length {s} cannot be placed on {W} ranks of {C} tokens")
        k = rng.randint(k_min, min(W, s))
        group = tuple(rng.sample(range(W), k))
        shares = dict(zip(group, zigzag_member_sizes(s, k)))

        def fits(slot: int) -> bool:
            return all(load.get((r, slot), 0) + n <= C for r, n in shares.items())

        # A slot past every used one is empty, so it always fits: the choice is never empty.
        slot = rng.choice([t for t in range(num_slots + 2) if fits(t)])
        num_slots = max(num_slots, slot + 1)
        piece = Piece(sample=sample, length=s, group=group)
        for r, n in shares.items():
            load[r, slot] = load.get((r, slot), 0) + n
            pieces.setdefault((r, slot), []).append(piece)

    placements = ((r, slot, ps) for (r, slot), ps in pieces.items())
    return build_plan(lengths, W, C, placements, planner="random")


def segment_rows(segments, rank: int):
    """``(rows, segs)`` of ``rank`` for hand-written attention segments ``[(group, ulysses, lengths), ...]`` (those
    without ``rank`` skipped): ``rows`` lists ``(segment, document, start, end)`` in the rank's row order, ``segs``
    the metadata segments the collator would build for those rows (:func:`hf_hdp.collators.collator.segment_for`)."""
    from hf_hdp.collators.collator import segment_for
    from hf_hdp.planning.layout import hybrid_token_ranges

    rows, segs, cursor = [], [], 0
    for i, (group, u, lengths) in enumerate(segments):
        if rank not in group:
            continue
        start = cursor
        for d, s in enumerate(lengths):
            for a, b in hybrid_token_ranges(s, len(group), group.index(rank), u):
                rows.append((i, d, a, b))
                cursor += b - a
        segs.append(segment_for(list(lengths), group, u, rank, start, cursor, tuple(range(len(lengths)))))
    return rows, segs
