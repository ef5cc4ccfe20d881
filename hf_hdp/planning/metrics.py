"""Plan metrics: what a :class:`~hf_hdp.planning.plan.StepPlan` will cost, before anything runs (pure Python).

:func:`plan_metrics` estimates, for any plan (static mesh, naive or balanced HDP), the step time
along the critical path of the slot structure, each rank's busy time, the imbalance, the idle
fraction and the P2P traffic; :func:`plan_timeline` gives the per-rank intervals to draw it.

The simulation
--------------
Every rank runs its micro-batches in slot order; a micro-batch takes
:meth:`~hf_hdp.planning.cost.CostModel.micro_batch_time`. Within one slot, the ranks joined
(transitively) by distributed pieces form a *component*: ring attention couples them layer by
layer, so the component starts when its last member is free (``max`` of their clocks) and all
of its members finish together, at ``start + max`` of their micro-batch times. A rank whose
micro-batch holds only whole sequences just runs. After its last micro-batch every rank waits
for the slowest one and joins the one gradient all-reduce
(:meth:`~hf_hdp.planning.cost.CostModel.allreduce_time` of the model's ``grad_bytes``; zero when
``grad_bytes`` is 0 or ``include_allreduce=False``).

The slots are not barriers: a component's start depends only on its own members' earlier
micro-batches, which is the longest path of the real dependency graph when rings synchronise
their members at start and end. A *lockstep* plan (``plan.meta["lockstep"]``, from
:func:`~hf_hdp.planning.plan.lockstep`; FSDP's ZeRO-3 mode) is the exception: FSDP's per-layer
collectives join all ranks in every slot, so each slot is one component of all ranks (an empty
placeholder micro-batch costs the per-micro-batch overhead), followed by the slot's weight
all-gathers and gradient reduce-scatter (1.5 all-reduces of ``grad_bytes``, drawn as
``"allreduce"``), and there is no reduction at the step's end. The waits this makes are the price
of lockstep, and show in ``idle_fraction`` and the timelines. A plan with ``plan.meta["slot_barrier"]``
(a scheduler's rounds with a barrier between them, as Megatron-core's hybrid-CP scheduler runs them;
see ``benchmarks/peer_planners.py``) makes every slot such a barrier too, without the weight traffic.

P2P traffic is counted as :mod:`hf_hdp.attention.ring` sends it and
:class:`~hf_hdp.distributed.mesh.DynamicMesh` counts it: the distributed pieces of one micro-batch that share
a group form ONE ring segment, and per layer each member sends ``k-1`` forward K/V, ``k-1``
backward K/V and ``k`` dK/dV messages for the whole segment. A head-parallel segment (Ulysses
degree ``u``) adds its all-to-alls, counted as :mod:`hf_hdp.attention.ulysses` sends them
(:meth:`~hf_hdp.planning.cost.CostModel.segment_bytes_by_member`); ``splits`` says how many samples
each split kind holds. Gradient checkpointing repeats the
forward ring during backward; that is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

from .cost import CostModel
from .cost.segments import segments_of
from .plan import StepPlan
from .splits import split_kind

#: interval kinds of :func:`plan_timeline`
KINDS = ("local", "distributed", "p2p", "wait", "allreduce")


@dataclass(frozen=True)
class Interval:
    """One stretch of one rank's step.

    ``kind``: ``"local"`` (a micro-batch of whole sequences only), ``"distributed"`` (the compute of
    a micro-batch with a ring segment), ``"p2p"`` (its exposed ring communication, drawn after the
    compute), ``"wait"`` (idle: waiting for ring partners, or for the slowest rank before the
    all-reduce) and ``"allreduce"`` (communication, not idle). ``slot`` is -1 for the end-of-step wait and the
    all-reduce. ``split``: for ``"distributed"`` and ``"p2p"``, how the micro-batch's distributed pieces run
    (:data:`~hf_hdp.planning.splits.SPLIT_KINDS`: ``"ring"``, ``"ulysses"``, ``"hybrid"``; ``"mixed"`` when its
    segments run different splits); ``""`` otherwise.
    """

    rank: int
    start: float
    end: float
    kind: str
    slot: int = -1
    split: str = ""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class PlanMetrics:
    """Estimated cost of one step plan (seconds, bytes). :meth:`to_dict` gives a JSON-ready dict."""

    planner: str
    world_size: int
    tokens_per_rank: int
    step_time_s: float  # critical path of the slots plus the gradient all-reduce
    slots_time_s: float  # critical path of the slots alone
    allreduce_s: float
    busy_s: list[float]  # per rank: sum of its micro-batch times (exposed ring communication included)
    p2p_exposed_s: list[float]  # per rank: the exposed ring communication inside busy_s
    imbalance: float  # max(busy) / mean(busy); 1.0 when nobody works
    idle_fraction: float  # 1 - (sum(busy) + world * collective_s) / (world * step_time): waiting only
    p2p_bytes: float  # sent in one step, all ranks
    p2p_bytes_per_rank: list[float]
    p2p_messages: int  # sent in one step, all ranks
    num_slots: int
    micro_batches_per_rank: list[int]
    group_sizes: dict[int, int]  # k -> number of samples placed on k ranks
    tokens: int
    num_samples: int
    cost_label: str = ""
    extra: dict = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)  # split kind (splits.SPLIT_KINDS) -> samples
    ulysses_degrees: dict[int, int] = field(default_factory=dict)  # u -> head-parallel samples of Ulysses degree u
    collective_s: float = 0.0  # per rank: the gradient all-reduce, and lockstep's per-slot collectives

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0

    @property
    def p2p_time_fraction(self) -> float:
        """Share of all busy time spent in exposed ring communication."""
        total = sum(self.busy_s)
        return sum(self.p2p_exposed_s) / total if total > 0 else 0.0

    @property
    def busy_spread(self) -> float:
        """max(busy) / min(busy) over the ranks that work (ByteScale's "fastest vs slowest rank" spread)."""
        working = [b for b in self.busy_s if b > 0]
        return max(working) / min(working) if working else 1.0

    def to_dict(self, per_rank: bool = True) -> dict:
        d = {
            "planner": self.planner,
            "world_size": self.world_size,
            "tokens_per_rank": self.tokens_per_rank,
            "step_time_s": self.step_time_s,
            "slots_time_s": self.slots_time_s,
            "allreduce_s": self.allreduce_s,
            "collective_s": self.collective_s,
            "imbalance": self.imbalance,
            "busy_spread": self.busy_spread,
            "idle_fraction": self.idle_fraction,
            "p2p_time_fraction": self.p2p_time_fraction,
            "p2p_bytes": int(round(self.p2p_bytes)),
            "p2p_messages": self.p2p_messages,
            "num_slots": self.num_slots,
            "group_sizes": {str(k): v for k, v in self.group_sizes.items()},
            "splits": dict(self.splits),
            "ulysses_degrees": {str(u): v for u, v in self.ulysses_degrees.items()},
            "tokens": self.tokens,
            "num_samples": self.num_samples,
            "tokens_per_s": self.tokens_per_s,
            "max_busy_s": max(self.busy_s, default=0.0),
            "mean_busy_s": sum(self.busy_s) / len(self.busy_s) if self.busy_s else 0.0,
            "max_micro_batches_per_rank": max(self.micro_batches_per_rank, default=0),
            "cost_model": self.cost_label,
        }
        if per_rank:
            d["busy_s"] = list(self.busy_s)
            d["p2p_exposed_s"] = list(self.p2p_exposed_s)
            d["p2p_bytes_per_rank"] = [int(round(b)) for b in self.p2p_bytes_per_rank]
            d["micro_batches_per_rank"] = list(self.micro_batches_per_rank)
        d.update(self.extra)
        return d


@dataclass
class _Step:
    """What one simulated step accumulates, per rank (see the module docstring)."""

    clock: list[float]  # when each rank is next free
    busy: list[float]
    exposed: list[float]
    count: list[int]
    sent: list[float]
    messages: int = 0
    collective: float = 0.0  # seconds every rank spends in the gradient all-reduce (and lockstep's slot collectives)

    @classmethod
    def of(cls, world_size: int) -> _Step:
        return cls([0.0] * world_size, [0.0] * world_size, [0.0] * world_size, [0] * world_size, [0.0] * world_size)


class _Components:
    """Union-find over the ranks of one slot: the ranks a distributed segment couples finish together."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, r: int) -> int:
        root = r
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while self.parent[r] != root:
            self.parent[r], r = root, self.parent[r]
        return root

    def join(self, group) -> None:
        root = self.find(group[0])
        for r in group[1:]:
            other = self.find(r)
            if other != root:
                self.parent[other] = root

    def of(self, ranks) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for r in ranks:
            out.setdefault(self.find(r), []).append(r)
        return list(out.values())


def _micro_batch(
    mb, cost: CostModel, cache: dict, step: _Step, joined: set, components: _Components, count_bytes: bool
) -> tuple[float, float, str]:
    """Price one micro-batch into ``step``: its time, exposed communication and split kind (``""`` when it holds
    whole sequences only, ``"mixed"`` when its distributed segments run different splits). Counts its bytes and
    messages, and couples the ranks of each distributed segment (once per segment, not once per member)."""
    segments = segments_of(mb.pieces)
    t, comm = cost.micro_batch_breakdown(mb, cache, segments)
    kinds = set()
    for seg in segments:
        g, k = seg.group, len(seg.group)
        if k <= 1:
            continue
        kinds.add(split_kind(k, seg.ulysses))
        if count_bytes:
            if ("bytes", seg.key) not in cache:
                cache["bytes", seg.key] = cost.segment_bytes_by_member(seg.lengths, k, seg.ulysses)
                cache["member", seg.key] = {r: i for i, r in enumerate(g)}
                # sliding/chunked layers send only the messages that carry rows: per member, exactly
                cache["messages", seg.key] = cost.segment_messages_by_member(seg.lengths, k, seg.ulysses)
            i = cache["member", seg.key][mb.rank]
            step.sent[mb.rank] += cache["bytes", seg.key][i]
            step.messages += cache["messages", seg.key][i]
        if seg.key not in joined:
            joined.add(seg.key)
            components.join(g)
    step.busy[mb.rank] += t
    step.exposed[mb.rank] += comm
    step.count[mb.rank] += 1
    split = "" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    return t, comm, split


def _draw(
    timeline: list,
    r: int,
    slot: int,
    free: float,
    start: float,
    end: float,
    run: tuple[float, float, str],
    slot_comm: float,
) -> None:
    """Rank ``r``'s intervals of one slot: the wait for its partners, compute, exposed communication, the wait for
    the component's slowest member, and lockstep's slot collectives."""
    t, comm, split = run
    if start > free:
        timeline.append(Interval(r, free, start, "wait", slot))
    compute_end = start + t - comm
    timeline.append(Interval(r, start, compute_end, "distributed" if split else "local", slot, split))
    if comm > 0:
        timeline.append(Interval(r, compute_end, start + t, "p2p", slot, split))
    if end - slot_comm > start + t:
        timeline.append(Interval(r, start + t, end - slot_comm, "wait", slot))
    if slot_comm > 0:
        timeline.append(Interval(r, end - slot_comm, end, "allreduce", slot))


def _simulate(
    plan: StepPlan, cost: CostModel, include_allreduce: bool, timeline: list | None, count_bytes: bool = True
) -> tuple[float, float, _Step]:
    """``(slots' critical path, end-of-step all-reduce, per-rank figures)`` of ``plan``; appends the intervals to
    ``timeline`` when given."""
    W = plan.world_size
    step = _Step.of(W)
    cache: dict = {}
    lockstep = bool(plan.meta.get("lockstep"))
    # a barrier plan (plan.meta["slot_barrier"]: rounds of a scheduler that synchronises all ranks between
    # them, e.g. Megatron-core's hybrid-CP rounds) starts each slot when the last rank of the world is free
    barrier = lockstep or bool(plan.meta.get("slot_barrier"))
    # lockstep (ZeRO-3 mode): every slot gathers the weights twice and reduce-scatters the gradients
    # once (1.5 all-reduces of the model); no reduction at the step's end
    slot_comm = 1.5 * cost.allreduce_time(None, W) if lockstep and include_allreduce else 0.0
    for slot, group in groupby(plan.micro_batches, key=lambda mb: mb.slot):
        mbs = list(group)
        components, joined = _Components(), set()
        runs = {mb.rank: _micro_batch(mb, cost, cache, step, joined, components, count_bytes) for mb in mbs}
        # a barrier: one component, every rank of the world waits for the slot's last micro-batch
        free = max(step.clock, default=0.0) if barrier else 0.0
        for ranks in [list(runs)] if barrier else components.of(runs):
            start = free if barrier else max(step.clock[r] for r in ranks)
            end = start + max(runs[r][0] for r in ranks) + slot_comm
            for r in ranks:
                if timeline is not None:
                    _draw(timeline, r, slot, step.clock[r], start, end, runs[r], slot_comm)
                step.clock[r] = end
        if barrier:
            for r in range(W):
                if step.clock[r] < end:
                    if timeline is not None:
                        timeline.append(Interval(r, step.clock[r], end, "wait", slot))
                    step.clock[r] = end
        step.collective += slot_comm
    finish = max(step.clock, default=0.0)
    allreduce = cost.allreduce_time(None, W) if include_allreduce and not lockstep else 0.0
    step.collective += allreduce
    if timeline is not None:
        for r in range(W):
            if finish > step.clock[r]:
                timeline.append(Interval(r, step.clock[r], finish, "wait"))
            if allreduce > 0:
                timeline.append(Interval(r, finish, finish + allreduce, "allreduce"))
    return finish, allreduce, step


def idle_fraction(busy_s, collective_s: float, step_time_s: float) -> float:
    """The share of the ranks' step time spent waiting: ``1 - (Σ busy + W · collective) / (W · step)``. The gradient
    all-reduce (and lockstep's slot collectives), ``collective_s`` per rank, is communication, not idle time."""
    W = len(busy_s)
    if step_time_s <= 0 or not W:
        return 0.0
    return max(0.0, 1.0 - (sum(busy_s) + W * collective_s) / (W * step_time_s))


def plan_metrics(plan: StepPlan, cost: CostModel | None = None, include_allreduce: bool = True) -> PlanMetrics:
    """Estimate one step of ``plan`` under ``cost`` (default :meth:`CostModel.default`); see the module docstring."""
    cost = cost or CostModel.default()
    finish, allreduce, run = _simulate(plan, cost, include_allreduce, None)
    W = plan.world_size
    step = finish + allreduce
    busy = run.busy
    mean = sum(busy) / W if W else 0.0
    return PlanMetrics(
        planner=plan.planner,
        world_size=W,
        tokens_per_rank=plan.tokens_per_rank,
        step_time_s=step,
        slots_time_s=finish,
        allreduce_s=allreduce,
        busy_s=busy,
        p2p_exposed_s=run.exposed,
        imbalance=max(busy) / mean if mean > 0 else 1.0,
        idle_fraction=idle_fraction(busy, run.collective, step),
        p2p_bytes=sum(run.sent),
        p2p_bytes_per_rank=run.sent,
        p2p_messages=run.messages,
        num_slots=plan.num_slots,
        micro_batches_per_rank=run.count,
        group_sizes=plan.group_sizes(),
        splits=plan.splits(),
        ulysses_degrees=_degrees(plan),
        tokens=sum(plan.lengths),
        num_samples=len(plan.lengths),
        cost_label=cost.label,
        collective_s=run.collective,
    )


def estimated_step_time(plan: StepPlan, cost: CostModel, include_allreduce: bool = True) -> float:
    """:func:`plan_metrics`' ``step_time_s`` alone, without counting the traffic (what planners compare)."""
    finish, allreduce, _ = _simulate(plan, cost, include_allreduce, None, count_bytes=False)
    return finish + allreduce


def _degrees(plan: StepPlan) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in plan.pieces():
        if p.ulysses > 1:
            out[p.ulysses] = out.get(p.ulysses, 0) + 1
    return dict(sorted(out.items()))


def plan_timeline(plan: StepPlan, cost: CostModel | None = None, include_allreduce: bool = True) -> list[Interval]:
    """Per-rank intervals of the simulated step, sorted by rank then start (for Gantt-style plots).

    Each rank's intervals tile ``[0, step_time_s]`` without gaps: micro-batch compute
    (``"local"``/``"distributed"``), exposed ring communication (``"p2p"``), ``"wait"`` and the
    ``"allreduce"``. Ranks without any work show one ``"wait"`` and the all-reduce.
    """
    cost = cost or CostModel.default()
    out: list[Interval] = []
    _simulate(plan, cost, include_allreduce, out)
    out = [iv for iv in out if iv.end > iv.start]
    out.sort(key=lambda iv: (iv.rank, iv.start, iv.end))
    return out
