"""Balanced HDP: ByteScale's balance scheduler (Algorithm 2, DP-Balance), made concrete.

Naive HDP (:mod:`hf_hdp.planning.naive`) gives every sequence the fewest ranks that can hold it
but places by *tokens*: ranks holding quadratic-cost long sequences finish last (ByteScale measured
a 4.7x spread between the fastest and the slowest rank). The balance scheduler places by estimated
*time*, so ranks run DIFFERENT numbers of micro-batches: a rank busy with a long sequence gets
fewer, a rank with short ones more.

Time
----
Every estimate is the one :func:`hf_hdp.planning.metrics.plan_metrics` makes, under the same
:class:`~hf_hdp.planning.cost.CostModel` (default LLaMA-7B on H100): a whole sequence costs
``local_time(s) = L·(a·s² + b·s)`` inside a micro-batch, each micro-batch adds ``L·c`` once, and each
member of a ``k``-rank group pays ``piece_time(s, k, spans_nodes)`` (``1/k`` of the compute, the
exposed ring communication, the overhead; rings across nodes are slower). A group starts when
its last member is free and ends for all members together. The planner keeps the metric's clocks,
so its own estimate (``plan.meta["planned_step_time_s"]``) is the metric's step time.

The algorithm
-------------
1. **Groups** (``k = ceil(s / C) > 1``), longest first. ``k`` is minimal and can be any value from 2
   to the world (3, 5, 7, ... too: rings run over P2P on the one global group, no power-of-two
   communicators). Each group goes where it *finishes* first among: the ``k`` ranks free earliest
   anywhere; the ``k`` free earliest in the node whose ``k``-th rank frees first (when
   ``k <= ranks_per_node``; an intra-node ring is cheaper, so it may win with a later start); and,
   with *backfilling*, any ``k`` ranks (of one node, or anywhere) that all sit idle, waiting for
   earlier-placed groups, for the whole piece. Ties go to one node, then to backfilling.
   Members of a group that arrive early wait; every wait is kept as a time budget. Step 1 is
   :mod:`hf_hdp.planning.groups`; steps 2-5 are here.
2. **Buckets and picks** (``k == 1``). Sorted longest first and cut into buckets of about equal
   cost ``u = delta * T / 4`` (``T``: the latest group finish or the mean work per rank, whichever
   is larger); a sequence costlier than ``u`` is a bucket of its own. Each pick first puts every
   sequence of the bucket that fits into a wait (best fit on the remaining wait, each sequence
   charged a micro-batch overhead of its own, so no group starts later), then hands the rest of the
   bucket to the rank that trails the slowest rank the most (a min-heap on estimated finish).
3. **Rebalance** (Algorithm 2's loop: give work to the ranks that trail the slowest by more than
   ``delta``): while the slowest rank finishes more than ``delta / 4`` after the earliest, move one
   sequence off the slowest rank's tail, into a wait anywhere if one holds it, else to the
   earliest rank (the sequence that lowers the pair's later finish most); stop when no single
   move lowers it.
4. **Co-fill**: whole tail micro-batches move into the spare tokens of a ring micro-batch when
   that ends the group's members earlier (below), then step 3 runs again.
5. **Slots.** A rank runs: the micro-batches in the wait before its first group, the group's
   piece, the micro-batches in the next wait, ..., then its tail. Whole sequences are packed best fit
   by tokens into micro-batches of at most ``C`` tokens (a :class:`~hf_hdp.planning.packing.Segment`
   per wait and tail). Groups take slots in start-time order, each one past the last slot any member
   used before it, so members share a slot and every rank's slots increase.

Steps 1-4 first run without backfilling. Only when that schedule ends more than ``delta / 4``
above ``max(mean busy, longest piece)`` do they run again with it, keeping the earlier finish:
backfilling pays in small worlds with wide groups, where there are too few short sequences to fill
the waits; where there are enough, it is neutral or slightly worse.

The paper's gaps, filled
------------------------
- *Seeding*: all ranks start at zero and the groups go first, longest first, before any short
  sequence: per member the long ones are the costliest items, so as in LPT they spread first.
- *Sequences per pick*: one bucket, i.e. one sequence costlier than ``u``, or a run of shorter
  consecutive ones worth about ``u``; ``u = delta * T / 4`` keeps a pick from overshooting the
  target by more than a quarter of ``delta``. ``delta`` (relative, default 0.05) also sets the
  rebalance tolerance and the backfilling trigger.
- *Which ranks a k-rank sequence takes*: the earliest-finishing of the candidates of step 1; among
  the idle ranks of a backfill window, the ones whose idle stretch began latest (the window wastes
  the least of it), then the lowest rank ids. Members are listed in ascending rank order (member
  ``i`` holds zigzag chunks ``i`` and ``2k-1-i``). Under ``attention_split="ring"`` ``k`` is never raised
  above ``ceil(s / C)`` (``"auto"`` may widen head-parallel groups, :mod:`hf_hdp.planning.splits`):
  once a ring hop outlasts its attention block, a member's exposed ring time
  ``(k-1)·(hop - block)`` stays near ``s`` times the per-token wire time whatever ``k`` (a 210K-token
  sequence costs each member 9.34 s on 26 ranks and 9.07 s on 104 under the default model).
- *Spare capacity next to a group*: the group's slot lasts as long as its slowest member, and a
  whole sequence packed beside a ring piece adds its full compute there (it does not hide the
  ring's communication), so filling one member's spare tokens delays all ``k`` members (naive HDP
  does exactly that). Short sequences instead fill the *waits* in front of groups, where they are
  free. The spare tokens of a ring micro-batch take a whole tail micro-batch of each member only
  when that ends the group's latest member earlier: every member saves the overhead ``L·c`` of the
  micro-batch it no longer runs and waits for the largest moved work ``D``, finishing at
  ``F_i + D - f_i - L·c``. Considered only for a group that is every member's last, so nothing else
  moves. It matters when the per-micro-batch overhead is large against the work (small ``C``,
  CPU ranks); under the H100 model it rarely fires.
- Ties are broken by rank, node, slot and sample ids, never by chance: every rank computes the
  same plan from the same lengths.

Never slower than naive
-----------------------
Greedy schedules can lose on odd inputs (a few percent, on about 3% of random small mixes, mostly
where the per-micro-batch overhead dominates). So :func:`plan_balanced` also builds the naive plan
(:func:`~hf_hdp.planning.naive.plan_naive`, ``O(n log W)``) and returns it, relabelled
``"balanced"`` with ``meta["source"] == "naive"``, when its
:func:`plan_metrics` step time is lower. A balanced plan's estimated step time therefore never
exceeds naive HDP's on the same input and cost model.

Cost of planning: ``O((n + Σk) log W)`` heap work for the groups and the picks, ``O(W + slots)`` to
emit; 32M tokens on 12,288 ranks take about 0.2 s of one core, guard included
(``benchmarks/planner_scale.py``).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

from .cost import CostModel
from .groups import Group, GroupPlacement, Stamped, current_top
from .layout import hybrid_member_sizes
from .metrics import estimated_step_time
from .naive import check_lengths, longest_first, plan_naive
from .packing import BatchWork, Segment
from .plan import Piece, StepPlan, build_plan
from .plan import lockstep as lockstep_plan
from .splits import HEAD_PARALLEL, check_split

# relative slack on time budgets, against float rounding between our sums and the metric's
_SLACK = 1e-9


class _Gap(NamedTuple):
    """Time still free in the wait of ``rank`` before group ``gid``. Sorts by that time."""

    left: float
    rank: int
    gid: int


class _CoFill(NamedTuple):
    """A co-fill move: the micro-batch each member moves, how much the group grows, the members' new latest finish."""

    latest: float
    grow: float
    pick: dict[int, BatchWork]


class _Balancer:
    """Steps 2-4 of the module docstring on the groups step 1 placed; :meth:`emit` turns it into a plan (step 5)."""

    def __init__(self, placed: GroupPlacement, delta: float) -> None:
        self.lengths, self.W, self.C, self.cost, self.delta = placed.lengths, placed.W, placed.C, placed.cost, delta
        self.backfill = placed.backfill
        self.overhead = self.cost.overhead_time()
        self.groups: list[Group] = placed.groups  # in placement order: a group's id is its index
        self.clock = placed.clock  # finish of each rank's last group (its tail starts there)
        self.finish = list(self.clock)  # each rank's estimated finish, its tail included
        self.gaps: dict[tuple[int, int], Segment] = {}  # (rank, gid): sequences in the wait before group gid
        self.gap_left: dict[tuple[int, int], float] = {}  # remaining wait
        self.gap_index: list[_Gap] = []  # sorted
        for (r, gid), hole in sorted(placed.holes.items()):
            self.gaps[r, gid] = Segment(self.C)
            self.gap_left[r, gid] = hole.length
            self.gap_index.append(_Gap(hole.length, r, gid))
        self.gap_index.sort()
        self.tails = [Segment(self.C) for _ in range(self.W)]
        self.local_t: dict[int, float] = {}
        self.extra: dict[tuple[int, int], list[int]] = {}  # (gid, rank): whole sequences next to a ring piece

    def _fit_gap(self, sample: int) -> bool:
        """Put ``sample`` into the tightest wait that surely holds it (its own micro-batch overhead
        included); False when none does."""
        need = self.local_t[sample] + self.overhead
        i = bisect.bisect_left(self.gap_index, (need * (1 + _SLACK),))
        if i == len(self.gap_index):
            return False
        _, r, j = self.gap_index.pop(i)
        seg = self.gaps[r, j]
        before = seg.time(self.overhead)
        seg.add(sample, self.lengths[sample], self.local_t[sample])
        left = self.gap_left[r, j] - (seg.time(self.overhead) - before)
        self.gap_left[r, j] = left
        if left > 0:
            bisect.insort(self.gap_index, _Gap(left, r, j))
        return True

    # ------------------------------------------------------------------ step 2: buckets and picks
    def place_local(self, local: list[int]) -> None:
        cost, W = self.cost, self.W
        for i in local:
            self.local_t[i] = cost.local_time(self.lengths[i])
        work = sum(self._group_work()) + sum(self.local_t[i] + self.overhead for i in local)
        target = max(max(self.clock, default=0.0), work / W)
        unit = self.delta * target / 4

        # equal-cost buckets of consecutive sequences, longest first
        buckets: list[list[int]] = []
        acc = 0.0
        for i in local:
            t = self.local_t[i] + self.overhead
            if buckets and acc + t <= unit:
                buckets[-1].append(i)
                acc += t
            else:
                buckets.append([i])
                acc = t

        tails, overhead, finish = self.tails, self.overhead, self.finish
        heap = [(finish[r], r) for r in range(W)]
        heapq.heapify(heap)
        for bucket in buckets:
            rest = [i for i in bucket if not (self.gap_index and self._fit_gap(i))]
            if not rest:
                continue
            _, r = heapq.heappop(heap)
            seg = tails[r]
            for i in rest:
                seg.add(i, self.lengths[i], self.local_t[i])
            finish[r] = self.clock[r] + seg.time(overhead)
            heapq.heappush(heap, (finish[r], r))

    def _group_work(self):
        cost = self.cost
        for piece, _, _ in self.groups:
            yield piece.k * cost.split_piece_time(piece.length, piece.group, piece.ulysses)

    # ------------------------------------------------------------------ step 3: rebalance
    def rebalance(self) -> None:
        W, overhead, finish, tails = self.W, self.overhead, self.finish, self.tails
        if W < 2:
            return
        tol = self.delta / 4
        ver = [0] * W
        hi_heap = [Stamped(-finish[r], r, 0) for r in range(W)]
        lo_heap = [Stamped(finish[r], r, 0) for r in range(W)]
        heapq.heapify(hi_heap)
        heapq.heapify(lo_heap)

        def update(r):
            finish[r] = self.clock[r] + tails[r].time(overhead)
            ver[r] += 1
            heapq.heappush(hi_heap, Stamped(-finish[r], r, ver[r]))
            heapq.heappush(lo_heap, Stamped(finish[r], r, ver[r]))

        for _ in range(4 * (len(self.local_t) + W)):
            hi, lo = current_top(hi_heap, ver).item, current_top(lo_heap, ver).item
            f_hi, f_lo = finish[hi], finish[lo]
            if f_hi - f_lo <= tol * f_hi or not tails[hi].num_batches:
                return
            seg = tails[hi]
            items = sorted(seg.samples(), key=lambda i: (-self.lengths[i], i))
            # a wait anywhere that holds one of them: free time
            moved = False
            if self.gap_index:
                for i in items:
                    need = self.local_t[i] + overhead
                    if self.gap_index[-1].left >= need * (1 + _SLACK):
                        seg.remove(i)
                        self._fit_gap(i)
                        update(hi)
                        moved = True
                        break
            if moved:
                continue
            # else the sequence whose move to the earliest rank lowers the pair's maximum the most
            best, best_max = None, f_hi * (1 - _SLACK)
            lo_seg = tails[lo]
            for i in items:
                n, t = self.lengths[i], self.local_t[i]
                dec = t + (overhead if seg.holds_alone(i) else 0.0)
                inc = t + (overhead if lo_seg.opens_bin(n) else 0.0)
                new_max = max(f_hi - dec, f_lo + inc)
                if new_max < best_max:
                    best, best_max = i, new_max
            if best is None:
                return
            seg.remove(best)
            lo_seg.add(best, self.lengths[best], self.local_t[best])
            update(hi)
            update(lo)

    # ------------------------------------------------------------------ step 4: co-fill
    def cofill(self) -> None:
        """Move whole tail micro-batches into the spare tokens of a ring micro-batch, when that ends
        the group's members earlier (see the module docstring).

        Only a group that is the last one of every member is considered (what follows it is the
        members' own tails, so nothing else moves). The group's slot grows by ``D``, the largest
        work moved onto one member; member ``i`` moving a micro-batch of work ``f_i`` then finishes
        at ``F_i + D - f_i - overhead``. A move is taken only when it lowers the latest finish of
        the members.
        """
        W, overhead = self.W, self.overhead
        if overhead <= 0 or not self.groups:
            return
        last = [-1] * W
        for gid, group in enumerate(self.groups):
            for r in group.piece.group:
                prev = self.groups[last[r]] if last[r] >= 0 else None
                if (
                    prev is None
                    or group.finish > prev.finish
                    or (group.finish == prev.finish and group.start >= prev.start)
                ):
                    last[r] = gid
        for gid, (piece, start, finish) in enumerate(self.groups):
            members = piece.group
            if any(last[r] != gid for r in members):
                continue
            spare = {r: self.C - n for r, n in zip(members, hybrid_member_sizes(piece.length, piece.k, piece.ulysses))}
            while True:
                options = {r: self.tails[r].batches_within(spare[r]) for r in members}
                if any(not o for o in options.values()):
                    break  # a member that moves nothing would only finish later
                move = self._best_cofill(members, options)
                if move is None:
                    break
                for r in members:
                    moved, used = self.tails[r].pop_batch(move.pick[r].batch)
                    self.extra.setdefault((gid, r), []).extend(moved)
                    spare[r] -= used
                    self.clock[r] += move.grow
                    self.finish[r] = self.clock[r] + self.tails[r].time(overhead)
                finish += move.grow
                self.groups[gid] = Group(piece, start, finish)

    def _best_cofill(self, members: tuple[int, ...], options: dict[int, list[BatchWork]]) -> _CoFill | None:
        """The move that lowers the members' latest finish the most, None when none lowers it. For
        each bound ``d`` on the work moved, every member moves its heaviest micro-batch of at most ``d``
        (of ``options[member]``, sorted); the group grows by the heaviest moved."""
        old = max(self.finish[r] for r in members)
        best = None
        for d in sorted({b.work for o in options.values() for b in o}):
            pick = {}
            for r in members:
                o = options[r]
                at = bisect.bisect_right(o, (d, math.inf)) - 1
                if at < 0:
                    break
                pick[r] = o[at]
            else:
                grow = max(b.work for b in pick.values())
                new = max(self.finish[r] + grow - pick[r].work - self.overhead for r in members)
                if new < old * (1 - _SLACK) and (best is None or new < best.latest):
                    best = _CoFill(new, grow, pick)
        return best

    def lower_bound(self) -> float:
        """About the earliest any schedule of these sequences can end: max(mean busy time per rank,
        longest group piece), as this schedule packs them."""
        busy = sum(seg.time(self.overhead) for seg in self.gaps.values())
        busy += sum(seg.time(self.overhead) for seg in self.tails)
        longest = 0.0
        for piece, start, finish in self.groups:
            busy += piece.k * (finish - start)
            longest = max(longest, finish - start)
        return max(busy / self.W, longest)

    # ------------------------------------------------------------------ step 5: slots
    def emit(self, meta: dict) -> StepPlan:
        W, lengths = self.W, self.lengths
        placements: list[tuple[int, int, list[Piece]]] = []
        nxt = [0] * W

        def local_batches(r: int, seg: Segment, first_slot: int) -> int:
            # longest micro-batch first; order inside a rank does not change its time
            for b in sorted(seg.batches(), key=lambda b: (-sum(lengths[i] for i in b), min(b))):
                placements.append((r, first_slot, [Piece(sample=i, length=lengths[i], group=(r,)) for i in b]))
                first_slot += 1
            return first_slot

        # groups in time order: on every rank that is the order of its own groups
        for gid in sorted(range(len(self.groups)), key=lambda g: (self.groups[g].start, g)):
            piece = self.groups[gid].piece
            slot = 0
            for r in piece.group:
                seg = self.gaps.get((r, gid))
                slot = max(slot, nxt[r] + (seg.num_batches if seg else 0))
            for r in piece.group:
                seg = self.gaps.get((r, gid))
                if seg:
                    local_batches(r, seg, nxt[r])
                extra = [Piece(sample=i, length=lengths[i], group=(r,)) for i in self.extra.get((gid, r), ())]
                placements.append((r, slot, [piece, *extra]))
                nxt[r] = slot + 1
        for r in range(W):
            local_batches(r, self.tails[r], nxt[r])
        return build_plan(lengths, W, self.C, placements, planner="balanced", meta=meta)


def plan_balanced(
    lengths: Sequence[int],
    world_size: int,
    tokens_per_rank: int,
    cost: CostModel | None = None,
    delta: float = 0.05,
    never_worse_than_naive: bool = True,
    lockstep: bool = False,
    attention_split: str = "auto",
) -> StepPlan:
    """Plan one step with the balance scheduler (see the module docstring).

    ``cost`` defaults to :meth:`CostModel.default` (LLaMA-7B on H100); ``delta`` is the relative
    tolerance of the balance loop. With ``never_worse_than_naive`` (the default) the naive HDP plan
    is returned instead when its estimated step time is lower; ``plan.meta["source"]`` says which
    (``"balanced"`` or ``"naive"``) and ``plan.meta["estimated_step_time_s"]`` gives the
    :func:`plan_metrics` step time (not under a forced ``"ulysses"`` or ``"hybrid"`` split, which naive
    HDP's rings would not honour). ``lockstep=True`` (FSDP's ZeRO-3 mode, :mod:`hf_hdp.engine.fsdp`)
    returns a lockstep plan (:func:`~hf_hdp.planning.plan.lockstep`: the same number of micro-batches
    on every rank, empty placeholders in the gaps), and the comparison with naive HDP is made under
    lockstep timing, in which every slot is a barrier of all ranks. ``attention_split`` (``"auto"``,
    ``"ring"``, ``"ulysses"``, ``"hybrid"``; :mod:`hf_hdp.planning.splits`) says how each distributed
    sequence's attention is split and how wide its group is; head-parallel splits need the model's heads
    in ``cost`` (``"auto"`` plans rings without them). Raises :class:`~hf_hdp.planning.plan.PlanError` like the naive
    planner for samples that cannot be placed, ``ValueError`` for ``delta`` outside ``[0, 1)``.
    """
    lengths = check_lengths(lengths, world_size, tokens_per_rank)
    if not 0 <= delta < 1:
        raise ValueError(f"delta is a fraction of the slowest rank's time and must be in [0, 1), got {delta}")
    cost = cost or CostModel.default()
    check_split(attention_split)
    if attention_split in HEAD_PARALLEL and not cost.num_heads:
        raise ValueError(
            f"attention_split={attention_split!r} needs the model's attention heads in the cost model "
            "(CostModel.num_heads); build it with CostModel.from_config or from_specs"
        )
    W, C = world_size, tokens_per_rank
    meta = {"delta": delta, "cost_model": cost.label, "source": "balanced", "attention_split": attention_split}
    if not lengths:
        return build_plan(lengths, W, C, [], planner="balanced", meta=meta)
    if lockstep:
        return _best_lockstep(lengths, W, C, cost, delta, never_worse_than_naive, attention_split)

    order = longest_first(lengths)
    dist = [i for i in order if lengths[i] > C]
    local = [i for i in order if lengths[i] <= C]

    target = sum(cost.local_time(s) for s in lengths) / W  # mean compute per rank: wider groups beyond it

    def schedule(backfill: bool) -> _Balancer:
        bal = _Balancer(GroupPlacement(lengths, W, C, cost, backfill, attention_split, target).place(dist), delta)
        bal.place_local(local)
        bal.rebalance()
        bal.cofill()
        bal.rebalance()
        return bal

    # Backfilling groups into waits pays when whole sequences are too few to fill the waits (small
    # worlds, wide groups); elsewhere it is neutral or slightly worse. So: schedule without it, and
    # only when that ends more than delta/4 above the bound max(mean busy, longest group piece), also
    # with it, keeping the earlier finish.
    bal = schedule(False)
    if dist and max(bal.finish) > (1 + delta / 4) * bal.lower_bound():
        other = schedule(True)
        if max(other.finish) < max(bal.finish):
            bal = other
    meta["backfill"] = bal.backfill
    meta["planned_step_time_s"] = max(bal.finish) + cost.allreduce_time(None, W)
    plan = bal.emit(meta)
    if not never_worse_than_naive or attention_split in HEAD_PARALLEL:
        return plan  # a forced split is the user's: naive HDP's rings would not honour it

    mine = estimated_step_time(plan, cost)
    plan.meta["estimated_step_time_s"] = mine
    naive = plan_naive(lengths, W, C)
    # Naive's step time is at least its busiest rank's work plus the all-reduce (the metric's clocks
    # only add waits to the work); only when that bound does not settle it, simulate naive as well.
    busy = [0.0] * W
    cache: dict = {}
    for mb in naive.micro_batches:
        busy[mb.rank] += cost.micro_batch_breakdown(mb, cache)[0]
    if mine <= max(busy) + cost.allreduce_time(None, W):
        return plan
    theirs = estimated_step_time(naive, cost)
    if theirs < mine:
        meta = {
            "delta": delta,
            "cost_model": cost.label,
            "source": "naive",
            "estimated_step_time_s": theirs,
            "balanced_step_time_s": mine,
        }
        return replace(naive, planner="balanced", meta=meta)
    return plan


def _best_lockstep(
    lengths: list[int], W: int, C: int, cost: CostModel, delta: float, against_naive: bool, attention_split: str
) -> StepPlan:
    """The balanced plan in lockstep; naive HDP's in lockstep instead when that is faster (lockstep
    turns every slot into a barrier, so the balance of busy time matters less than the slot count)."""
    plan = lockstep_plan(
        plan_balanced(lengths, W, C, cost, delta, never_worse_than_naive=False, attention_split=attention_split)
    )
    mine = estimated_step_time(plan, cost)
    plan.meta["estimated_step_time_s"] = mine
    if against_naive and attention_split not in HEAD_PARALLEL:
        naive = lockstep_plan(plan_naive(lengths, W, C))
        theirs = estimated_step_time(naive, cost)
        if theirs < mine:
            meta = {
                "delta": delta,
                "cost_model": cost.label,
                "source": "naive",
                "lockstep": True,
                "estimated_step_time_s": theirs,
                "balanced_step_time_s": mine,
            }
            return replace(naive, planner="balanced", meta=meta)
    return plan
