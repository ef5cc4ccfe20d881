"""Zigzag layout of one sequence over a group of ``k`` ranks (pure Python).

The sequence of ``s`` tokens is cut into ``2k`` chunks. Member ``i`` holds chunk ``i`` (its
*front* chunk) and chunk ``2k-1-i`` (its *back* chunk), so that under a causal mask every member
does about the same attention work: early fronts pair with late backs.

Chunk sizes are chosen so that no member ever holds more than ``ceil(s / k)`` tokens, which is
what the planner's capacity check assumes: member ``i`` gets ``n_i = s // k + (i < s % k)``
tokens, ``front_i = n_i // 2`` of them in its front chunk and the rest in its back chunk. The
chunks therefore differ by at most one token, and lengths not divisible by ``2k`` need no
padding. A chunk may be empty when ``s < 2k``; the attention code handles empty chunks.

In sequence order the chunks are ``front_0, front_1, ..., front_{k-1}, back_{k-1}, ..., back_0``.

The same layout serves sliding-window and chunked layers, whose work per row does not depend on where
the row lies: they are balanced by the equal row counts (see :mod:`hf_hdp.planning.reach`).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4096)
def zigzag_member_sizes(length: int, k: int) -> tuple[int, ...]:
    """Tokens held by each of the ``k`` members: ``n_i = s // k + (i < s % k)``."""
    if k < 1:
        raise ValueError(f"a group needs at least one rank, got k={k}")
    if length < 0:
        raise ValueError(f"a sequence length cannot be negative, got {length}")
    q, r = divmod(length, k)
    return tuple(q + (1 if i < r else 0) for i in range(k))


@lru_cache(maxsize=4096)
def zigzag_front_back(length: int, k: int) -> tuple[tuple[int, int], ...]:
    """``(front_len, back_len)`` of each member."""
    return tuple((n // 2, n - n // 2) for n in zigzag_member_sizes(length, k))


@lru_cache(maxsize=4096)
def zigzag_chunk_bounds(length: int, k: int) -> tuple[tuple[int, int], ...]:
    """``[start, end)`` of each of the ``2k`` chunks, in sequence order (chunk ``j`` for ``j = 0..2k-1``)."""
    fb = zigzag_front_back(length, k)
    sizes = [fb[j][0] for j in range(k)] + [fb[2 * k - 1 - j][1] for j in range(k, 2 * k)]
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    assert start == length
    return tuple(bounds)


def member_token_ranges(length: int, k: int, member: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges member ``member`` holds, front chunk first; empty ranges dropped
    and touching ranges merged (so ``k == 1`` gives ``[(0, length)]``)."""
    if not 0 <= member < k:
        raise ValueError(f"member {member} is outside a group of {k}")
    bounds = zigzag_chunk_bounds(length, k)
    ranges: list[tuple[int, int]] = []
    for a, b in (bounds[member], bounds[2 * k - 1 - member]):
        if a == b:
            continue
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


# ---------------------------------------------------------------------------------------------------
# Head-parallel (Ulysses) and hybrid pieces
#
# A piece of degree ``u`` on ``k = u * r`` ranks is a zigzag ring over ``r`` *positions*, each position
# a Ulysses sub-group of ``u`` ranks: member ``m`` of the group is sub-member ``j = m % u`` of position
# ``p = m // u``. Position ``p`` holds what member ``p`` of an ``r``-rank zigzag ring would hold (its
# front and back chunks, in sequence order), and its ``u`` sub-members hold contiguous, even slices of
# those rows. ``u = 1`` is the plain ring; ``r = 1`` is pure Ulysses, where the slices are contiguous
# shards of the whole sequence.
# ---------------------------------------------------------------------------------------------------


def even_split(n: int, parts: int) -> tuple[int, ...]:
    """``n`` rows in ``parts`` contiguous slices: ``n // parts`` each, the first ``n % parts`` one more."""
    q, r = divmod(n, parts)
    return tuple(q + (1 if i < r else 0) for i in range(parts))


def check_degree(k: int, ulysses: int) -> int:
    """The ring degree ``r = k / u``; ``ValueError`` when ``u`` does not divide the group size."""
    if ulysses < 1 or k % ulysses:
        raise ValueError(f"a Ulysses degree of {ulysses} must divide the group size {k}")
    return k // ulysses


@lru_cache(maxsize=4096)
def hybrid_member_sizes(length: int, k: int, ulysses: int = 1) -> tuple[int, ...]:
    """Tokens held by each of the ``k`` members of a piece of Ulysses degree ``ulysses`` (member order as above).
    No member holds more than ``ceil(length / k)``."""
    r = check_degree(k, ulysses)
    if ulysses == 1:
        return zigzag_member_sizes(length, k)
    return tuple(n for rows in zigzag_member_sizes(length, r) for n in even_split(rows, ulysses))


def hybrid_token_ranges(length: int, k: int, member: int, ulysses: int = 1) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges member ``member`` holds, in row order (see :func:`member_token_ranges`)."""
    r = check_degree(k, ulysses)
    if ulysses == 1:
        return member_token_ranges(length, k, member)
    if not 0 <= member < k:
        raise ValueError(f"member {member} is outside a group of {k}")
    p, j = divmod(member, ulysses)
    rows = member_token_ranges(length, r, p)
    sizes = even_split(sum(b - a for a, b in rows), ulysses)
    lo = sum(sizes[:j])
    hi = lo + sizes[j]
    out: list[tuple[int, int]] = []
    seen = 0
    for a, b in rows:  # the slice [lo, hi) of the position's rows, mapped back to the sequence
        s, e = max(a, a + lo - seen), min(b, a + hi - seen)
        if e > s:
            out.append((s, e))
        seen += b - a
    return out


def ring_positions(group: tuple[int, ...], ulysses: int) -> tuple[tuple[int, ...], ...]:
    """The Ulysses sub-groups (one per ring position) of a group in member order."""
    return tuple(group[p * ulysses : (p + 1) * ulysses] for p in range(check_degree(len(group), ulysses)))


def head_rings(group: tuple[int, ...], ulysses: int) -> tuple[tuple[int, ...], ...]:
    """The rings, one per head slice ``j``: sub-member ``j`` of every position, in position order."""
    check_degree(len(group), ulysses)
    return tuple(group[j::ulysses] for j in range(ulysses))


class HeadSplit(tuple):
    """Member ``j``'s heads of a Ulysses group: query heads ``[q_start, q_stop)`` and ``kv_heads``, the
    distinct key/value heads they use, in order (the backend maps local query head ``t`` to
    ``kv_heads[t // (num_q / len(kv_heads))]``)."""

    __slots__ = ()

    def __new__(cls, q_start: int, q_stop: int, kv_heads: tuple[int, ...]):
        return super().__new__(cls, (q_start, q_stop, tuple(kv_heads)))

    q_start = property(lambda self: self[0])
    q_stop = property(lambda self: self[1])
    kv_heads = property(lambda self: self[2])

    @property
    def num_q(self) -> int:
        return self.q_stop - self.q_start


@lru_cache(maxsize=256)
def head_split(num_q_heads: int, num_kv_heads: int, degree: int) -> tuple[HeadSplit, ...]:
    """Every member's heads for a Ulysses group of ``degree``.

    The degree must divide the query heads. GQA with fewer K/V heads than the degree replicates K/V
    heads (members whose query heads share a K/V head each receive it); a K/V grouping that does not
    align with the split sends one K/V head per query head. Either way the replicated traffic is real,
    and counted (:meth:`~hf_hdp.planning.cost.CostModel.segment_bytes_by_member`).
    """
    if degree < 1 or num_q_heads % degree:
        raise ValueError(
            f"a Ulysses degree of {degree} must divide the {num_q_heads} query heads; use a degree that divides them "
            "(or a ring for this sample)"
        )
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"the query heads ({num_q_heads}) must be a multiple of the key/value heads ({num_kv_heads})")
    per, group = num_q_heads // degree, num_q_heads // num_kv_heads
    splits = []
    for j in range(degree):
        start, stop = j * per, (j + 1) * per
        used = [h // group for h in range(start, stop)]
        distinct = tuple(sorted(set(used)))
        ratio = per // len(distinct) if per % len(distinct) == 0 else 0
        if not ratio or any(distinct[t // ratio] != used[t] for t in range(per)):
            distinct = tuple(used)  # one K/V head per query head: always right, more traffic
        splits.append(HeadSplit(start, stop, distinct))
    return tuple(splits)
