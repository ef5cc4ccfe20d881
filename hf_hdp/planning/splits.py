"""Per sample: how many ranks a distributed sequence takes, and how its attention is split over them (pure Python).

A sequence of ``s > C`` tokens needs at least ``k_min = ceil(s / C)`` ranks. Its attention can run
as a zigzag ring over ``k`` ranks (Ulysses degree ``u = 1``), head-parallel over ``u = k`` ranks
(Ulysses), or as a hybrid of ``u``-rank Ulysses sub-groups inside nodes and a ring of ``r = k / u``
positions across them (:mod:`hf_hdp.planning.layout`). :func:`choose_shape` picks ``(k, u)`` for
one sequence under ``HDPConfig.attention_split``:

- ``"ring"``: ``u = 1`` and ``k = k_min``, the first wave's planner exactly (a wider ring rarely
  pays: past a few hops a member's exposed ring time stays near ``s`` times the per-token wire time
  whatever ``k``; see :mod:`hf_hdp.planning.balanced`).
- ``"ulysses"``: ``u = k``, the smallest ``k >= k_min`` that divides the query heads (a wider group
  when ``k_min`` does not), or a ring of ``k_min`` where no such ``k`` fits the world.
- ``"hybrid"``: the smallest valid ``u x r >= k_min`` (``u`` divides the heads and fits a node; the
  degenerate ``u = 1`` and ``r = 1`` are valid), the larger ``u`` on a tie.
- ``"auto"`` (the default): every ``k`` in ``{k_min} ∪ {ceil(k_min / u)·u}`` with every valid ``u``
  dividing it, priced by :meth:`~hf_hdp.planning.cost.CostModel.split_piece_time`. The shape that
  costs the fewest rank-seconds (``k x`` its time) among those no slower than the step's target
  wins. Where none is that fast (the longest sequences, which would set the step time), *wider
  groups* are tried, narrowest first, with the widest degree and as a ring, ``k`` up to the world:
  the first that meets the target wins, else the fastest found before widening stops paying. Members then hold
  fewer than ``C`` tokens: with head parallelism that pays, since each member's traffic falls with
  ``u`` while its compute falls with ``k``.

The step's target is the mean compute per rank, ``Σ local_time(s) / W``, a lower bound of any
step: a piece longer than that is on the critical path whatever else the planner does.
"""

from __future__ import annotations

from typing import NamedTuple

from .cost import CostModel

#: the values of HDPConfig.attention_split
SPLITS = ("auto", "ring", "ulysses", "hybrid")
#: the attention splits that run head-parallel (Ulysses sub-groups): they need the model's heads
HEAD_PARALLEL = ("ulysses", "hybrid")
#: how a planned sample runs (:attr:`~hf_hdp.planning.plan.Piece.split`), in the order reports list them
SPLIT_KINDS = ("local", "ring", "ulysses", "hybrid")
# wider groups tried for a sequence slower than the target, as multiples of k_min
_WIDER = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


class Shape(NamedTuple):
    """A distributed sequence's group size ``k`` and Ulysses degree ``u``, with its piece time in one
    node and spanning nodes (for ``u > 1``: sub-groups in nodes, the ring of positions across them)."""

    length: int
    k: int
    ulysses: int
    time_in_node: float
    time_spanning: float


def split_kind(k: int, ulysses: int = 1) -> str:
    """One of :data:`SPLIT_KINDS`: how a sample on ``k`` ranks with Ulysses degree ``ulysses`` runs its attention:
    ``"local"`` (one rank), ``"ring"`` (``u = 1``), ``"ulysses"`` (``u = k``, heads only) or ``"hybrid"`` (heads x
    ring)."""
    if k <= 1:
        return "local"
    return "ring" if ulysses == 1 else "ulysses" if ulysses == k else "hybrid"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"attention_split must be one of {SPLITS}, got {split!r}")
    return split


def degrees(cost: CostModel, world_size: int) -> list[int]:
    """The Ulysses degrees ``u > 1`` a sub-group can take: ``u`` divides the query heads and fits a node (and the world)."""
    if not cost.num_heads:
        return []
    top = min(int(cost.ranks_per_node), world_size, cost.num_heads)
    return [u for u in range(2, top + 1) if cost.num_heads % u == 0]


def shape_of(cost: CostModel, s: int, k: int, u: int, world_size: int) -> Shape:
    """``(k, u)`` priced as the planner places it: a ring in one node or across two; with ``u > 1``, each
    position's sub-group inside a node and the ring of positions across nodes (one node when the world is one)."""
    multi = world_size > max(1, int(cost.ranks_per_node))
    if u == 1:
        rpn = int(cost.ranks_per_node)
        t_in = cost.piece_time(s, k, multi and k > rpn)
        return Shape(s, k, 1, t_in, cost.piece_time(s, k, True) if multi else t_in)
    compute, comm = cost.head_parallel_breakdown([s], k, u, u > cost.ranks_per_node, multi and k > u)
    t = cost.overhead_time() + compute + comm
    return Shape(s, k, u, t, t)


def choose_shape(cost: CostModel, s: int, k_min: int, world_size: int, split: str, target: float) -> Shape:
    """The shape of one sequence of ``s`` tokens needing ``k_min`` ranks (see the module docstring)."""
    W = world_size
    if k_min <= 1:
        return Shape(s, 1, 1, cost.sequence_time(s), cost.sequence_time(s))
    us = degrees(cost, W)
    if split == "ulysses":
        for k in range(k_min, min(W, cost.num_heads) + 1):
            if cost.num_heads % k == 0:
                return shape_of(cost, s, k, k, W)
        return shape_of(cost, s, k_min, 1, W)
    if split == "hybrid":
        best = None
        for u in [1, *us]:
            r = -(-k_min // u)
            k = u * r
            if k <= W and (best is None or k < best[0] or (k == best[0] and u > best[1])):
                best = (k, u)
        return shape_of(cost, s, best[0], best[1], W)
    if split == "ring" or not us:
        return shape_of(cost, s, k_min, 1, W)
    # at k_min: the ring and every degree dividing it; else the next multiple of each degree
    pairs = {(k_min, 1)} | {(k_min, u) for u in us if k_min % u == 0} | {(-(-k_min // u) * u, u) for u in us}
    shapes = [shape_of(cost, s, k, u, W) for k, u in sorted(pairs) if k <= W]
    fast = [sh for sh in shapes if _time(sh) <= target]
    if fast:
        return min(fast, key=lambda sh: (sh.k * _time(sh), sh.k, -sh.ulysses))
    # wider groups, narrowest first, with the widest degree (and a ring): the first that meets the target
    # wins (rank-seconds grow with k); stop when widening no longer speeds the piece up
    best = min(shapes, key=lambda sh: (_time(sh), sh.k, -sh.ulysses))
    u = max(us)
    tried = {k for k, _ in pairs}
    for f in _WIDER:
        k = -(-int(k_min * f) // u) * u
        if k > W:
            break
        if k in tried:
            continue
        tried.add(k)
        here = min((shape_of(cost, s, k, u, W), shape_of(cost, s, k, 1, W)), key=lambda sh: (_time(sh), -sh.ulysses))
        if _time(here) <= target:
            return here
        if _time(here) >= _time(best):
            break
        best = here
    return best


def _time(shape: Shape) -> float:
    return max(shape.time_in_node, shape.time_spanning)
