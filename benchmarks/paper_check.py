"""Paper check: ByteScale's LLaMA-7B / 2M-context / 1,024-GPU case study, simulated with our planners.

    .venv/bin/python benchmarks/paper_check.py            # print the table
    .venv/bin/python benchmarks/paper_check.py --write    # also write docs/paper_check.md

Setup (ByteScale, arXiv 2502.21231; docs/design.md §1): LLaMA-7B, 1,024 H100-class GPUs, 8 per node, a
32M-token global batch, C = 8K tokens per rank, contexts up to 2M tokens. A 2M-token sample needs
2M / 8K = 256 ranks, so the static mesh is DP = 4 x CP = 256.

Length distribution (the production mix). ByteScale publishes the token share of the long
buckets only: 2M 12.1%, 1M 9.7%, 512K 7.3%, 256K 8.8%, 128K 6.4% (44.3% of tokens), and that about
80% of samples are at most 4K tokens. We read a bucket named ``U`` as the lengths ``(U/2, U]`` and
spread the remaining 55.7% of tokens as follows (our choice, stated exactly):

- 8K, 16K, 32K and 64K buckets: 11.1% of tokens each (44.4%);
- 512, 1K, 2K and 4K buckets: 2.825% of tokens each (11.3%).

Equal shares inside each group; the split between the two groups is the one that makes 80% of
samples at most 4K tokens (the expected figure is 79.6%), and it also gives the other published
fact, about 1% of samples at 128K or more (expected 0.85%).

Each global batch holds every bucket's token share of 32M (2^25) tokens: for each bucket, lengths
are drawn uniformly from the integers in ``(U/2, U]`` (``random.Random(seed)``) and kept while each
one brings the bucket's total closer to its share; the first draw that would not is dropped and
the bucket is closed. The total is therefore close to, not exactly, 32M tokens. Step times come from the analytic cost model
(:class:`hf_hdp.planning.cost.CostModel` for ``llama-7b`` on ``h100``), not from a run.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_hdp.planning.compare import PLANNER_ORDER, compare_planners, summarize
from hf_hdp.planning.cost import CostModel
from hf_hdp.planning.report import fmt_bytes

K, M = 1 << 10, 1 << 20
WORLD, RANKS_PER_NODE, C = 1024, 8, 8 * K
GLOBAL_TOKENS = 32 * M

# (bucket upper bound U, share of tokens); a bucket holds lengths in (U/2, U]
PUBLISHED_BUCKETS = [(2 * M, 0.121), (1 * M, 0.097), (512 * K, 0.073), (256 * K, 0.088), (128 * K, 0.064)]
OUR_BUCKETS = [(64 * K, 0.111), (32 * K, 0.111), (16 * K, 0.111), (8 * K, 0.111)] + [
    (u, 0.02825) for u in (4 * K, 2 * K, 1 * K, 512)
]
BUCKETS = PUBLISHED_BUCKETS + OUR_BUCKETS

# ByteScale's figures (docs/design.md §1)
PAPER = {
    "ablation": {"static": 1.00, "dynamic_comm": 1.59, "offload": 2.01, "balance": 3.69, "remote_loader": 3.89},
    "case_step_s": {"static": 8 * 60 + 40, "naive": 4 * 60 + 32, "balanced": 2 * 60 + 37},
    "naive_spread": 4.7,
    "static_p2p_fraction": 0.976,
}


def bucket_mean(upper: int) -> float:
    lo = upper // 2 + 1
    return (lo + upper) / 2


def expected_sample_fractions() -> tuple[float, float]:
    """Expected fraction of samples <= 4K and >= 128K (in the 128K bucket or above) of the mix."""
    counts = [(u, share / bucket_mean(u)) for u, share in BUCKETS]
    total = sum(n for _, n in counts)
    return sum(n for u, n in counts if u <= 4 * K) / total, sum(n for u, n in counts if u >= 128 * K) / total


def draw_batch(rng: random.Random, tokens: int = GLOBAL_TOKENS) -> list[int]:
    """One global batch with every bucket's token share (see the module docstring)."""
    lengths = []
    for upper, share in BUCKETS:
        target, total = share * tokens, 0
        while True:
            s = rng.randint(upper // 2 + 1, upper)
            if abs(total + s - target) >= abs(total - target):
                break  # this draw would take the bucket further from its share: the bucket is full
            lengths.append(s)
            total += s
    rng.shuffle(lengths)
    return lengths


COST_MODELS = {
    # name: (how to build it, what it is)
    "h100": (
        CostModel.default,
        "roofline of one H100 (`--hardware h100`: 45% / 60% of bf16 peak in attention / GEMMs)",
    ),
    "bytescale": (CostModel.bytescale, "a, b, c fitted to ByteScale's per-layer LLaMA-7B times, H100 links"),
}


def lower_bounds(plan, metrics, cost) -> dict:
    """Two floors under any plan's step time: the slowest single piece (a k-rank sequence alone in its
    micro-batch) and the mean work per rank, each plus the gradient all-reduce."""
    piece = max((cost.split_piece_time(p.length, p.group, p.ulysses) for p in plan.pieces()), default=0.0)
    mean_busy = sum(metrics.busy_s) / len(metrics.busy_s)
    return {"piece_s": piece + metrics.allreduce_s, "mean_busy_s": mean_busy + metrics.allreduce_s}


def run(seeds: list[int], delta: float, progress: bool, cost_names=tuple(COST_MODELS)) -> dict:
    batches = [draw_batch(random.Random(seed)) for seed in seeds]
    all_lengths = [s for b in batches for s in b]
    out = {
        "seeds": seeds,
        "samples": len(all_lengths) / len(batches),
        "tokens": sum(all_lengths) / len(batches),
        "max_length": max(all_lengths),
        "le4k": sum(s <= 4 * K for s in all_lengths) / len(all_lengths),
        "ge128k": sum(s > 64 * K for s in all_lengths) / len(all_lengths),
        "shares": {u: sum(s for s in all_lengths if u // 2 < s <= u) / sum(all_lengths) for u, _ in BUCKETS},
        "models": {},
    }
    t0, c0 = time.perf_counter(), time.process_time()
    for name in cost_names:
        cost = COST_MODELS[name][0]()
        runs = compare_planners(batches, WORLD, C, cost, delta=delta, progress=progress)
        summary = summarize(runs)
        bounds = [lower_bounds(p, m, cost) for p, m in zip(runs["balanced"].plans, runs["balanced"].metrics)]
        # the first wave's balanced planner: rings of ceil(s / C) ranks only
        rings = compare_planners(batches, WORLD, C, cost, delta=delta, planners=("balanced",), attention_split="ring")
        ring_bounds = [lower_bounds(p, m, cost) for p, m in zip(rings["balanced"].plans, rings["balanced"].metrics)]
        ring_summary = summarize({**runs, "balanced": rings["balanced"]})["balanced"]
        out["models"][name] = {
            "cost": cost,
            "summary": summary,
            "rings": ring_summary,
            "ring_piece_floor_s": sum(b["piece_s"] for b in ring_bounds) / len(ring_bounds),
            "piece_floor_s": sum(b["piece_s"] for b in bounds) / len(bounds),
            "work_floor_s": sum(b["mean_busy_s"] for b in bounds) / len(bounds),
            "naive_spreads": [m.busy_spread for m in runs["naive"].metrics],
        }
    if "bytescale" in out["models"]:
        out["variants"] = variants(batches[0], delta)
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    return out


def _three(lengths, plans, cost, delta) -> dict:
    """Step times of the static and naive ``plans`` and of a balanced plan made for ``cost``."""
    from hf_hdp.planning.balanced import plan_balanced
    from hf_hdp.planning.metrics import plan_metrics

    balanced = plan_balanced(lengths, WORLD, C, cost=cost, delta=delta)
    return {
        "static": plan_metrics(plans["static"], cost).step_time_s,
        "naive": plan_metrics(plans["naive"], cost).step_time_s,
        "balanced": plan_metrics(balanced, cost).step_time_s,
    }


def scale_links(cost, f: float):
    return replace(cost, intra_bandwidth=cost.intra_bandwidth * f, inter_bandwidth=cost.inter_bandwidth * f)


def variants(lengths, delta) -> dict:
    """What-ifs on the first batch with the ``bytescale`` cost model, to locate the differences."""
    from hf_hdp.planning import plan_naive, plan_static
    from hf_hdp.planning.metrics import plan_metrics

    base = CostModel.bytescale()
    plans = {"static": plan_static(lengths, WORLD, C), "naive": plan_naive(lengths, WORLD, C)}
    out = {}
    # links slowed so that the static step matches the paper's 8m40s: T(f) ~ A + B / f, from f = 1 and 1/2
    out["base"] = _three(lengths, plans, base, delta)
    t1 = out["base"]["static"]
    t2 = plan_metrics(plans["static"], scale_links(base, 0.5)).step_time_s
    B = t2 - t1
    A = t1 - B
    f = B / (PAPER["case_step_s"]["static"] - A) if PAPER["case_step_s"]["static"] > A else 1.0
    out["slow_links"] = {"factor": f, **_three(lengths, plans, scale_links(base, f), delta)}
    free = replace(base, intra_bandwidth=math.inf, inter_bandwidth=math.inf, intra_latency=0.0, inter_latency=0.0)
    out["free_comm"] = _three(lengths, plans, free, delta)
    return out


def mmss(s: float) -> str:
    m, sec = divmod(round(s), 60)
    return f"{m}m{sec:02d}s"


def render(res: dict, command: str) -> str:
    P, case = PAPER, PAPER["case_step_s"]
    pct = lambda x: f"{x:.1%}"
    exp_le4k, exp_ge128k = expected_sample_fractions()
    first = next(iter(res["models"].values()))["summary"]["static"]
    lines = [
        "# Paper check: ByteScale's LLaMA-7B, 2M-context, 1,024-GPU case study",
        "",
        f"Produced by `{command}` ({res['cpu_s']:.0f} s of CPU time, one core). Our figures are "
        f"means over {len(res['seeds'])} global batches (seeds {res['seeds'][0]}-{res['seeds'][-1]}), each "
        "planned three ways and timed by the analytic cost model (`hf_hdp.planning.metrics.plan_metrics`): "
        "they are estimates, not runs. Speedups are total static step time over total step time. The "
        "paper's figures are measurements on GPUs (ByteScale, arXiv 2502.21231; docs/design.md §1).",
        "",
        f"Setup: {WORLD:,} ranks ({RANKS_PER_NODE} per node), C = {C:,} tokens per rank, global batch of "
        f"32M tokens (drawn: mean {res['tokens']:,.0f} tokens in {res['samples']:,.0f} samples, longest "
        f"{res['max_length']:,}), length mix below. Static mesh: DP = {first['dp']} x CP = {first['cp']} "
        "(CP sized by the longest sample, rounded up to a divisor of the world; a sample over 1M tokens "
        "needs more than 128 ranks, so CP = 256 as in the paper).",
        "",
        "| | static mesh | naive HDP | balanced HDP |",
        "|---|---:|---:|---:|",
    ]
    for name, r in res["models"].items():
        s = r["summary"]
        st, nv, bl = (s[n] for n in PLANNER_ORDER)
        tag = f"**ours, {name}**"
        lines += [
            f"| {tag}: step time | {st['step_time_s']:.1f} s ({mmss(st['step_time_s'])}) "
            f"| {nv['step_time_s']:.1f} s ({mmss(nv['step_time_s'])}) | {bl['step_time_s']:.1f} s ({mmss(bl['step_time_s'])}) |",
            f"| {tag}: speedup over static | 1.00 | {nv['speedup_vs_static']:.2f} | {bl['speedup_vs_static']:.2f} |",
            f"| {tag}: slowest / fastest rank (busy time) | {st['rank_spread']:.2f}x | {nv['rank_spread']:.2f}x "
            f"| {bl['rank_spread']:.2f}x |",
            f"| {tag}: imbalance (max / mean busy) | {st['imbalance']:.2f} | {nv['imbalance']:.2f} | {bl['imbalance']:.2f} |",
            f"| {tag}: exposed P2P share of busy time | {pct(st['p2p_time_fraction'])} | {pct(nv['p2p_time_fraction'])} "
            f"| {pct(bl['p2p_time_fraction'])} |",
            f"| {tag}: P2P bytes per step | {fmt_bytes(st['p2p_bytes'])} | {fmt_bytes(nv['p2p_bytes'])} "
            f"| {fmt_bytes(bl['p2p_bytes'])} |",
            f"| {tag}: splits of the long samples (samples per step) | ring | ring "
            f"| {_splits(bl, len(res['seeds']))} |",
            f"| {tag}: balanced with rings only (`attention_split='ring'`): step, speedup, imbalance, exposed P2P | "
            f"| | {r['rings']['step_time_s']:.1f} s, {r['rings']['speedup_vs_static']:.2f}, "
            f"{r['rings']['imbalance']:.2f}, {pct(r['rings']['p2p_time_fraction'])} |",
        ]
    planning = next(iter(res["models"].values()))["summary"]
    lines += [
        f"| ours: planning time (one core, mean per batch) | {planning['static']['planning_time_s']:.2f} s "
        f"| {planning['naive']['planning_time_s']:.2f} s | {planning['balanced']['planning_time_s']:.2f} s |",
        "| paper ablation: speedup | 1.00 | 1.59 (dynamic communication); 2.01 (+ offloading) "
        "| 3.69 (+ balance scheduler); 3.89 (+ remote loader) |",
        f"| paper case study: step time | {mmss(case['static'])} | {mmss(case['naive'])} | {mmss(case['balanced'])} |",
        f"| paper case study: speedup | 1.00 | {case['static'] / case['naive']:.2f} | {case['static'] / case['balanced']:.2f} |",
        f"| paper case study: slowest / fastest rank | | {P['naive_spread']}x | removed |",
        "| paper case study: P2P share of micro-batch time | 97.6% | | |",
        "",
        "Cost models: "
        + "; ".join(f"**{n}**: {COST_MODELS[n][1]} (`{r['cost'].label}`)" for n, r in res["models"].items())
        + ". Both include the one gradient all-reduce per step "
        f"({next(iter(res['models'].values()))['summary']['static']['allreduce_s']:.2f} s). Floors under the "
        "balanced step: "
        + "; ".join(
            f"{n}: slowest single piece {r['piece_floor_s']:.1f} s, mean work per rank {r['work_floor_s']:.1f} s"
            for n, r in res["models"].items()
        )
        + ".",
        "",
        *render_variants(res),
        *render_explanation(res),
        "## Length mix used",
        "",
        "Token share per bucket (a bucket `U` holds lengths in `(U/2, U]`); the first five are ByteScale's "
        "published shares, the rest our spread (see the docstring of `benchmarks/paper_check.py`):",
        "",
        "| bucket | " + " | ".join(_kfmt(u) for u, _ in BUCKETS) + " |",
        "|---|" + "---:|" * len(BUCKETS),
        "| target | " + " | ".join(f"{sh * 100:.3f}".rstrip("0").rstrip(".") + "%" for _, sh in BUCKETS) + " |",
        "| drawn | " + " | ".join(f"{res['shares'][u]:.1%}" for u, _ in BUCKETS) + " |",
        "",
        f"Samples of at most 4K tokens: {res['le4k']:.1%} drawn ({exp_le4k:.1%} expected; paper: about 80%). "
        f"Samples over 64K (the 128K bucket and above): {res['ge128k']:.2%} drawn ({exp_ge128k:.2%} expected; "
        "paper: about 1%).",
        "",
    ]
    return "\n".join(lines)


def render_variants(res: dict) -> list[str]:
    v = res.get("variants")
    if not v:
        return []
    rows = [
        ("the bytescale cost model as above", v["base"], None),
        (f"links x{v['slow_links']['factor']:.2f}: static step = the paper's 8m40s", v["slow_links"], None),
        ("free communication (infinite bandwidth, no latency)", v["free_comm"], None),
    ]
    lines = [
        "## What-ifs (first batch, bytescale cost model)",
        "",
        "| variant | static | naive HDP | balanced HDP | naive speedup | balanced speedup | balanced / naive |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, d, _ in rows:
        lines.append(
            f"| {label} | {d['static']:.1f} s | {d['naive']:.1f} s | {d['balanced']:.1f} s | "
            f"{d['static'] / d['naive']:.2f} | {d['static'] / d['balanced']:.2f} | {d['naive'] / d['balanced']:.2f} |"
        )
    lines.append("")
    return lines


def render_explanation(res: dict) -> list[str]:
    m = res["models"]
    name = "bytescale" if "bytescale" in m else next(iter(m))
    r = m[name]
    st, nv, bl = (r["summary"][n] for n in PLANNER_ORDER)
    case = PAPER["case_step_s"]
    compute_static = st["step_time_s"] * (1 - st["p2p_time_fraction"])
    lines = [
        "## Where we agree, and the differences we cannot close",
        "",
        f"Figures below are from the **{name}** rows unless named.",
        "",
        f"- **Agree: the static mesh is a communication machine.** {st['p2p_time_fraction']:.1%} of its busy time is "
        f"exposed P2P (paper: 97.6% of micro-batch time), leaving about {compute_static:.0f} s of compute per "
        f"rank (the paper's 2.4% of 8m40s is {0.024 * case['static']:.1f} s).",
        f"- **Close: naive HDP's rank spread.** The slowest rank is busy {nv['rank_spread']:.1f}x as long as the "
        f"fastest on average, {min(r['naive_spreads']):.1f}x to {max(r['naive_spreads']):.1f}x over the batches "
        "(paper: 4.7x).",
        f"- **Static step time: {mmss(st['step_time_s'])} vs 8m40s.** Our inter-node links are faster than what "
        "ByteScale measured: slowing every link to match 8m40s (what-if table) leaves the speedups where they are, "
        "so this gap does not explain the others.",
        f"- **No offloading, no remote loader.** hf_hdp implements neither, so the ablation's 2.01 (+ offloading) and "
        f"3.89 (+ remote loader) have no counterpart here; our naive HDP corresponds to the 1.59 row (dynamic "
        "communication), and the paper gives no balance-scheduler figure without offloading. The case study's "
        f"naive-to-balanced ratio ({case['naive'] / case['balanced']:.2f}) matches the ablation's 2.01 -> 3.69 "
        f"({3.69 / 2.01:.2f}) and its static-to-naive ratio ({case['static'] / case['naive']:.2f}) is near the "
        "ablation's 2.01, so its naive HDP very likely ran with offloading too.",
        f"- **Naive HDP over static: {nv['speedup_vs_static']:.2f} vs 1.59 (1.91 in the case study). Not closed.** "
        "Our static mesh has the paper's composition (above), so the gap is on the HDP side: the model's naive "
        f"step is {mmss(nv['step_time_s'])}, the paper's {mmss(case['naive'])}. The model leaves out costs that a "
        "real HDP step pays and a static step hides or shares: data loading (the remote loader's 3.69 -> 3.89 says "
        "loading stalled the measured HDP runs), host work and kernel launches for thousands of small varlen "
        "sequences, many concurrent rings of different sizes contending for NICs and switches (the model gives "
        "every rank its full link at all times), recomputation under activation checkpointing (the forward ring "
        "runs again), and the ZeRO-1 optimizer step. We cannot size these without GPUs.",
        f"- **Balanced over naive: {nv['step_time_s'] / bl['step_time_s']:.2f}x vs the paper's "
        f"{case['naive'] / case['balanced']:.2f}x; with rings only {nv['step_time_s'] / r['rings']['step_time_s']:.2f}x.** "
        f"With rings only (the first wave, and ByteScale's design) the balanced step ({r['rings']['step_time_s']:.1f} s) "
        f"sits at its floor: the slowest single piece, the longest sample on its ring, alone in its micro-batch "
        f"({r['ring_piece_floor_s']:.1f} s with the all-reduce; mostly exposed ring communication across nodes). A "
        "ring moves about the whole sequence's K/V past every member whatever k, so neither placement nor a wider "
        "ring removes that floor, and naive HDP was already close to it. Head parallelism does: a hybrid piece "
        "(Ulysses inside nodes x ring across them) cuts each member's ring traffic by the Ulysses degree, and the "
        "planner gives the longest samples wider groups where that pays (splits row). The balanced step "
        f"({bl['step_time_s']:.1f} s) now sits near the mean work per rank ({r['work_floor_s']:.1f} s with the "
        f"all-reduce; slowest piece {r['piece_floor_s']:.1f} s). So our balanced/naive ratio exceeds the paper's: "
        "ByteScale's balance scheduler keeps rings, and its 1.73x is the ring-only regime's gain with offloading "
        "(which raises the members' compute and gives the scheduler imbalance to remove). Even with free "
        f"communication, the what-if gain is {res['variants']['free_comm']['naive'] / res['variants']['free_comm']['balanced']:.2f}x.",
        f'- **Balanced HDP\'s remaining spread: {bl["rank_spread"]:.2f}x vs "removed".** The slowest piece '
        f"({r['piece_floor_s']:.1f} s) against the mean work per rank ({r['work_floor_s']:.1f} s), both with the "
        "all-reduce: where the first is larger, there is not enough work to keep the ranks outside the longest "
        "sample's group busy for that long.",
        "- **The static baseline.** Ours is DP = 4 x CP = 256 on every batch, as in the paper, with every sequence "
        "zigzag-split over its CP group and packed up to C tokens per rank. How ByteScale's baseline packs "
        "micro-batches is not published; a baseline that ran fewer, fuller rings would be faster than ours.",
        "- **The data.** Only the token shares of the buckets of 128K and more are published; the rest of the mix "
        'is ours (below). We read "2M" as lengths in (1M, 2M], so the longest drawn sample is '
        f"{res['max_length']:,} tokens, not 2,097,152.",
        "",
    ]
    return lines


def _splits(summary: dict, steps: int) -> str:
    kinds = ", ".join(f"{k} {n / steps:.0f}" for k, n in summary.get("splits", {}).items() if k != "local")
    degrees = ", ".join(f"u={u}: {n / steps:.0f}" for u, n in summary.get("ulysses_degrees", {}).items())
    return kinds + (f" ({degrees})" if degrees else "")


def _kfmt(u: int) -> str:
    return f"{u // M}M" if u >= M else f"{u // K}K" if u >= K else str(u)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="global batches to average over (seeds 0..N-1)")
    p.add_argument("--delta", type=float, default=0.05, help="balance scheduler tolerance")
    p.add_argument("--write", action="store_true", help="write docs/paper_check.md")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr")
    p.add_argument("--cost", nargs="+", choices=list(COST_MODELS), default=list(COST_MODELS), help="cost models")
    args = p.parse_args(argv)
    command = (
        ".venv/bin/python benchmarks/paper_check.py"
        + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
        + (f" --delta {args.delta}" if args.delta != 0.05 else "")
        + " --write"
    )
    res = run(list(range(args.seeds)), args.delta, args.progress or sys.stderr.isatty(), tuple(args.cost))
    text = render(res, command)
    print(text)
    if args.write:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "paper_check.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"\nwritten to {os.path.normpath(path)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
