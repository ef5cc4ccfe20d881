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
    "allreduce": ("#8172B3", "gradient all-reduce (communication)"),
}
# the distributed intervals by split (Interval.split), each piece kind its own colours and legend entry
SPLIT_COLORS = {
    ("distributed", "ring"): KIND_COLORS["distributed"],
    ("p2p", "ring"): KIND_COLORS["p2p"],
    ("distributed", "ulysses"): ("#64B5CD", "Ulysses piece: compute"),
    ("p2p", "ulysses"): ("#C44E52", "Ulysses piece: exposed all-to-alls"),
    ("distributed", "hybrid"): ("#8C8C3C", "hybrid piece: compute"),
    ("p2p", "hybrid"): ("#DA8BC3", "hybrid piece: exposed all-to-alls and ring"),
    ("distributed", "mixed"): ("#937860", "several split kinds in one micro-batch: compute"),
    ("p2p", "mixed"): ("#E8B04A", "several split kinds in one micro-batch: exposed communication"),
}


def interval_style(iv) -> tuple[str, str] | None:
    """``(colour, legend label)`` of one :class:`~hf_hdp.planning.metrics.Interval`; ``None`` for a wait (blank)."""
    return SPLIT_COLORS.get((iv.kind, iv.split)) or KIND_COLORS.get(iv.kind)


def legend_entries(intervals) -> list[tuple[str, str]]:
    """``[(colour, label), ...]`` of the interval kinds present in ``intervals``, in :data:`KIND_COLORS` order with
    each split kind's compute and communication beside each other: what :func:`plot_timelines`' legend shows."""
    present = {interval_style(iv) for iv in intervals} - {None}
    order = [KIND_COLORS["local"], *SPLIT_COLORS.values(), KIND_COLORS["allreduce"]]
    return [style for style in order if style in present]


def plot_timelines(
    runs: dict[str, PlannerRuns], cost: CostModel, path: str, max_ranks: int = MAX_PLOT_RANKS
) -> str | None:
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
    drawn: list = []
    for ax, name in zip(axes[:, 0], names):
        plan, metrics = runs[name].plans[0], runs[name].metrics[0]
        bars: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for iv in plan_timeline(plan, cost):
            style = interval_style(iv)
            if iv.rank < shown and style is not None:
                drawn.append(iv)
                bars.setdefault((style[0], iv.rank), []).append((iv.start, iv.end - iv.start))
        for (color, rank), spans in bars.items():
            ax.broken_barh(spans, (rank - 0.42, 0.84), facecolors=color, edgecolor="none")
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
    handles = [Patch(color=color, label=label) for color, label in legend_entries(drawn)]
    columns = min(len(handles), 5) or 1
    fig.legend(handles=handles, loc="lower center", fontsize=8, ncol=columns, frameon=False)
    fig.tight_layout(rect=(0, 0.03 * -(-len(handles) // columns), 1, 0.98))
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return note
