"""Step 1 of the balance scheduler: place the distributed sequences (groups), each where it finishes first.

:mod:`hf_hdp.planning.balanced` describes the whole algorithm. Here, longest first, each sequence of
``s > C`` tokens takes a group of ``k = ceil(s / C)`` ranks, where it finishes first among:

- the ``k`` ranks free earliest anywhere (after their last groups, i.e. from their *tails*);
- the ``k`` free earliest in the node whose ``k``-th rank frees first (when ``k <= ranks_per_node``
  and the first choice spans nodes: an intra-node ring is cheaper, so it may win with a later start);
- with *backfilling*, any ``k`` ranks (of one node, or anywhere) that all sit idle for the whole
  piece, in *holes*: the waits of members that arrived early at earlier-placed groups.

Ties go to one node, then to backfilling. Each sequence's group size and attention split come first,
from :func:`~hf_hdp.planning.splits.choose_shape` (possibly wider than ``ceil(s / C)``). A head-parallel
piece (Ulysses degree ``u > 1``) goes to the ``u`` earliest-free ranks of each of the ``r = k / u`` nodes
whose ``u``-th rank frees first (pure Ulysses: the one such node), so its all-to-alls stay inside
nodes; it is not backfilled. What is left for the later steps: the :class:`Group` s with
their start and finish, each rank's clock (the finish of its last group, where its tail starts) and
the holes, which steps 2-4 fill with whole sequences.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from typing import NamedTuple

from .cost import CostModel
from .naive import ceil_div
from .plan import Piece
from .splits import Shape, choose_shape


class Group(NamedTuple):
    """A distributed sequence on its ranks: every member runs it from ``start`` to ``finish``."""

    piece: Piece
    start: float
    finish: float


class Hole(NamedTuple):
    """Rank ``rank`` idles from ``start`` to ``end``, waiting for group ``gid``. Sorts by start."""

    start: float
    rank: int
    end: float
    gid: int

    @property
    def length(self) -> float:
        return self.end - self.start


class FreeAt(NamedTuple):
    """Rank ``rank`` is free from ``time`` on (its tail starts there). Sorts by time."""

    time: float
    rank: int


class Member(NamedTuple):
    """A rank a group could take, and the hole it would fill there (``None``: it starts from its tail)."""

    rank: int
    hole: Hole | None


class Stamped(NamedTuple):
    """An entry of a lazy heap: stale once ``versions[item]`` has moved past ``version``."""

    key: float
    item: int
    version: int


def current_top(heap: list[Stamped], versions: Sequence[int]) -> Stamped:
    """The top of ``heap`` that is still current; stale entries above it are popped."""
    while heap[0].version != versions[heap[0].item]:
        heapq.heappop(heap)
    return heap[0]


class _Open(NamedTuple):
    """A hole a sweep has reached, open until ``end``. Sorts by end."""

    end: float
    rank: int
    hole: Hole


class _Idle(NamedTuple):
    """A rank a sweep found idle: since when, and in which hole (``None``: in its tail)."""

    since: float
    rank: int
    hole: Hole | None


class _Option(NamedTuple):
    """A place a group could go. Options rank by finish, then one node first, then backfilled first."""

    finish: float
    spans: bool
    from_tails: int  # 0 when backfilled into holes, 1 when the members start from their tails
    start: float
    members: list[Member]
    ulysses: int = 1  # > 1: members in group order (positions' sub-groups), not sorted

    @property
    def rank_key(self) -> tuple[float, bool, int]:
        return self.finish, self.spans, self.from_tails


class GroupPlacement:
    """Step 1 for one set of distributed sequences; :meth:`place` runs it.

    After it: ``groups`` in placement order (a group's id is its index), ``clock[r]`` the finish of
    rank ``r``'s last group, ``holes[(r, gid)]`` the wait of rank ``r`` before group ``gid``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        world_size: int,
        tokens_per_rank: int,
        cost: CostModel,
        backfill: bool,
        attention_split: str = "ring",
        target: float = 0.0,
    ) -> None:
        W = world_size
        self.lengths, self.W, self.C, self.cost, self.backfill = lengths, W, tokens_per_rank, cost, backfill
        self.split, self.target = attention_split, target
        self.rpn = max(1, int(cost.ranks_per_node))
        self.multi_node = self.rpn < W
        self.groups: list[Group] = []
        self.clock = [0.0] * W
        self.holes: dict[tuple[int, int], Hole] = {}
        self.tails = [FreeAt(0.0, r) for r in range(W)]  # every rank's tail start, sorted
        self.search: list[Hole] = []  # the holes still open to groups, sorted
        # per node, its ranks' tails sorted, and per group size k <= rpn a lazy heap of the nodes by
        # their k-th earliest tail (built by place for the sizes it needs)
        self.node_tails: list[list[FreeAt]] = []
        self.node_version = [0] * ceil_div(W, self.rpn)
        self.node_heaps: dict[int, list[Stamped]] = {}

    def place(self, dist: Sequence[int]) -> GroupPlacement:
        """Place the sequences ``dist`` (positions, longest first)."""
        cost, multi_node = self.cost, self.multi_node
        shapes = [
            choose_shape(cost, self.lengths[i], ceil_div(self.lengths[i], self.C), self.W, self.split, self.target)
            for i in dist
        ]
        # shortest group time still to come: shorter holes can only take whole sequences
        suffix_min = [0.0] * (len(shapes) + 1)
        suffix_min[-1] = float("inf")
        for n in range(len(shapes) - 1, -1, -1):
            suffix_min[n] = min(suffix_min[n + 1], shapes[n].time_in_node)
        if multi_node:
            sizes = {shape.k if shape.ulysses in (1, shape.k) else shape.ulysses for shape in shapes}
            self._index_nodes(sorted(sizes & set(range(2, self.rpn + 1))))

        for pos, sample in enumerate(dist):
            best = min(self._options(shapes[pos]), key=lambda o: o.rank_key)
            self._commit(sample, shapes[pos].length, best, suffix_min[pos + 1])
            if pos % 64 == 63:  # forget holes too short for any group still to come
                floor = suffix_min[pos + 1]
                self.search = [h for h in self.search if h.length >= floor]
        return self

    def _index_nodes(self, ks: list[int]) -> None:
        if not ks:
            return
        rpn, W = self.rpn, self.W
        self.node_heaps = {k: [] for k in ks}
        for n in range(len(self.node_version)):
            ranks = [FreeAt(0.0, r) for r in range(n * rpn, min(W, (n + 1) * rpn))]
            self.node_tails.append(ranks)
            for k in ks:
                if k <= len(ranks):
                    self.node_heaps[k].append(Stamped(0.0, n, 0))
        for h in self.node_heaps.values():
            heapq.heapify(h)

    def _head_parallel_option(self, shape: Shape) -> _Option:
        """Where a piece of Ulysses degree ``u > 1`` goes: the ``u`` earliest-free ranks of each of the ``r``
        nodes whose ``u``-th rank frees first (the ``k`` earliest anywhere when the nodes cannot hold it)."""
        k, u, cost = shape.k, shape.ulysses, self.cost
        r = k // u
        size = k if r == 1 else u
        chosen = []
        heap = self.node_heaps.get(size) if self.multi_node else None
        if heap is not None:
            while len(chosen) < r and heap:
                top = heapq.heappop(heap)
                if top.version == self.node_version[top.item] and top.item not in {c.item for c in chosen}:
                    chosen.append(top)
            for top in chosen:  # put back: the commit refreshes the nodes it uses
                heapq.heappush(heap, top)
        if heap is not None and len(chosen) == r:
            chosen.sort(key=lambda t: t.item)
            ranks = [f.rank for t in chosen for f in sorted(self.node_tails[t.item][:size], key=lambda f: f.rank)]
            start = max(t.key for t in chosen)
        else:
            tails = sorted(self.tails[:k], key=lambda f: (f.rank // self.rpn, f.rank))
            ranks = [f.rank for f in tails]
            start = max(f.time for f in tails)
        group = tuple(ranks)
        spans = cost.group_spans_nodes(group)
        finish = start + cost.split_piece_time(shape.length, group, u)
        return _Option(finish, spans, 1, start, [Member(rank, None) for rank in group], u)

    def _options(self, shape: Shape) -> list[_Option]:
        """Where the group of ``shape`` could go (see the module docstring)."""
        if shape.ulysses > 1:
            return [self._head_parallel_option(shape)]
        k, p_in, p_span = shape.k, shape.time_in_node, shape.time_spanning
        cost, multi_node = self.cost, self.multi_node
        # after the members' last groups: the k earliest tails anywhere ...
        tails = self.tails[:k]
        start = tails[-1].time
        spans = multi_node and cost.group_spans_nodes([t.rank for t in tails])
        p = p_span if spans else p_in
        options = [_Option(start + p, spans, 1, start, [Member(t.rank, None) for t in tails])]
        # ... or the k earliest of the best node
        if spans and k in self.node_heaps:
            top = current_top(self.node_heaps[k], self.node_version)
            ranks = self.node_tails[top.item][:k]
            options.append(_Option(top.key + p_in, False, 1, top.key, [Member(t.rank, None) for t in ranks]))
        # backfilled into holes, when that finishes earlier
        if self.backfill and self.search:
            if multi_node and k <= self.rpn:  # one node first: its ring is faster, so it bounds the rest
                found = self._sweep(k, p_in, min(o.finish for o in options) - p_in, self.rpn)
                if found is not None:
                    t, members = found
                    options.append(_Option(t + p_in, False, 0, t, members))
            found = self._sweep(k, p_span, min(o.finish for o in options) - p_span, None)
            if found is not None:
                t, members = found
                sp = multi_node and cost.group_spans_nodes([m.rank for m in members])
                options.append(_Option(t + (p_span if sp else p_in), sp, 0, t, members))
        return options

    def _sweep(self, k: int, p: float, bound: float, rpn: int | None) -> tuple[float, list[Member]] | None:
        """Earliest ``t < bound`` at which ``k`` ranks (of one node when ``rpn``) are free for ``p``
        seconds, counting holes and tails; ``(t, members)`` or None."""
        tails = self.tails
        hi = bisect.bisect_left(self.search, (bound,))
        if hi == 0:
            return None  # tails alone: the tail options already found the earliest
        holes = [h for h in self.search[:hi] if h.length >= p]
        ti = bisect.bisect_left(tails, (bound,))
        hi = len(holes)
        if hi + ti < k or hi == 0:
            return None
        active: list[_Open] = []  # heap by hole end
        free: list[FreeAt] = []
        count: dict[int, int] = {}
        i = j = 0
        while i < hi or j < ti:
            if j >= ti or (i < hi and holes[i].start <= tails[j].time):
                hole = holes[i]
                i += 1
                t, r = hole.start, hole.rank
                heapq.heappush(active, _Open(hole.end, r, hole))
            else:
                t, r = tails[j]
                j += 1
                free.append(FreeAt(t, r))
            node = r // rpn if rpn else 0
            count[node] = count.get(node, 0) + 1
            while active and active[0].end < t + p:
                q = heapq.heappop(active).rank
                count[q // rpn if rpn else 0] -= 1
            if count[node] >= k:
                cands = [_Idle(a.hole.start, a.rank, a.hole) for a in active]
                cands += [_Idle(f.time, f.rank, None) for f in free]
                if rpn:
                    cands = [c for c in cands if c.rank // rpn == node]
                cands.sort(key=lambda c: (-c.since, c.rank))  # the latest-begun idle stretches, then low ranks
                return t, [Member(c.rank, c.hole) for c in cands[:k]]
        return None

    def _commit(self, sample: int, s: int, option: _Option, floor: float) -> None:
        """Place the group of ``sample`` as ``option`` says; keep its members' new holes of at least
        ``floor`` seconds open to later groups."""
        gid = len(self.groups)
        start, finish = option.start, option.finish
        ranks = [m.rank for m in option.members]
        piece = Piece(
            sample=sample, length=s, group=tuple(ranks if option.ulysses > 1 else sorted(ranks)), ulysses=option.ulysses
        )
        self.groups.append(Group(piece, start, finish))
        clock, rpn = self.clock, self.rpn
        touched = set()
        for r, hole in option.members:
            if hole is None:  # from its tail
                left = Hole(clock[r], r, start, gid)
                self.tails.pop(bisect.bisect_left(self.tails, (clock[r], r)))
                clock[r] = finish
                bisect.insort(self.tails, FreeAt(finish, r))
                touched.add(r // rpn)
                right = None
            else:
                self.search.pop(bisect.bisect_left(self.search, hole))
                del self.holes[r, hole.gid]
                left = Hole(hole.start, r, start, gid)
                right = Hole(finish, r, hole.end, hole.gid)
            for h in (left, right):
                if h is not None and h.end > h.start:
                    self.holes[h.rank, h.gid] = h
                    if h.length >= floor:
                        bisect.insort(self.search, h)
        for n in sorted(touched) if self.node_heaps else ():
            self.node_version[n] += 1
            ranks = sorted(FreeAt(clock[r], r) for _, r in self.node_tails[n])
            self.node_tails[n] = ranks
            for kk, h in self.node_heaps.items():
                if kk <= len(ranks):
                    heapq.heappush(h, Stamped(ranks[kk - 1].time, n, self.node_version[n]))
