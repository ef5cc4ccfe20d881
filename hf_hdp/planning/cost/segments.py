"""The segments of a micro-batch: its pieces grouped as the attention runs them (pure Python).

All the distributed pieces of one micro-batch that share a group and a Ulysses degree form ONE segment in
:mod:`hf_hdp.attention.ring` (and :mod:`hf_hdp.attention.ulysses`): they share every message, and their blocks
add up. The whole local sequences form one more, on the rank alone.
"""

from __future__ import annotations

from typing import NamedTuple


class SegmentOf(NamedTuple):
    """The pieces of a micro-batch that run as one segment: their ``group``, Ulysses degree, lengths and
    samples; ``key`` (the samples, with the degree) names the segment within its plan without hashing the
    group (a wide group's members would otherwise hash it ``k`` times each)."""

    group: tuple[int, ...]
    ulysses: int
    lengths: list[int]
    samples: tuple[int, ...]

    @property
    def key(self) -> tuple:
        return (self.ulysses, self.samples)


def segments_of(pieces) -> list[SegmentOf]:
    """The segments of a micro-batch's ``pieces`` as the attention runs them: one of the whole local
    sequences (group of one rank), and one per ``(group, Ulysses degree)`` of the distributed pieces, in
    sample order. A micro-batch with at most one distributed piece needs no grouping."""
    local = [p for p in pieces if len(p.group) <= 1]
    shared = [p for p in pieces if len(p.group) > 1]
    out = []
    if local:
        out.append(SegmentOf(tuple(local[0].group), 1, [int(p.length) for p in local], tuple(p.sample for p in local)))
    if len(shared) == 1:
        p = shared[0]
        out.append(SegmentOf(tuple(p.group), getattr(p, "ulysses", 1), [int(p.length)], (p.sample,)))
    elif shared:
        by_group: dict = {}
        for p in shared:
            by_group.setdefault((tuple(p.group), getattr(p, "ulysses", 1)), []).append(p)
        for (group, ulysses), ps in by_group.items():
            out.append(SegmentOf(group, ulysses, [int(p.length) for p in ps], tuple(p.sample for p in ps)))
    return out
