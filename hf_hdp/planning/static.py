"""The static DP x CP mesh: today's baseline that HDP is measured against.

accelerate, the HF Trainer, axolotl and DeepSpeed ALST fix one context-parallel degree for the
whole run. This planner reproduces that layout as a :class:`StepPlan`, so both schemes run
through the same collator, attention and trainer, and benchmarks compare like with like.

- **CP degree**: the fewest ranks the longest sequence needs, ``ceil(max_len / C)``, rounded up
  to a divisor of ``world_size`` (a mesh must tile the world). ``DP = world_size / CP``.
- **CP groups** are consecutive ranks: group ``d`` is ranks ``d*CP .. d*CP + CP - 1``, member
  order ascending.
- **Every** sequence, short ones too, is zigzag-split over its CP group. This is the static
  mesh's cost: an 800-token sample pays the same ring communication as the longest one. With
  ``CP == 1`` it is plain data parallelism with whole sequences. With ``CP > s`` some members
  hold no token of a sequence, and a micro-batch made only of such sequences leaves its last
  members with no token at all; they still take part in the ring.
- **Packing**: a member holds at most ``ceil(s / CP)`` tokens of a sequence (see
  :mod:`hf_hdp.planning.layout`), so sequences are packed best-fit decreasing into micro-batches
  with item weight ``ceil(s / CP)`` and capacity ``C``; that guarantees no member exceeds ``C``.
- **DP balance**: the packed micro-batches, heaviest (most tokens) first, each go to the DP
  group with the fewest tokens so far (ties: fewer micro-batches, then lower id). A micro-batch's
  slot is its index within its DP group.

Ties are broken by position and id only, so every rank computes the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence

from .naive import ceil_div, check_lengths, longest_first
from .packing import BestFit
from .plan import Piece, StepPlan, build_plan


def cp_degree(max_length: int, world_size: int, tokens_per_rank: int) -> int:
    """The smallest divisor of ``world_size`` that gives the longest sequence enough ranks."""
    need = ceil_div(max_length, tokens_per_rank)
    return next(d for d in range(max(need, 1), world_size + 1) if world_size % d == 0)


def plan_static(lengths: Sequence[int], world_size: int, tokens_per_rank: int) -> StepPlan:
    """Plan one step on a static DP x CP mesh (see the module docstring)."""
    lengths = check_lengths(lengths, world_size, tokens_per_rank)
    W, C = world_size, tokens_per_rank
    cp = cp_degree(max(lengths, default=1), W, C)
    dp = W // cp

    # Pack the sequences into micro-batches of one CP group, best-fit decreasing.
    batches: list[list[int]] = []  # micro-batch -> sample positions
    free: list[int] = []  # micro-batch -> capacity left on its fullest member
    bins = BestFit()
    for sample in longest_first(lengths):
        weight = ceil_div(lengths[sample], cp)
        key = bins.take(weight)
        if key is None:
            key = (len(batches),)
            batches.append([])
            free.append(C)
        b = key[0]
        batches[b].append(sample)
        free[b] -= weight
        bins.add(key, free[b])

    # Spread the micro-batches over the DP groups, heaviest first onto the lightest group.
    dp_tokens = [0] * dp
    dp_batches: list[list[list[int]]] = [[] for _ in range(dp)]
    for batch in sorted(batches, key=lambda b: -sum(lengths[i] for i in b)):
        d = min(range(dp), key=lambda g: (dp_tokens[g], len(dp_batches[g]), g))
        dp_batches[d].append(batch)
        dp_tokens[d] += sum(lengths[i] for i in batch)

    placements = []
    for d, group_batches in enumerate(dp_batches):
        group = tuple(range(d * cp, (d + 1) * cp))
        for slot, batch in enumerate(group_batches):
            ps = [Piece(sample=i, length=lengths[i], group=group) for i in batch]
            placements.extend((r, slot, ps) for r in group)
    return build_plan(lengths, W, C, placements, planner="static", meta={"cp": cp, "dp": dp})
