"""Planning: turn the lengths of one global batch into a :class:`StepPlan` (pure Python, no torch).

Planners are plain functions ``(lengths, world_size, tokens_per_rank) -> StepPlan`` registered by
name in :data:`PLANNERS`; :func:`make_plan` picks one by name. To add a planner, write such a
function and add it to the registry.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

from .balanced import plan_balanced
from .cost import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    CostModel,
    HardwareSpec,
    ModelSpec,
    activation_bytes_per_token,
    bytescale_fit,
    calibrate,
    fit_coefficients,
    hardware_from_coefficients,
    memory_per_rank,
    model_state_bytes,
    tokens_per_rank_for_memory,
)
from .layout import member_token_ranges, zigzag_chunk_bounds, zigzag_front_back, zigzag_member_sizes
from .metrics import Interval, PlanMetrics, plan_metrics, plan_timeline
from .naive import plan_naive
from .plan import MicroBatch, Piece, PlanError, StepPlan, build_plan
from .static import plan_static

Planner = Callable[[Sequence[int], int, int], StepPlan]

# planners that take a ``cost=`` CostModel keyword use it to estimate times
PLANNERS: dict[str, Planner] = {
    "balanced": plan_balanced,
    "naive": plan_naive,
    "static": plan_static,
}


def get_planner(name: str, cost: CostModel | None = None) -> Planner:
    """The planner registered as ``name``, bound to ``cost`` when it takes a cost model."""
    try:
        planner = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; valid planners: {', '.join(sorted(PLANNERS))}") from None
    if cost is not None and "cost" in inspect.signature(planner).parameters:
        return functools.partial(planner, cost=cost)
    return planner


def make_plan(name: str, lengths: Sequence[int], world_size: int, tokens_per_rank: int,
              cost: CostModel | None = None) -> StepPlan:
    """Run the planner registered as ``name`` (with ``cost`` if it uses one)."""
    return get_planner(name, cost)(lengths, world_size, tokens_per_rank)


__all__ = [
    "CostModel",
    "HARDWARE_PRESETS",
    "HardwareSpec",
    "Interval",
    "MODEL_PRESETS",
    "ModelSpec",
    "PlanMetrics",
    "activation_bytes_per_token",
    "bytescale_fit",
    "calibrate",
    "fit_coefficients",
    "get_planner",
    "hardware_from_coefficients",
    "memory_per_rank",
    "model_state_bytes",
    "plan_balanced",
    "plan_metrics",
    "plan_timeline",
    "tokens_per_rank_for_memory",
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
