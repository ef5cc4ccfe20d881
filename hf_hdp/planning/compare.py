"""Planner comparison: plan the same global batches with several planners and sum up what each costs.

What ``hf-hdp plan``, ``benchmarks/paper_check.py`` and ``notebooks/planner_explorer.ipynb`` show::

    batches = draw_batches(pool.lengths, steps=3, seed=0, tokens=4 * world * C)
    runs = compare_planners(batches, world, C, CostModel.default())
    summary = summarize(runs)          # per planner: step time, speedup over static, imbalance, ...

Every figure is an estimate of the analytic cost model (:mod:`hf_hdp.planning.cost`) through
:func:`~hf_hdp.planning.metrics.plan_metrics`; nothing runs on a GPU.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .cost import CostModel
from .metrics import PlanMetrics, plan_metrics
from .naive import ceil_div
from .plan import PlanError, StepPlan
from .registry import get_planner
from .splits import SPLIT_KINDS

PLANNER_ORDER = ("static", "naive", "balanced")
PLANNER_TITLES = {"static": "static mesh", "naive": "naive HDP", "balanced": "balanced HDP"}


# --------------------------------------------------------------------------- batches


@dataclass
class LengthPool:
    """Sample lengths to draw global batches from, and how to name one sample in messages."""

    lengths: list[int]
    source: str
    names: Callable[[int], str] = field(default=lambda i: f"sample {i}")


def draw_batches(
    lengths: Sequence[int],
    steps: int,
    seed: int,
    samples: int | None = None,
    tokens: int | None = None,
) -> list[list[int]]:
    """``steps`` global batches of sample lengths drawn from ``lengths`` with ``random.Random(seed)``.

    With ``samples``: that many samples per batch, without replacement when the pool is large
    enough, with replacement otherwise. With ``tokens``: samples in a random order (the pool
    reshuffled each time it runs out, i.e. with replacement only when the pool is smaller than the
    budget) until the batch holds at least ``tokens`` tokens.
    """
    if (samples is None) == (tokens is None):
        raise ValueError("give exactly one of samples and tokens")
    rng = random.Random(seed)
    pool = list(lengths)
    batches = []
    for _ in range(steps):
        if samples is not None:
            if samples <= len(pool):
                batch = rng.sample(pool, samples)
            else:
                batch = [rng.choice(pool) for _ in range(samples)]
        else:
            batch, total = [], 0
            while total < tokens:
                order = list(range(len(pool)))
                rng.shuffle(order)
                for i in order:
                    batch.append(pool[i])
                    total += pool[i]
                    if total >= tokens:
                        break
        batches.append(batch)
    return batches


class DoesNotFit(PlanError):
    """The longest sample of a pool is longer than all ranks together hold; says what would hold it."""

    def __init__(self, name: str, length: int, world_size: int, tokens_per_rank: int) -> None:
        self.name, self.length = name, length
        self.world_size, self.tokens_per_rank = world_size, tokens_per_rank
        self.min_tokens_per_rank = ceil_div(length, world_size)
        self.suggested_tokens_per_rank = ceil_div(self.min_tokens_per_rank, 1024) * 1024
        self.min_world_size = ceil_div(length, tokens_per_rank)
        super().__init__(self.advice())

    def advice(self, world_size: str = "world_size", tokens_per_rank: str = "tokens_per_rank") -> str:
        """The message, naming the two settings as ``world_size`` and ``tokens_per_rank`` say."""
        W, C = self.world_size, self.tokens_per_rank
        return (
            f"{self.name} has {self.length:,} tokens, more than {world_size} x {tokens_per_rank} = "
            f"{W:,} x {C:,} = {W * C:,}: use {tokens_per_rank} {self.suggested_tokens_per_rank} or more "
            f"(at least {self.min_tokens_per_rank:,}), or {world_size} {self.min_world_size} or more"
        )


def check_fits(pool: LengthPool, world_size: int, tokens_per_rank: int) -> None:
    """Raise :class:`DoesNotFit` when some sample of ``pool`` cannot be placed even on all ranks."""
    longest = max(range(len(pool.lengths)), key=lambda i: pool.lengths[i])
    s = pool.lengths[longest]
    if s > world_size * tokens_per_rank:
        raise DoesNotFit(pool.names(longest), s, world_size, tokens_per_rank)


# --------------------------------------------------------------------------- comparison


@dataclass
class PlannerRuns:
    """One planner's plans, metrics and planning seconds, one entry per global batch."""

    name: str
    plans: list[StepPlan] = field(default_factory=list)
    metrics: list[PlanMetrics] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def compare_planners(
    batches: Sequence[Sequence[int]],
    world_size: int,
    tokens_per_rank: int,
    cost: CostModel,
    delta: float = 0.05,
    progress: bool = False,
    planners: Sequence[str] = PLANNER_ORDER,
    attention_split: str = "auto",
) -> dict[str, PlannerRuns]:
    """Plan every batch with every planner (the balanced one with ``cost``, ``delta`` and
    ``attention_split``) and measure each plan with ``cost``; ``progress`` shows a bar on stderr."""
    runs = {name: PlannerRuns(name) for name in planners}
    plan_with = {name: get_planner(name, cost, delta=delta, attention_split=attention_split) for name in planners}
    bar = _progress_bar(len(batches) * len(planners), progress)
    try:
        for lengths in batches:
            for name in planners:
                bar.set_description(PLANNER_TITLES.get(name, name), refresh=False)
                t0 = time.perf_counter()
                plan = plan_with[name](lengths, world_size, tokens_per_rank)
                runs[name].seconds.append(time.perf_counter() - t0)
                runs[name].plans.append(plan)
                runs[name].metrics.append(plan_metrics(plan, cost))
                bar.update(1)
    finally:
        bar.close()
    return runs


def _progress_bar(total: int, show: bool):
    """A tqdm bar on stderr when ``show``; otherwise a silent stand-in."""
    if show:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, file=sys.stderr, unit="plan", leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            pass

    class _Silent:
        def update(self, n=1):
            pass

        def set_description(self, *a, **k):
            pass

        def close(self):
            pass

    return _Silent()


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def summarize(runs: dict[str, PlannerRuns]) -> dict[str, dict]:
    """Per planner, the figures averaged over the batches; the JSON that ``hf-hdp plan --json`` prints.

    ``speedup_vs_static`` is total static step time over total step time (the batches are the same,
    so it is the throughput ratio); other figures are means per step, group sizes are counts summed
    over all steps.
    """
    base = sum(m.step_time_s for m in runs["static"].metrics) if "static" in runs else None
    out = {}
    for name, r in runs.items():
        ms = r.metrics
        total = sum(m.step_time_s for m in ms)
        groups: dict[int, int] = {}
        splits: dict[str, int] = {}
        degrees: dict[int, int] = {}
        for m in ms:
            for k, n in dict(m.group_sizes).items():
                groups[int(k)] = groups.get(int(k), 0) + int(n)
            for kind, n in m.splits.items():
                splits[kind] = splits.get(kind, 0) + n
            for u, n in m.ulysses_degrees.items():
                degrees[u] = degrees.get(u, 0) + n
        mbs = [n for m in ms for n in m.micro_batches_per_rank]
        tokens = _mean(m.tokens for m in ms)
        d = {
            "step_time_s": _mean(m.step_time_s for m in ms),
            "speedup_vs_static": (base / total) if base is not None and total > 0 else None,
            "imbalance": _mean(m.imbalance for m in ms),
            "idle_fraction": _mean(m.idle_fraction for m in ms),
            "rank_spread": _mean(m.busy_spread for m in ms),
            "p2p_bytes": _mean(m.p2p_bytes for m in ms),
            "p2p_messages": _mean(m.p2p_messages for m in ms),
            "p2p_time_fraction": _mean(m.p2p_time_fraction for m in ms),
            "allreduce_s": _mean(m.allreduce_s for m in ms),
            "num_slots": _mean(m.num_slots for m in ms),
            "micro_batches_per_rank": {"min": min(mbs), "mean": _mean(mbs), "max": max(mbs)},
            "group_sizes": {str(k): groups[k] for k in sorted(groups)},
            "splits": {kind: splits[kind] for kind in SPLIT_KINDS if kind in splits},
            "ulysses_degrees": {str(u): degrees[u] for u in sorted(degrees)},
            "planning_time_s": _mean(r.seconds),
            "tokens": tokens,
            "samples": _mean(len(p.lengths) for p in r.plans),
            "tokens_per_s": tokens / _mean(m.step_time_s for m in ms) if total > 0 else None,
            "steps": len(ms),
        }
        if name == "static" and r.plans:
            # the static planner sizes CP by each batch's longest sample, so it may differ per step
            cps = [p.meta.get("cp") for p in r.plans]
            d["cp"] = max(c for c in cps if c is not None) if any(c is not None for c in cps) else None
            d["dp"] = r.plans[0].world_size // d["cp"] if d["cp"] else None
            d["cp_per_step"] = cps
        out[name] = d
    return out
