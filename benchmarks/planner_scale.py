"""Planner scale: how long balanced HDP planning takes, from 8 to 12,288 ranks, on one core.

    .venv/bin/python benchmarks/planner_scale.py
    .venv/bin/python benchmarks/planner_scale.py --worlds 8,12288 --repeat 5

The global batch grows with the world: 32M tokens at 12,288 ranks (ByteScale's largest run), i.e.
``32M * world / 12288`` tokens (2,731 per rank), C = 8,192 tokens per rank, the LLaMA-7B / H100
cost model, 8 ranks per node. Two length mixes:

- ``production``: ByteScale's published token shares (2M 12.1%, 1M 9.7%, 512K 7.3%, 256K 8.8%,
  128K 6.4%), a bucket ``U`` holding lengths uniform in ``(U/2, U]``; the other 55.7% of tokens
  spread as ``benchmarks/paper_check.py`` spreads them (8K-64K buckets 11.1% each, 512-4K
  buckets 2.825% each). Samples longer than ``world * C`` cannot be placed and are left out (so
  small worlds get fewer tokens than the formula).
- ``stdlib``: lengths drawn with replacement from :func:`hf_hdp.corpus.stdlib_lengths`, those
  that fit the world.

Times are CPU seconds of this process (``time.process_time``, best of ``--repeat``), so other
load on the machine does not inflate them. ``balanced`` is :func:`plan_balanced` as the trainer
calls it, including its never-slower-than-naive guard (it also builds the naive plan and measures
the step time); ``schedule`` is the balance scheduler alone (``never_worse_than_naive=False``);
``naive.py`` is :func:`~hf_hdp.planning.naive.plan_naive` (``O(n log W)``), for context.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from paper_check import draw_batch

from hf_hdp.corpus import stdlib_lengths
from hf_hdp.planning import plan_naive
from hf_hdp.planning.balanced import plan_balanced
from hf_hdp.planning.cost import CostModel

K, M = 1 << 10, 1 << 20
C = 8 * K
WORLDS = (8, 64, 512, 2048, 12288)
TOKENS_AT_12288 = 32 * M
REFERENCES = [
    ("WLB-LLM planner (published)", 0.020),
    ("FlexSP solver, low end (published)", 5.0),
    ("FlexSP solver, high end (published)", 15.0),
]


def production_batch(rng: random.Random, tokens: int, limit: int) -> list[int]:
    """ByteScale's production mix, as benchmarks/paper_check.py draws it (its bucket shares)."""
    return [s for s in draw_batch(rng, tokens) if s <= limit]


def stdlib_batch(rng: random.Random, tokens: int, limit: int) -> list[int]:
    pool = [s for s in stdlib_lengths() if s <= limit]
    batch, total = [], 0
    while total < tokens:
        batch.append(rng.choice(pool))
        total += batch[-1]
    return batch


def cpu_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default=",".join(map(str, WORLDS)))
    ap.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--skip-naive", action="store_true", help="do not time naive.py's planner")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    cost = CostModel.default()

    print(
        f"Balanced HDP planning time (CPU seconds, one core, best of {args.repeat}); C = {C}, "
        f"{cost.label}, 32M tokens at 12,288 ranks scaled with the world."
    )
    for label, seconds in REFERENCES:
        print(f"  reference: {label}: {seconds * 1000:,.0f} ms")
    wall0 = time.perf_counter()
    for mix, draw in (("production", production_batch), ("stdlib", stdlib_batch)):
        print(f"\n{mix} mix")
        print(
            f"{'ranks':>6} {'tokens':>12} {'samples':>8} {'k>1':>6} {'max k':>6} | {'balanced':>10} {'growth':>7}"
            f" {'schedule':>10} | {'naive.py':>10}"
        )
        prev = None
        for w in worlds:
            lengths = draw(random.Random(w), TOKENS_AT_12288 * w // 12288, w * C)
            if not lengths:
                print(f"{w:>6}  (no sample fits)")
                continue
            plan = plan_balanced(lengths, w, C, cost=cost)
            ks = [p.k for p in plan.pieces()]
            t_bal = cpu_time(lambda: plan_balanced(lengths, w, C, cost=cost), args.repeat)
            t_sched = cpu_time(
                lambda: plan_balanced(lengths, w, C, cost=cost, never_worse_than_naive=False), args.repeat
            )
            t_naive = None if args.skip_naive else cpu_time(lambda: plan_naive(lengths, w, C), 1)
            growth = f"{t_bal / prev:6.1f}x" if prev else "      -"
            prev = t_bal
            naive_cell = "-" if t_naive is None else f"{t_naive * 1000:8.1f}ms"
            print(
                f"{w:>6} {sum(lengths):>12,} {len(lengths):>8,} {sum(k > 1 for k in ks):>6,} {max(ks):>6} | "
                f"{t_bal * 1000:8.1f}ms {growth} {t_sched * 1000:8.1f}ms | {naive_cell:>10}"
            )
    print(f"\n(total wall time {time.perf_counter() - wall0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
