"""The planners by name: :data:`PLANNERS`, :func:`get_planner` and :func:`make_plan`.

Planners are plain functions ``(lengths, world_size, tokens_per_rank) -> StepPlan``; some take more
keywords (``cost=``, a :class:`~hf_hdp.planning.cost.CostModel`, to estimate times; the balanced
planner's ``delta=``). To add a planner, write such a function and add it to :data:`PLANNERS`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

from .balanced import plan_balanced
from .cost import CostModel
from .naive import plan_naive
from .plan import StepPlan
from .static import plan_static

Planner = Callable[[Sequence[int], int, int], StepPlan]

# planners that take a ``cost=`` CostModel keyword use it to estimate times
PLANNERS: dict[str, Planner] = {
    "balanced": plan_balanced,
    "naive": plan_naive,
    "static": plan_static,
}


def _keywords(planner: Planner) -> set[str]:
    return set(inspect.signature(planner).parameters)


def get_planner(name: str, cost: CostModel | None = None, **options) -> Planner:
    """The planner registered as ``name``, bound to ``cost`` and ``options`` where it takes them.

    A keyword the planner does not take is left out, so one call configures any planner
    (``get_planner(name, cost, delta=0.1)`` gives the balanced planner its ``delta`` and the others
    none); a keyword that no registered planner takes is a ``TypeError``.
    """
    try:
        planner = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; valid planners: {', '.join(sorted(PLANNERS))}") from None
    known = set().union(*(_keywords(p) for p in PLANNERS.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"no planner takes {', '.join(unknown)}; the planners' keywords: {', '.join(sorted(known))}")
    takes = _keywords(planner)
    bound = {key: value for key, value in options.items() if key in takes}
    if cost is not None and "cost" in takes:
        bound["cost"] = cost
    return functools.partial(planner, **bound) if bound else planner


def make_plan(
    name: str, lengths: Sequence[int], world_size: int, tokens_per_rank: int, cost: CostModel | None = None
) -> StepPlan:
    """Run the planner registered as ``name`` (with ``cost`` if it uses one)."""
    return get_planner(name, cost)(lengths, world_size, tokens_per_rank)
