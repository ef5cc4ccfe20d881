"""Planning: turn the lengths of one global batch into a :class:`StepPlan` (pure Python, no torch).

Planners are plain functions ``(lengths, world_size, tokens_per_rank) -> StepPlan`` registered by
name in :data:`PLANNERS`; :func:`make_plan` picks one by name. To add a planner, write such a
function and add it to the registry.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .layout import member_token_ranges, zigzag_chunk_bounds, zigzag_front_back, zigzag_member_sizes
from .naive import plan_naive
from .plan import MicroBatch, Piece, PlanError, StepPlan, build_plan
from .static import plan_static

Planner = Callable[[Sequence[int], int, int], StepPlan]

PLANNERS: dict[str, Planner] = {
    "naive": plan_naive,
    "static": plan_static,
}


def make_plan(name: str, lengths: Sequence[int], world_size: int, tokens_per_rank: int) -> StepPlan:
    """Run the planner registered as ``name``."""
    try:
        planner = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; valid planners: {', '.join(sorted(PLANNERS))}") from None
    return planner(lengths, world_size, tokens_per_rank)


__all__ = [
    "MicroBatch",
    "PLANNERS",
    "Piece",
    "PlanError",
    "Planner",
    "StepPlan",
    "build_plan",
    "make_plan",
    "member_token_ranges",
    "plan_naive",
    "plan_static",
    "zigzag_chunk_bounds",
    "zigzag_front_back",
    "zigzag_member_sizes",
]
