"""``hf-hdp plan``'s text output: the planners side by side, the layer types, the memory breakdown."""

from __future__ import annotations

from collections.abc import Callable

from hf_hdp.planning.compare import PLANNER_ORDER, PLANNER_TITLES
from hf_hdp.planning.cost import CostModel, ModelSpec, layer_type_times
from hf_hdp.planning.cost.memory import fmt_gb
from hf_hdp.planning.report import fmt_bytes, fmt_seconds


def fmt_groups(groups: dict[str, int], limit: int = 5) -> str:
    """``{"1": 900, "2": 12, ...}`` -> ``"k=1 x900, k=2 x12, ..."``, longest-k last, truncated."""
    items = [f"k={k}:{n}" for k, n in groups.items()]
    if len(items) > limit:
        ks = [int(k) for k in groups]
        return f"{', '.join(items[: limit - 1])}, ... ({len(items)} sizes, k<={max(ks)})"
    return ", ".join(items)


def fmt_splits(d: dict) -> str:
    """``{"ring": 3, "hybrid": 2}`` and ``{"8": 2}`` -> ``"ring:3, hybrid:2 (u=8:2)"``; distributed pieces only."""
    kinds = [f"{kind}:{n}" for kind, n in d.get("splits", {}).items() if kind != "local"]
    degrees = ", ".join(f"u={u}:{n}" for u, n in d.get("ulysses_degrees", {}).items())
    return (", ".join(kinds) or "-") + (f" ({degrees})" if degrees else "")


def _mesh(d: dict) -> str:
    cps = [c for c in d.get("cp_per_step", []) if c is not None]
    if cps and min(cps) != max(cps):
        return f"CP {min(cps)}-{max(cps)} (per batch)"
    return f"DP={d['dp']} x CP={d['cp']}"


def render_table(summary: dict[str, dict], header: str) -> str:
    rows: list[tuple[str, Callable[[str, dict], str]]] = [
        ("mesh", lambda n, d: _mesh(d) if n == "static" else "one pool, any k"),
        ("step time", lambda n, d: fmt_seconds(d["step_time_s"])),
        ("speedup vs static", lambda n, d: "-" if d["speedup_vs_static"] is None else f"{d['speedup_vs_static']:.2f}x"),
        ("tokens/s", lambda n, d: "-" if not d["tokens_per_s"] else f"{d['tokens_per_s']:,.0f}"),
        ("imbalance (max/mean)", lambda n, d: f"{d['imbalance']:.3f}"),
        ("rank spread (max/min)", lambda n, d: f"{d['rank_spread']:.2f}x"),
        ("idle fraction", lambda n, d: f"{d['idle_fraction']:.1%}"),
        ("exposed P2P / busy", lambda n, d: f"{d['p2p_time_fraction']:.1%}"),
        ("P2P bytes / step", lambda n, d: fmt_bytes(d["p2p_bytes"])),
        ("P2P messages / step", lambda n, d: f"{d['p2p_messages']:,.0f}"),
        ("slots", lambda n, d: f"{d['num_slots']:.1f}" if d["steps"] > 1 else f"{d['num_slots']:.0f}"),
        (
            "micro-batches / rank",
            lambda n, d: (
                f"{d['micro_batches_per_rank']['min']}-{d['micro_batches_per_rank']['max']}"
                f" (mean {d['micro_batches_per_rank']['mean']:.1f})"
            ),
        ),
        ("group sizes", lambda n, d: fmt_groups(d["group_sizes"], limit=3)),
        ("splits (samples)", lambda n, d: fmt_splits(d)),
        ("planning time", lambda n, d: fmt_seconds(d["planning_time_s"])),
    ]
    names = [n for n in PLANNER_ORDER if n in summary]
    table = [[""] + [PLANNER_TITLES[n] for n in names]]
    for label, f in rows:
        table.append([label] + [f(n, summary[n]) for n in names])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [header, ""]
    for j, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_layer_types(model: ModelSpec, cost: CostModel, tokens: int) -> str:
    """The ``layers:`` lines of the text output: each layer type's count, and one layer's forward + backward time for
    a ``tokens``-token sample alone on a rank, split into its parts."""
    names = {"delta": "Gated DeltaNet", "ssd": "Mamba-2", "conv": "short convolution"}
    states = [names[k] for k in names if any(st.kind == k for st, _ in cost.state_kinds)]
    kinds = (["sliding and chunked"] if cost.layer_masks else []) + states
    recurrent = [n for n in states if n != "short convolution"]
    split = f", split samples' {' and '.join(recurrent)} layers by {cost.state_split!r}" if recurrent else ""
    lines = [
        f"layers: {cost.describe_layers()} ({', '.join(kinds)} layers priced as such{split})",
        f"  one layer, forward + backward, a {tokens:,}-token sample alone on a rank:",
    ]
    for t in layer_type_times(model, cost, tokens):
        parts = [f"projections and MLP {fmt_seconds(t['linear'])}"]
        if t["quadratic"]:
            parts.append(f"attention {fmt_seconds(t['quadratic'])}")
        if t["state"]:
            what = "convolution" if t["layer"].startswith("short convolution") else "convolution and recurrence"
            parts.append(f"{what} {fmt_seconds(t['state'])}")
        lines.append(f"    {t['layers']} x {t['layer']}: {fmt_seconds(t['seconds'])} ({', '.join(parts)})")
    return "\n".join(lines) + "\n"


def render_memory(memory: dict, tokens_per_rank: int) -> str:
    """The ``--memory`` lines of the text output."""
    s = memory["settings"]
    sharding = f"FSDP {s['fsdp']}" if s["fsdp"] else f"ZeRO stage {s['zero_stage']}"
    chunk = "full logits" if s["loss_chunk_tokens"] is None else f"loss chunks of {s['loss_chunk_tokens']:,} tokens"
    lines = [
        f"memory: C = {memory['tokens_per_rank']:,} tokens per rank fit {fmt_gb(memory['memory_bytes'])} "
        f"({memory['reserve_fraction']:.0%} kept back): {s['world_size']:,} ranks, {sharding}, "
        f"{'checkpointing' if s['checkpointing'] else 'no checkpointing'}, offload ratio {s['offload_ratio']:g}, "
        f"{chunk}, {memory['precision']}",
        "  at C: " + _breakdown_text(memory["breakdown"]),
    ]
    at = memory.get("at_tokens_per_rank")
    if at is not None:
        fits = at["total"] <= memory["memory_bytes"]
        lines.append(
            f"  at --tokens-per-rank {tokens_per_rank:,}: "
            + _breakdown_text(at)
            + ("" if fits else f"  -- more than {fmt_gb(memory['memory_bytes'])}")
        )
    return "\n".join(lines)


def _breakdown_text(b: dict) -> str:
    names = ("weights", "gradients", "optimizer", "activations", "logits", "reserve", "total")
    return ", ".join(f"{n} {fmt_gb(b[n])}" for n in names)
