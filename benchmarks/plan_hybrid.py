"""How a hybrid linear-attention model's 3:1 layer mix moves where a long sample's time goes, and so k and the split.

    .venv/bin/python benchmarks/plan_hybrid.py                       # 64 and 1,024 ranks, 2 batches each
    .venv/bin/python benchmarks/plan_hybrid.py --worlds 64 --steps 1 --hardware h100

Models (transformers configs, built with ``AutoConfig.for_model``; bf16 activations):

- ``qwen3.5-9b``: transformers' default ``qwen3_5_text`` config, the released Qwen3.5-9B text shapes: hidden 4096,
  32 layers, 3 Gated DeltaNet : 1 full attention (``layer_types``), 16 attention heads / 4 KV heads of 256 (with
  the output gate), linear 16 key heads x 128 and 32 value heads x 128, kernel 4, MLP 12288, vocabulary 248,320;
- ``all-attention``: the same config with every layer ``full_attention`` (same hidden size, heads, MLP).

Lengths: ``hf-hdp plan``'s built-in corpus (the Python standard library's files, bytes / 3.6 tokens; median about
1.9K, longest about 216K); global batch ``4 x world x C`` tokens (``hf-hdp plan``'s default), C = 8,192, drawn with
:func:`hf_hdp.planning.compare.draw_batches` (seed 0). Planners and metrics: :func:`~hf_hdp.planning.compare.
compare_planners` (static mesh and balanced HDP with ``attention_split="auto"``), the analytic cost model of each
config on ``--hardware`` (default h100: 8 ranks per node). Printed per world and model: the step time of each planner
(estimates, not measurements), balanced over static, P2P bytes, and for the samples split over several ranks by the
balanced planner: how many, their mean group size ``k`` and the mean ``k / ceil(s / C)`` (how much wider than the
fewest ranks the planner made them), the attention splits (ring / Ulysses / hybrid), and for the hybrid model the
method of the Gated DeltaNet layers per split segment (head-parallel / state scan, :meth:`CostModel.state_methods`).
Then the longest sample of the corpus alone: its one-rank time per model and the share of attention in it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import AutoConfig

from hf_hdp.corpus import stdlib_lengths
from hf_hdp.planning.compare import compare_planners, draw_batches, summarize
from hf_hdp.planning.cost import CostModel
from hf_hdp.planning.cost.model import segments_of

C = 8192


def models(hardware: str) -> dict[str, CostModel]:
    hybrid = AutoConfig.for_model("qwen3_5_text")
    dense = AutoConfig.for_model("qwen3_5_text", layer_types=["full_attention"] * hybrid.num_hidden_layers)
    return {
        "qwen3.5-9b (24 GDN + 8 full)": CostModel.from_config(hybrid, hardware, name="qwen3.5-9b"),
        "all-attention (32 full)": CostModel.from_config(dense, hardware, name="qwen3.5-9b all-attention"),
    }


def split_figures(runs, cost: CostModel) -> dict:
    ks, widen, splits, methods = [], [], {}, {}
    for plan in runs["balanced"].plans:
        seen = set()
        for mb in plan.micro_batches:
            for p in mb.pieces:
                if p.k > 1 and p.sample not in seen:
                    seen.add(p.sample)
                    ks.append(p.k)
                    widen.append(p.k / -(-p.length // C))
                    splits[p.split] = splits.get(p.split, 0) + 1
            for seg in segments_of(mb.pieces):
                if len(seg.group) > 1 and mb.rank == seg.group[0]:
                    for method in cost.state_methods(
                        seg.lengths, len(seg.group), seg.ulysses, cost.group_spans_nodes(seg.group)
                    ).values():
                        methods[method] = methods.get(method, 0) + 1
    n = len(ks)
    return {
        "split_samples": n,
        "mean_k": sum(ks) / n if n else 0,
        "max_k": max(ks) if ks else 0,
        "mean_widening": sum(widen) / n if n else 0,
        "splits": splits,
        "state_methods": methods,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="64,1024")
    ap.add_argument("--steps", type=int, default=2, help="global batches per world (default 2)")
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--tokens-per-rank", type=int, default=8192, help="C (default 8,192, hf-hdp plan's)")
    args = ap.parse_args()
    global C
    C = args.tokens_per_rank
    pool = stdlib_lengths()
    costs = models(args.hardware)
    print(
        f"plan_hybrid: {args.hardware}, C = {C:,}, corpus {len(pool):,} files (longest {max(pool):,} tokens), "
        f"global batch 4 x world x C tokens, {args.steps} batch(es) per world, seed 0"
    )
    for world in (int(w) for w in args.worlds.split(",")):
        batches = draw_batches([s for s in pool if s <= world * C], args.steps, 0, tokens=4 * world * C)
        print(
            f"\n== {world:,} ranks: {sum(len(b) for b in batches) / len(batches):,.0f} samples, "
            f"{sum(sum(b) for b in batches) / len(batches):,.0f} tokens per batch"
        )
        head = (
            f"{'model':<30} {'static':>9} {'balanced':>9} {'speedup':>8} {'P2P bal.':>10} {'split':>6} "
            f"{'mean k':>7} {'max k':>6} {'k/k_min':>8}  attention splits / GDN methods (split samples and segments: totals "
            f"over the batches)"
        )
        print(head)
        for name, cost in costs.items():
            runs = compare_planners(batches, world, C, cost, planners=("static", "balanced"))
            s = summarize(runs)
            f = split_figures(runs, cost)
            splits = ", ".join(f"{k} {v}" for k, v in sorted(f["splits"].items()))
            methods = ", ".join(f"{k} {v}" for k, v in sorted(f["state_methods"].items())) or "-"
            print(
                f"{name:<30} {s['static']['step_time_s']:>8.2f}s {s['balanced']['step_time_s']:>8.2f}s "
                f"{s['balanced']['speedup_vs_static']:>7.2f}x {s['balanced']['p2p_bytes'] / 1e9:>8.1f}GB "
                f"{f['split_samples']:>6} {f['mean_k']:>7.2f} {f['max_k']:>6} "
                f"{f['mean_widening']:>8.2f}  {splits} / {methods}   (planned in {s['balanced']['planning_time_s']:.2f} s)"
            )
    longest = max(pool)
    print(f"\nthe longest file alone ({longest:,} tokens) on one rank:")
    for name, cost in costs.items():
        t = cost.sequence_time(longest)
        print(
            f"  {name:<30} {t:8.2f} s, attention {cost.attention_time(longest) / t:5.1%} of it, "
            f"Gated DeltaNet convolution and recurrence {cost.state_local_time(longest) / t:5.1%}"
        )


if __name__ == "__main__":
    main()
