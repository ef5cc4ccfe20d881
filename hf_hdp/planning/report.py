"""Reporting a planner comparison (:mod:`hf_hdp.planning.compare`): figures as text, timelines as a figure.

matplotlib is imported only by :func:`plot_timelines`, so this module loads without it.
"""

from __future__ import annotations

from .compare import PLANNER_ORDER, PLANNER_TITLES, PlannerRuns
from .cost import CostModel
from .metrics import plan_timeline

MAX_PLOT_RANKS = 64
INSTALL_MATPLOTLIB = "pip install matplotlib (or pip install 'hf-hdp[plot]')"


def fmt_seconds(s: float) -> str:
    if s >= 60:
        m, sec = divmod(s, 60)
        return f"{s:,.1f} s ({int(m)}m{sec:02.0f}s)"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# interval kinds of hf_hdp.planning.metrics.plan_timeline; "wait" is left blank
KIND_COLORS = {
    "local": ("#4C72B0", "whole sequences (no communication)"),
    "distributed": ("#55A868", "ring piece: compute"),
    "p2p": ("#DD8452", "ring piece: exposed P2P"),
    "allreduce": ("#8172B3", "gradient all-reduce"),
}


def plot_timelines(runs: dict[str, PlannerRuns], cost: CostModel, path: str,
                   max_ranks: int = MAX_PLOT_RANKS) -> str | None:
    """Draw the first batch's per-rank timelines, one planner above the other, into ``path`` (PNG).

    Only the first ``max_ranks`` ranks are drawn; returns a note saying so when ranks were left out.
    Raises ``ImportError`` without matplotlib, ``OSError`` when ``path`` cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError(f"plotting needs matplotlib, which is not installed: {INSTALL_MATPLOTLIB}") from None

    names = [n for n in PLANNER_ORDER if n in runs]
    world = runs[names[0]].plans[0].world_size
    shown = min(world, max_ranks)
    horizon = max(runs[n].metrics[0].step_time_s for n in names) or 1.0
    fig, axes = plt.subplots(
        len(names), 1, figsize=(12, 1.5 + len(names) * (0.9 + 0.045 * shown)), sharex=True, squeeze=False
    )
    for ax, name in zip(axes[:, 0], names):
        plan, metrics = runs[name].plans[0], runs[name].metrics[0]
        bars: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for iv in plan_timeline(plan, cost):
            if iv.rank < shown and iv.kind in KIND_COLORS:
                bars.setdefault((iv.kind, iv.rank), []).append((iv.start, iv.end - iv.start))
        for (kind, rank), spans in bars.items():
            ax.broken_barh(spans, (rank - 0.42, 0.84), facecolors=KIND_COLORS[kind][0], edgecolor="none")
        speed = ""
        if name != "static" and "static" in runs:
            speed = f", {runs['static'].metrics[0].step_time_s / metrics.step_time_s:.2f}x vs static"
        mesh = f" (DP={plan.meta.get('dp')} x CP={plan.meta.get('cp')})" if name == "static" else ""
        ax.set_title(
            f"{PLANNER_TITLES[name]}{mesh}: step {fmt_seconds(metrics.step_time_s)}{speed}, "
            f"imbalance {metrics.imbalance:.2f}, idle {metrics.idle_fraction:.0%}",
            fontsize=10,
            loc="left",
        )
        ax.axvline(metrics.step_time_s, color="black", lw=0.8, ls="--")
        ax.set_ylim(shown - 0.5, -0.5)
        ax.set_ylabel("rank")
        ax.set_xlim(0, horizon * 1.02)
    axes[-1, 0].set_xlabel("estimated time in the step (s); blank = waiting")
    note = f"only ranks 0-{shown - 1} of {world} are drawn" if shown < world else None
    fig.suptitle(
        f"per-rank timelines of the first global batch: {cost.label}, {world:,} ranks" + (f" ({note})" if note else ""),
        fontsize=11,
    )
    handles = [Patch(color=color, label=label) for color, label in KIND_COLORS.values()]
    fig.legend(handles=handles, loc="lower center", fontsize=8, ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return note
