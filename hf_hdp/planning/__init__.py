"""Planning: turn the lengths of one global batch into a :class:`StepPlan` (pure Python, no torch).

Planners are plain functions ``(lengths, world_size, tokens_per_rank) -> StepPlan`` registered by
name in :data:`PLANNERS` (:mod:`.registry`); :func:`make_plan` picks one by name. To add a planner,
write such a function and add it to the registry.

The modules, lowest first: :mod:`.layout` (zigzag chunks), :mod:`.plan` (the plan dataclasses),
:mod:`.cost` (hardware specs, time model, calibration, memory), :mod:`.packing` (best fit),
:mod:`.metrics` (what a plan costs), the planners :mod:`.static`, :mod:`.naive` and :mod:`.balanced`
(its step 1 in :mod:`.groups`), :mod:`.registry`, and for analysis :mod:`.compare` (plan the same
batches with several planners) and :mod:`.report` (format and draw the results).
"""

from __future__ import annotations

from .balanced import plan_balanced
from .cost import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    CostModel,
    HardwareSpec,
    MemoryBreakdown,
    ModelSpec,
    activation_bytes_per_token,
    bytescale_fit,
    calibrate,
    fit_coefficients,
    hardware_from_coefficients,
    memory_breakdown,
    memory_per_rank,
    model_state_bytes,
    tokens_per_rank_for_memory,
)
from .layout import member_token_ranges, zigzag_chunk_bounds, zigzag_front_back, zigzag_member_sizes
from .metrics import Interval, PlanMetrics, plan_metrics, plan_timeline
from .naive import plan_naive
from .plan import MicroBatch, Piece, PlanError, StepPlan, build_plan, lockstep
from .registry import PLANNERS, Planner, get_planner, make_plan
from .static import plan_static

__all__ = [
    "CostModel",
    "HARDWARE_PRESETS",
    "HardwareSpec",
    "Interval",
    "MODEL_PRESETS",
    "MemoryBreakdown",
    "ModelSpec",
    "PlanMetrics",
    "activation_bytes_per_token",
    "bytescale_fit",
    "calibrate",
    "fit_coefficients",
    "get_planner",
    "hardware_from_coefficients",
    "memory_breakdown",
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
    "lockstep",
    "make_plan",
    "member_token_ranges",
    "plan_naive",
    "plan_static",
    "zigzag_chunk_bounds",
    "zigzag_front_back",
    "zigzag_member_sizes",
]
