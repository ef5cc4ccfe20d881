"""Peer planners: balanced HDP against Megatron-core's hybrid context-parallel scheduler, same batches, our cost model.

    .venv/bin/pip install --no-deps "megatron-core==0.16.1"     # once; never a dependency of hf_hdp
    .venv/bin/python benchmarks/peer_planners.py                  # 64..1,024 ranks, 3 batches each
    .venv/bin/python benchmarks/peer_planners.py --world-sizes 64,1024 --batches 5 --json
    .venv/bin/python benchmarks/peer_planners.py --lengths lengths.txt --cost bytescale

Install: megatron-core 0.16.x needs only torch, numpy and packaging for this import, all already in
the venv; ``--no-deps`` keeps pip from touching torch (2.13.0 CPU here). It is imported only by this
benchmark. Without it the benchmark prints the install command and exits with status 2.

What is compared
----------------
*Ours*: :func:`hf_hdp.planning.plan_balanced` under the cost model (``--cost``, default
:meth:`~hf_hdp.planning.cost.CostModel.default`, LLaMA-7B on H100, 8 ranks per node), with
``attention_split=--attention-split`` when ``plan_balanced`` takes that keyword.

*Megatron*: ``megatron.core.pipeline_parallel.hybrid_cp_schedule.BalancedCPScheduler`` (megatron-core
0.16.1), the scheduler Megatron-LM's ``HybridCPDataLoaderWrapper`` calls once per global batch:
``BalancedCPScheduler(max_seq_len_per_rank=C, dp_cp_group=g).get_groups_and_subsamples(
[(sample_id, length), ...], config)``. Its constructor reads only ``g.size()``; ``config`` is not
read. So the group is a stand-in object whose ``size()`` returns the world size (:class:`WorldGroup`);
no torch.distributed initialisation is needed (the module imports torch and ``parallel_state``,
neither is called). ``max_seq_len_per_rank`` is Megatron's name for our ``tokens_per_rank``: a sample
of ``s`` tokens gets ``2**ceil(log2(s / C))`` ranks. Its own workload estimate is ``s**2 / k``;
it balances by that, the step is then timed by OUR model like every other plan.

It returns ``sample_id_groups``: a list of *rounds* ("groups" in Megatron's words), each a list of
``world`` lists of sample ids, one per rank, in the order the rank runs them. How
``hybrid_context_parallel_forward_backward`` runs it: per round, every rank runs its sub-samples one
after the other, each as its own forward and backward pass of ONE sequence on the ``local_cp_size``
ranks that hold it; a ``torch.distributed.barrier`` over all DPxCP ranks ends every round.

Conversion into our :class:`~hf_hdp.planning.plan.StepPlan` (:func:`megatron_to_plan`):

- a sample's group is the sorted tuple of the ranks whose list holds it in its round (Megatron's
  ``local_cp_size`` is exactly that count); a sample on one rank is a ``k == 1`` piece;
- ``"rounds"`` form (the headline): round ``j`` is slot ``j``, all sub-samples one rank holds in that
  round are the pieces of ONE micro-batch, ``meta["slot_barrier"] = True`` (every slot a barrier of
  all ranks, :mod:`hf_hdp.planning.metrics`). Where a round holds more than ``C`` tokens on one rank
  the plan is built with ``tokens_per_rank`` raised to the largest such micro-batch (printed); no
  sample is dropped. Packing a round into one micro-batch is the one approximation: it charges the
  per-micro-batch overhead once per round instead of once per sub-sample, and lets the sub-samples of
  one group share a ring segment. Both favour Megatron;
- ``"sequential"`` form (``sequential=True``, "one fwd/bwd per sub-sample" in the table): the i-th
  sub-sample of a rank in round ``j`` is its own micro-batch in slot ``start_j + i`` (members of a group
  hold the same list, so they share the slot), every micro-batch holds at most ``C`` tokens, and the
  round barriers are applied by :func:`round_barrier_metrics`: each round is timed by
  :func:`~hf_hdp.planning.metrics.plan_metrics` on its own (no barriers inside a round), the rounds'
  critical paths are summed and the gradient all-reduce added. This is how Megatron runs the schedule.

Where Megatron loses (per world size, mean over the batches):

(a) power-of-two groups: samples on more ranks than ``ceil(s / C)`` (rounded up, or widened by its
    ``fill_empty_gpus`` so that no rank idles in a round), the extra ranks, and the extra
    rank-seconds: ``k * piece_time(s, k) - k_min * piece_time(s, k_min)`` summed over those samples
    (each priced alone in a micro-batch). Also the step time of the rounds plan with every group cut
    to its first ``k_min`` members (same rounds, the other members idle): rounding itself does not
    lengthen a step under our model, it wastes ranks the scheduler could give other work;
(b) round barriers: the rounds plan (and the sequential one) timed with and without them;
(c) head parallelism: our plan with ``attention_split="ring"`` against our default (only where
    ``plan_balanced`` has ``attention_split``; Megatron's pieces are priced as rings, as its hybrid CP
    runs them);
(d) critical path: each plan's floor, its longest single micro-batch plus the all-reduce, and how much
    other work the rank of that micro-batch carries. Megatron's ``fill_empty_gpus`` gives every rank
    work in every round, so the ranks of its longest sample also run the later rounds.

Megatron's pre-built hybrid DPxCP communicators are aligned power-of-two blocks, looked up by
``local_cp_size``; the table counts the scheduler's groups that are not such blocks (0 in our runs).

Global batches: ``--batches`` batches per world drawn by :func:`hf_hdp.planning.compare.draw_batches`
(``random.Random(--seed)``) from ``--lengths FILE`` (:func:`hf_hdp.cli.read_lengths_file`, the CLI's
loader) or the Python standard library's files (:func:`hf_hdp.cli.stdlib_pool`, ``hf-hdp plan``'s
default), ``32,768 x world`` tokens each (33,554,432 at 1,024 ranks) unless ``--global-batch-tokens``
fixes the budget. Both planners get the same batches. All step times are estimates of the analytic
cost model, not measurements.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_hdp.cli import CLIError, parse_size, read_lengths_file, stdlib_pool
from hf_hdp.planning import CostModel, MicroBatch, Piece, PlanError, StepPlan, build_plan, plan_balanced
from hf_hdp.planning.compare import DoesNotFit, check_fits, draw_batches
from hf_hdp.planning.cost import HARDWARE_PRESETS, MODEL_PRESETS
from hf_hdp.planning.metrics import PlanMetrics, idle_fraction, plan_metrics

MEGATRON_VERSION = "0.16.1"
INSTALL = f'.venv/bin/pip install --no-deps "megatron-core=={MEGATRON_VERSION}"'
MEGATRON_CLASS = "megatron.core.pipeline_parallel.hybrid_cp_schedule.BalancedCPScheduler"
TOKENS_PER_RANK_OF_BATCH = 32768  # 32M tokens at 1,024 ranks (ByteScale's global batch)
WORLDS = (64, 128, 256, 512, 1024)
TARGET = 1.3  # ours should be at least this much shorter than Megatron's rounds plan

COST_MODELS = {
    "h100": (CostModel.default, "LLaMA-7B on H100 (CostModel.default)"),
    "bytescale": (CostModel.bytescale, "LLaMA-7B fitted to ByteScale's per-layer times (CostModel.bytescale)"),
}


def make_cost(name: str) -> CostModel:
    """``h100`` (default), ``bytescale``, or ``MODEL:HARDWARE`` of the presets (e.g. ``llama-13b:h100``)."""
    if name in COST_MODELS:
        return COST_MODELS[name][0]()
    model, _, hardware = name.partition(":")
    if model in MODEL_PRESETS and hardware in HARDWARE_PRESETS:
        return CostModel.from_specs(MODEL_PRESETS[model], HARDWARE_PRESETS[hardware])
    raise CLIError(
        f"unknown --cost {name!r}: use {', '.join(COST_MODELS)}, or MODEL:HARDWARE with a model of "
        f"{', '.join(MODEL_PRESETS)} and hardware of {', '.join(HARDWARE_PRESETS)}"
    )


# --------------------------------------------------------------------------- Megatron


class WorldGroup:
    """What ``BalancedCPScheduler`` reads of its ``dp_cp_group``: ``size()``, the number of DPxCP ranks."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def size(self) -> int:
        return self.world_size


def load_megatron():
    """``(BalancedCPScheduler, version)``; raises ImportError (or whatever the import raises) without megatron-core."""
    from importlib.metadata import version

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not used here
        warnings.simplefilter("ignore")
        from megatron.core.pipeline_parallel.hybrid_cp_schedule import BalancedCPScheduler
    return BalancedCPScheduler, version("megatron-core")


def megatron_groups_needed(length: int, tokens_per_rank: int) -> int:
    """Megatron's ``gpus_needed``: ``max(1, 2**ceil(log2(s / C)))``."""
    return max(1, 2 ** math.ceil(math.log2(length / tokens_per_rank)))


def megatron_schedule(scheduler_cls, lengths: Sequence[int], world_size: int, tokens_per_rank: int):
    """Megatron's rounds for one global batch: ``(sample_id_groups, seconds)``.

    ``sample_id_groups[j][r]`` lists the sample ids (positions in ``lengths``) rank ``r`` runs in round ``j``.
    """
    widest = max(megatron_groups_needed(s, tokens_per_rank) for s in lengths)
    if widest > world_size:
        raise PlanError(
            f"Megatron needs a power-of-two group of {widest} ranks for the longest sample "
            f"({max(lengths):,} tokens at C={tokens_per_rank:,}), more than the world of {world_size}"
        )
    t0 = time.perf_counter()
    scheduler = scheduler_cls(max_seq_len_per_rank=tokens_per_rank, dp_cp_group=WorldGroup(world_size))
    _, sample_id_groups = scheduler.get_groups_and_subsamples(list(enumerate(int(s) for s in lengths)), None)
    return sample_id_groups, time.perf_counter() - t0


# --------------------------------------------------------------------------- conversion


def megatron_to_plan(
    lengths: Sequence[int],
    world_size: int,
    tokens_per_rank: int,
    sample_id_groups: Sequence[Sequence[Sequence[int]]],
    sequential: bool = False,
) -> StepPlan:
    """Megatron's ``sample_id_groups`` (rounds x ranks x sample ids) as a validated :class:`StepPlan`.

    See the module docstring for the two forms. ``plan.meta`` holds ``rounds``, ``round_slots``
    (``[start, stop)`` slots of each round), ``requested_tokens_per_rank`` (``C``),
    ``max_tokens_on_rank`` (the fullest micro-batch) and ``over_capacity_micro_batches``; the plan's own
    ``tokens_per_rank`` is ``max(C, max_tokens_on_rank)``. Raises :class:`PlanError` when the
    schedule places a sample in two rounds, leaves one out, or (sequential form) gives the members of
    a group different orders.
    """
    lengths = [int(s) for s in lengths]
    W, C = world_size, tokens_per_rank
    round_of: dict[int, int] = {}
    placements: list[tuple[int, int, list[Piece]]] = []
    round_slots: list[list[int]] = []
    slot = 0
    for j, per_rank in enumerate(sample_id_groups):
        if len(per_rank) > W:
            raise PlanError(f"round {j} lists {len(per_rank)} ranks, more than the world of {W}")
        holders: dict[int, list[int]] = {}
        position: dict[int, int] = {}
        for r, ids in enumerate(per_rank):
            for i, sid in enumerate(ids):
                sid = int(sid)
                if not 0 <= sid < len(lengths):
                    raise PlanError(f"round {j}, rank {r}: sample id {sid} is outside the batch of {len(lengths)}")
                if round_of.setdefault(sid, j) != j:
                    raise PlanError(f"sample {sid} is scheduled in rounds {round_of[sid]} and {j}")
                if sequential and position.setdefault(sid, i) != i:
                    raise PlanError(
                        f"round {j}: sample {sid} is sub-sample {position[sid]} on one member and {i} on rank {r}"
                    )
                holders.setdefault(sid, []).append(r)
        pieces = {sid: Piece(sample=sid, length=lengths[sid], group=tuple(sorted(rs))) for sid, rs in holders.items()}
        width = max((len(ids) for ids in per_rank), default=0) if sequential else 1
        for r, ids in enumerate(per_rank):
            if not ids:
                continue
            if sequential:
                placements.extend((r, slot + i, [pieces[int(sid)]]) for i, sid in enumerate(ids))
            else:
                placements.append((r, slot, [pieces[int(sid)] for sid in ids]))
        round_slots.append([slot, slot + width])
        slot += width
    missing = [s for s in range(len(lengths)) if s not in round_of]
    if missing:
        raise PlanError(f"Megatron's schedule leaves {len(missing)} samples out, e.g. sample {missing[0]}")
    mbs = [MicroBatch(rank=r, slot=s, pieces=tuple(ps)) for r, s, ps in placements]
    sizes = [mb.num_tokens for mb in mbs]
    most = max(sizes, default=0)
    meta = {
        "source": MEGATRON_CLASS,
        "form": "sequential" if sequential else "rounds",
        "rounds": len(sample_id_groups),
        "round_slots": round_slots,
        "requested_tokens_per_rank": C,
        "max_tokens_on_rank": most,
        "over_capacity_micro_batches": sum(n > C for n in sizes),
    }
    if not sequential:
        meta["slot_barrier"] = True  # a barrier of all DPxCP ranks ends every round
    plan = build_plan(lengths, W, max(C, most), placements, planner="megatron", meta=meta)
    return plan.validate()


def without_barriers(plan: StepPlan) -> StepPlan:
    """The same placement with no barrier between slots (rings still couple their members)."""
    meta = {k: v for k, v in plan.meta.items() if k not in ("slot_barrier", "lockstep")}
    return replace(plan, meta=meta)


def round_barrier_metrics(plan: StepPlan, cost: CostModel, include_allreduce: bool = True) -> PlanMetrics:
    """:func:`plan_metrics` of a sequential-form plan with a barrier of all ranks after every round.

    Each round (its ``meta["round_slots"]``) is simulated on its own, without barriers inside it; the
    step is the sum of the rounds' critical paths plus the gradient all-reduce. Busy time, P2P and
    group sizes do not depend on barriers and come from the whole plan.
    """
    whole = plan_metrics(without_barriers(plan), cost, include_allreduce=include_allreduce)
    slots_time = 0.0
    for start, stop in plan.meta["round_slots"]:
        mbs = tuple(mb for mb in plan.micro_batches if start <= mb.slot < stop)
        if mbs:
            part = replace(plan, micro_batches=mbs, meta={})
            slots_time += plan_metrics(part, cost, include_allreduce=False).slots_time_s
    step = slots_time + whole.allreduce_s
    idle = idle_fraction(whole.busy_s, whole.collective_s, step)  # the all-reduce is communication, not idle
    return replace(whole, step_time_s=step, slots_time_s=slots_time, idle_fraction=idle)


def minimal_groups(plan: StepPlan, tokens_per_rank: int) -> StepPlan:
    """``plan`` with every piece's group cut to its first ``ceil(s / C)`` members (same slots; the rest idle)."""
    C = tokens_per_rank
    cut = {p.sample: replace(p, group=p.group[: max(1, math.ceil(p.length / C))]) for p in plan.pieces()}
    placements = [
        (mb.rank, mb.slot, [cut[p.sample] for p in mb.pieces if mb.rank in cut[p.sample].group])
        for mb in plan.micro_batches
    ]
    most = max((sum(p.tokens_on(r) for p in ps) for r, _, ps in placements), default=0)
    return build_plan(
        plan.lengths,
        plan.world_size,
        max(plan.tokens_per_rank, most),
        placements,
        planner=plan.planner,
        meta=dict(plan.meta),
    ).validate()


def pow2_waste(plan: StepPlan, tokens_per_rank: int, cost: CostModel) -> dict:
    """How much wider than ``ceil(s / C)`` Megatron's groups are, and the rank-seconds that costs (module docstring (a))."""
    wide = extra_ranks = 0
    actual = minimal = 0.0
    for p in plan.pieces():
        k_min = max(1, math.ceil(p.length / tokens_per_rank))
        if p.k <= k_min:
            continue
        wide += 1
        extra_ranks += p.k - k_min
        actual += p.k * cost.piece_time(p.length, p.k, cost.group_spans_nodes(p.group))
        minimal += k_min * cost.piece_time(p.length, k_min, cost.group_spans_nodes(p.group[:k_min]))
    return {
        "wider_samples": wide,
        "extra_ranks": extra_ranks,
        "extra_rank_s": actual - minimal,
        "rank_s_wide": actual,
        "rank_s_minimal": minimal,
    }


def misaligned_groups(plan: StepPlan) -> int:
    """Distributed pieces whose group is not an aligned block ``[i*k, (i+1)*k)``: Megatron's pre-built hybrid
    DPxCP communicators (``parallel_state.create_hybrid_dp_cp_groups``) are such blocks, and each member
    looks its communicator up by ``local_cp_size`` alone."""
    return sum(
        1
        for p in plan.pieces()
        if p.k > 1 and (p.group != tuple(range(p.group[0], p.group[0] + p.k)) or p.group[0] % p.k)
    )


# --------------------------------------------------------------------------- one world


def longest_micro_batch(plan: StepPlan, cost: CostModel) -> tuple[float, int]:
    """``(seconds, rank)`` of the longest single micro-batch of ``plan`` under ``cost``. With the all-reduce
    it is a floor no step of this placement can beat (under the default model: the longest sample's ring)."""
    cache: dict = {}
    best = (0.0, 0)
    for mb in plan.micro_batches:
        best = max(best, (cost.micro_batch_breakdown(mb, cache)[0], -mb.rank))
    return best[0], -best[1]


def metrics_row(
    m: PlanMetrics, seconds: float | None = None, plan: StepPlan | None = None, cost: CostModel | None = None
) -> dict:
    d = m.to_dict(per_rank=False)
    if seconds is not None:
        d["planning_s"] = seconds
    if plan is not None:
        longest, rank = longest_micro_batch(plan, cost)
        d["floor_s"] = longest + m.allreduce_s
        d["other_work_on_longest_rank_s"] = m.busy_s[rank] - longest  # the rest of that rank's busy time
    return d


def split_kwargs(split: str | None) -> dict:
    if split is not None and "attention_split" in inspect.signature(plan_balanced).parameters:
        return {"attention_split": split}
    return {}


def run_batch(lengths: list[int], W: int, C: int, cost: CostModel, scheduler_cls, split: str, delta: float) -> dict:
    out: dict = {"samples": len(lengths), "tokens": sum(lengths), "longest": max(lengths)}
    has_split = "attention_split" in inspect.signature(plan_balanced).parameters

    t0 = time.perf_counter()
    ours = plan_balanced(lengths, W, C, cost, delta=delta, **split_kwargs(split))
    seconds = time.perf_counter() - t0
    out["ours"] = metrics_row(plan_metrics(ours.validate(), cost), seconds, ours, cost)
    if has_split and split != "ring":
        t0 = time.perf_counter()
        ring = plan_balanced(lengths, W, C, cost, delta=delta, attention_split="ring")
        seconds = time.perf_counter() - t0
        out["ours_ring"] = metrics_row(plan_metrics(ring.validate(), cost), seconds, ring, cost)
    else:
        out["ours_ring"] = None

    try:
        rounds, seconds = megatron_schedule(scheduler_cls, lengths, W, C)
    except Exception as e:  # its asserts, or a sample wider than the world: report, go on
        out["megatron_error"] = f"{type(e).__name__}: {e}"
        return out
    t0 = time.perf_counter()
    packed = megatron_to_plan(lengths, W, C, rounds)
    seq = megatron_to_plan(lengths, W, C, rounds, sequential=True)
    convert = time.perf_counter() - t0
    mega = metrics_row(plan_metrics(packed, cost), seconds, packed, cost)
    mega.update(
        convert_s=convert,
        rounds=packed.meta["rounds"],
        plan_tokens_per_rank=packed.tokens_per_rank,
        max_tokens_on_rank=packed.meta["max_tokens_on_rank"],
        over_capacity_micro_batches=packed.meta["over_capacity_micro_batches"],
        micro_batches=len(packed.micro_batches),
        misaligned_groups=misaligned_groups(packed),
    )
    out["megatron"] = mega
    out["megatron_no_barrier"] = metrics_row(plan_metrics(without_barriers(packed), cost))
    out["megatron_sequential"] = metrics_row(round_barrier_metrics(seq, cost), None, seq, cost)
    out["megatron_sequential"]["max_tokens_on_rank"] = seq.meta["max_tokens_on_rank"]
    out["megatron_sequential_no_barrier"] = metrics_row(plan_metrics(without_barriers(seq), cost))
    out["pow2"] = pow2_waste(packed, C, cost)
    out["pow2"]["busy_rank_s"] = sum(plan_metrics(packed, cost).busy_s)
    out["megatron_minimal_groups"] = metrics_row(plan_metrics(minimal_groups(packed, C), cost))
    return out


SERIES = (
    "ours",
    "ours_ring",
    "megatron",
    "megatron_no_barrier",
    "megatron_sequential",
    "megatron_sequential_no_barrier",
    "megatron_minimal_groups",
)
FIELDS = (
    "step_time_s",
    "imbalance",
    "idle_fraction",
    "p2p_time_fraction",
    "num_slots",
    "planning_s",
    "floor_s",
    "other_work_on_longest_rank_s",
)


def summarize(batches: list[dict]) -> dict:
    """Means over the batches that every series covers."""
    ok = [b for b in batches if "megatron" in b]
    out: dict = {"batches": len(batches), "megatron_failed": len(batches) - len(ok)}
    for name in SERIES:
        rows = [b[name] for b in ok if b.get(name)]
        if rows:
            out[name] = {f: statistics.fmean(r[f] for r in rows) for f in FIELDS if all(f in r for r in rows)}
    if ok:
        out["ratio"] = statistics.fmean(b["megatron"]["step_time_s"] / b["ours"]["step_time_s"] for b in ok)
        out["ratio_sequential"] = statistics.fmean(
            b["megatron_sequential"]["step_time_s"] / b["ours"]["step_time_s"] for b in ok
        )
        out["pow2"] = {k: statistics.fmean(b["pow2"][k] for b in ok) for k in ok[0]["pow2"]}
        for k in (
            "convert_s",
            "rounds",
            "max_tokens_on_rank",
            "over_capacity_micro_batches",
            "plan_tokens_per_rank",
            "micro_batches",
            "misaligned_groups",
        ):
            out["megatron"][k] = statistics.fmean(b["megatron"][k] for b in ok)
        out["megatron"]["max_tokens_on_rank_max"] = max(b["megatron"]["max_tokens_on_rank"] for b in ok)
    splits = [b["ours"]["splits"] for b in batches if "splits" in b["ours"]]
    if splits:  # plan_metrics' per-sample attention splits, where it reports them
        numeric = all(isinstance(x, dict) and all(isinstance(v, (int, float)) for v in x.values()) for x in splits)
        out["ours_splits"] = (
            {k: round(statistics.fmean(x.get(k, 0) for x in splits), 1) for k in {k for x in splits for k in x}}
            if numeric
            else splits
        )
    return out


# --------------------------------------------------------------------------- text


TITLES = {
    "ours": "ours: balanced HDP",
    "ours_ring": "ours, ring attention only",
    "megatron": "Megatron BalancedCPScheduler (rounds)",
    "megatron_no_barrier": "  same placement, no round barriers",
    "megatron_sequential": "  one fwd/bwd per sub-sample, as run",
    "megatron_sequential_no_barrier": "  one fwd/bwd per sub-sample, no barriers",
    "megatron_minimal_groups": "  groups cut to ceil(s/C) ranks",
}


def render_world(W: int, C: int, batches: list[dict], s: dict, split: str) -> str:
    n = len(batches)
    samples = statistics.fmean(b["samples"] for b in batches)
    tokens = statistics.fmean(b["tokens"] for b in batches)
    longest = max(b["longest"] for b in batches)
    lines = [
        f"== {W:,} ranks x {C:,} tokens (C): {n} batch{'es' if n > 1 else ''} of {tokens:,.0f} tokens "
        f"(mean {samples:,.0f} samples, longest {longest:,}) =="
    ]
    header = ("planner", "step s", "vs ours", "imbalance", "idle", "exp. P2P", "slots", "plan s")
    rows = []
    ours = s["ours"]["step_time_s"]
    for name in SERIES:
        m = s.get(name)
        if not m:
            continue
        title = TITLES[name] + (f" ({split})" if name == "ours" and split_kwargs(split) else "")
        rows.append(
            (
                title,
                f"{m['step_time_s']:.3f}",
                f"{m['step_time_s'] / ours:.2f}x",
                f"{m['imbalance']:.2f}",
                f"{m['idle_fraction']:.1%}",
                f"{m['p2p_time_fraction']:.1%}",
                f"{m['num_slots']:.1f}",
                f"{m['planning_s']:.3f}" if "planning_s" in m else "",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines += [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    for b in batches:
        if "megatron_error" in b:
            lines.append(f"Megatron failed on a batch: {b['megatron_error']}")
    if "ratio" not in s:
        return "\n".join(lines)
    mg = s["megatron"]
    verdict = "meets" if s["ratio"] >= TARGET else "MISSES"
    lines.append(
        f"Megatron / ours: {s['ratio']:.2f}x (rounds plan), {s['ratio_sequential']:.2f}x (as run); "
        f"target >= {TARGET:.2f}x: {verdict}"
    )
    p = s["pow2"]
    lines.append("where Megatron loses:")
    lines.append(
        f" (a) power-of-two groups: {p['wider_samples']:.1f} of {samples:,.0f} samples on more ranks than "
        f"ceil(s/C), +{p['extra_ranks']:.1f} ranks, +{p['extra_rank_s']:.2f} rank-s "
        f"({p['extra_rank_s'] / p['busy_rank_s']:.1%} of its busy rank-s); cut to ceil(s/C) ranks "
        f"in the same rounds: {s['megatron_minimal_groups']['step_time_s']:.3f} s"
    )
    lines.append(
        f" (b) round barriers: {mg['step_time_s']:.3f} s with, {s['megatron_no_barrier']['step_time_s']:.3f} s "
        f"without ({mg['step_time_s'] / s['megatron_no_barrier']['step_time_s'] - 1:+.1%}); as run "
        f"{s['megatron_sequential']['step_time_s']:.3f} s vs "
        f"{s['megatron_sequential_no_barrier']['step_time_s']:.3f} s"
    )
    if s.get("ours_ring"):
        r = s["ours_ring"]["step_time_s"]
        lines.append(f" (c) head parallelism: ours ring only {r:.3f} s vs {ours:.3f} s ({r / ours:.2f}x)")
    else:
        lines.append(
            " (c) head parallelism: n/a (plan_balanced has no attention_split yet)"
            if not split_kwargs(split)
            else " (c) head parallelism: n/a (--attention-split ring)"
        )
    lines.append(
        f" (d) critical path: ours {ours - s['ours']['floor_s']:.3f} s above its floor (longest micro-batch "
        f"+ all-reduce, {s['ours']['floor_s']:.3f} s; {s['ours']['other_work_on_longest_rank_s']:.3f} s "
        f"more work on that rank); Megatron {mg['step_time_s'] - mg['floor_s']:.3f} s above its floor "
        f"({mg['floor_s']:.3f} s; {mg['other_work_on_longest_rank_s']:.3f} s more work on that rank)"
    )
    lines.append(
        f"Megatron: {mg['rounds']:.1f} rounds, plan {mg['planning_s']:.3f} s + conversion "
        f"{mg['convert_s']:.3f} s; {mg['misaligned_groups']:.1f} groups per batch are not aligned "
        f"power-of-two blocks"
    )
    if mg["max_tokens_on_rank_max"] > C:
        lines.append(
            f"capacity: a round packs up to {mg['max_tokens_on_rank_max']:,} tokens on one rank "
            f"(> C on {mg['over_capacity_micro_batches']:.1f} of {mg['micro_batches']:.0f} micro-batches); "
            f"the rounds plan is built with tokens_per_rank raised to fit, nothing dropped "
            f"(each sub-sample alone holds <= C: the 'as run' form keeps C)"
        )
    if "ours_splits" in s:
        lines.append(
            "ours, attention splits (samples, mean per batch): "
            + json.dumps(s["ours_splits"], separators=(",", ":"), sort_keys=True)
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peer_planners.py",
        description="Balanced HDP against Megatron-core's hybrid-CP BalancedCPScheduler on the same global batches, "
        "timed by hf_hdp's cost model.",
        epilog=f"Needs megatron-core, installed into the venv only for this benchmark: {INSTALL}",
    )
    p.add_argument(
        "--lengths",
        metavar="FILE",
        help="one sample length per line, as `hf-hdp plan --lengths` "
        "(default: the Python standard library's files, as `hf-hdp plan`)",
    )
    p.add_argument("--world-sizes", default=",".join(map(str, WORLDS)), help="comma-separated (default: %(default)s)")
    p.add_argument("--tokens-per-rank", type=parse_size, default=8192, help="C (default: 8192)")
    p.add_argument(
        "--global-batch-tokens",
        type=parse_size,
        default=None,
        metavar="T",
        help=f"tokens per global batch at every world (default: {TOKENS_PER_RANK_OF_BATCH:,} x world, "
        "33554432 at 1,024 ranks)",
    )
    p.add_argument("--batches", type=int, default=3, help="global batches per world (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch sampler (default: 0)")
    p.add_argument("--cost", default="h100", help="h100 (default: LLaMA-7B on H100), bytescale, or MODEL:HARDWARE")
    p.add_argument(
        "--attention-split",
        default="auto",
        choices=("auto", "ring", "ulysses", "hybrid"),
        help="ours: plan_balanced's attention_split, where it has one (default: auto)",
    )
    p.add_argument("--delta", type=float, default=0.05, help="ours: the balance tolerance (default: 0.05)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        worlds = [int(w) for w in args.world_sizes.split(",") if w.strip()]
    except ValueError:
        print(
            f"peer_planners: --world-sizes expects integers such as 64,1024, got {args.world_sizes!r}", file=sys.stderr
        )
        return 2
    if not worlds or min(worlds) < 1 or args.batches < 1:
        print("peer_planners: --world-sizes and --batches must be at least 1", file=sys.stderr)
        return 2
    t_import = time.perf_counter()
    try:
        scheduler_cls, version = load_megatron()
    except Exception as e:
        print(
            f"peer_planners: cannot import {MEGATRON_CLASS} ({type(e).__name__}: {e}).\n"
            f"Install megatron-core into the venv (only for this benchmark):\n    {INSTALL}",
            file=sys.stderr,
        )
        return 2
    try:
        cost = make_cost(args.cost)
        pool = read_lengths_file(args.lengths) if args.lengths else stdlib_pool()
    except CLIError as e:
        print(f"peer_planners: error: {e}", file=sys.stderr)
        return 2
    C = args.tokens_per_rank
    result = {
        "megatron_core": version,
        "scheduler": MEGATRON_CLASS,
        "install": INSTALL,
        "cost_model": cost.label,
        "lengths": pool.source,
        "tokens_per_rank": C,
        "seed": args.seed,
        "batches": args.batches,
        "attention_split": args.attention_split if split_kwargs(args.attention_split) else None,
        "target_ratio": TARGET,
        "import_s": time.perf_counter() - t_import,
        "worlds": {},
    }
    t_all = time.perf_counter()
    if not args.json:
        print(f"peer planners: {cost.label}; lengths from {pool.source}; megatron-core {version}; seed {args.seed}")
    for W in worlds:
        try:
            check_fits(pool, W, C)
        except DoesNotFit as e:
            print(f"peer_planners: error: {e.advice('--world-sizes', '--tokens-per-rank')}", file=sys.stderr)
            return 2
        tokens = args.global_batch_tokens or TOKENS_PER_RANK_OF_BATCH * W
        batches = draw_batches(pool.lengths, args.batches, args.seed, tokens=tokens)
        t0 = time.perf_counter()
        try:
            runs = [run_batch(b, W, C, cost, scheduler_cls, args.attention_split, args.delta) for b in batches]
        except ValueError as e:  # PlanError, or an attention split the cost model cannot price
            print(f"peer_planners: error at {W} ranks: {e}", file=sys.stderr)
            return 2
        s = summarize(runs)
        result["worlds"][str(W)] = {
            "global_batch_tokens": tokens,
            "summary": s,
            "per_batch": runs,
            "wall_s": time.perf_counter() - t0,
        }
        if not args.json:
            print("\n" + render_world(W, C, runs, s, args.attention_split), flush=True)
    result["wall_s"] = time.perf_counter() - t_all
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"\nstep times are estimates of hf_hdp's cost model, not measurements; ran {result['wall_s']:.1f} s "
            f"(+{result['import_s']:.1f} s importing megatron-core)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
