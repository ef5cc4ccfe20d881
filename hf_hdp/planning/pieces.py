"""Where the rows of a split sample live, for the state-carrying layers (pure Python, no torch).

A distributed segment (:class:`~hf_hdp.attention.metadata.RingSegment`, or a head-parallel
:class:`~hf_hdp.attention.metadata.UlyssesSegment` of degree ``u``) holds, on every member ``m`` of its
group, the ranges :func:`~hf_hdp.planning.layout.hybrid_token_ranges` gives of each of its documents, in
document order. A *piece* is one such range: ``(document, member, start, end, row)``, with ``row`` the
piece's first row in member ``m``'s rows of the segment. Sorted by start, a document's pieces cover it
exactly once: that is the order its state flows in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .layout import hybrid_token_ranges


@dataclass(frozen=True)
class Piece:
    doc: int
    member: int
    start: int
    end: int
    row: int

    @property
    def length(self) -> int:
        return self.end - self.start


@lru_cache(maxsize=1024)
def segment_pieces(lengths: tuple[int, ...], k: int, ulysses: int = 1) -> tuple[tuple[Piece, ...], ...]:
    """Per document, its pieces in sample order (empty ranges are not pieces)."""
    rows = [0] * k
    docs: list[list[Piece]] = [[] for _ in lengths]
    for d, n in enumerate(lengths):
        for m in range(k):
            for a, b in hybrid_token_ranges(n, k, m, ulysses):
                docs[d].append(Piece(d, m, a, b, rows[m]))
                rows[m] += b - a
    return tuple(tuple(sorted(p, key=lambda x: x.start)) for p in docs)


def member_rows(pieces: tuple[tuple[Piece, ...], ...], member: int) -> int:
    """Rows member ``member`` holds in the segment."""
    return sum(p.length for doc in pieces for p in doc if p.member == member)


@lru_cache(maxsize=1024)
def halo_rows(lengths: tuple[int, ...], k: int, ulysses: int, width: int, dst: int, src: int) -> tuple[int, ...]:
    """The rows of member ``src`` (its row indices, in the order ``dst`` consumes them) that member ``dst``'s
    pieces need as their convolution halo: the ``width`` sample positions before each piece's start (fewer at
    the document's start). With ``src == dst``: the halo rows ``dst`` holds itself."""
    pieces = segment_pieces(lengths, k, ulysses)
    out = []
    for doc in pieces:
        for p in doc:
            if p.member != dst:
                continue
            for pos in range(max(0, p.start - width), p.start):
                owner = _owner(doc, pos)
                if owner.member == src:
                    out.append(owner.row + pos - owner.start)
    return tuple(out)


def _owner(doc: tuple[Piece, ...], pos: int) -> Piece:
    for p in doc:
        if p.start <= pos < p.end:
            return p
    raise ValueError(f"position {pos} is outside the document")


@lru_cache(maxsize=1024)
def halo_index(lengths: tuple[int, ...], k: int, ulysses: int, width: int, member: int):
    """Per piece of ``member`` (document order, then sample order), the halo's rows as indices into the
    concatenation of the buffers :func:`halo_rows` describes for sources ``0 .. k-1``."""
    offsets, at = [], 0
    for src in range(k):
        offsets.append(at)
        at += len(halo_rows(lengths, k, ulysses, width, member, src))
    used = [0] * k
    out = []
    for doc in segment_pieces(lengths, k, ulysses):
        for p in doc:
            if p.member != member:
                continue
            idx = []
            for pos in range(max(0, p.start - width), p.start):
                src = _owner(doc, pos).member
                idx.append(offsets[src] + used[src])
                used[src] += 1
            out.append((p, tuple(idx)))
    return tuple(out)
