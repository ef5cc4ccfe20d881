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
