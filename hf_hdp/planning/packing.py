"""Best-fit packing: put each item into the open bin with the least room that still holds it.

Every planner packs with :class:`BestFit`: naive HDP packs whole sequences into the slots of its
ranks, the static mesh packs its micro-batches, and the balance scheduler packs the whole
sequences of each wait and tail into micro-batches, each such run of sequences a :class:`Segment`.
"""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple


class BestFit:
    """Open bins ordered by remaining capacity, for best-fit packing in ``O(log n)`` per lookup.

    A bin is identified by a sortable ``key``; among bins with the same remaining capacity the
    smallest key wins, which keeps the packing deterministic. A full bin (nothing remaining) is not
    kept: no item fits it.
    """

    def __init__(self) -> None:
        self._bins: list[tuple[int, Any]] = []  # sorted (remaining, key)

    def add(self, key: Any, remaining: int) -> None:
        if remaining > 0:
            bisect.insort(self._bins, (remaining, key))

    def fits(self, size: int) -> bool:
        """Whether some bin has at least ``size`` free."""
        return bool(self._bins) and self._bins[-1][0] >= size

    def take(self, size: int) -> Any | None:
        """Remove and return the tightest bin with at least ``size`` free, or ``None``.

        The caller puts the bin back with :meth:`add` and its new remaining capacity.
        """
        i = bisect.bisect_left(self._bins, (size,))
        if i == len(self._bins):
            return None
        return self._bins.pop(i)[1]

    def discard(self, key: Any, remaining: int) -> None:
        """Forget bin ``key``, added with ``remaining`` free (a full bin was never kept)."""
        if remaining <= 0:
            return
        i = bisect.bisect_left(self._bins, (remaining, key))
        if i == len(self._bins) or self._bins[i] != (remaining, key):
            raise KeyError(key)
        del self._bins[i]


class _Item(NamedTuple):
    """A sequence of a :class:`Segment`: its micro-batch, tokens and time."""

    batch: int
    tokens: int
    time: float


class BatchWork(NamedTuple):
    """A micro-batch of a :class:`Segment` and the time of its sequences. Sorts by that time."""

    work: float
    batch: int


class Segment:
    """Whole sequences one rank runs back to back (in the balance scheduler: a wait before a group,
    or the rank's tail), packed best-fit by tokens into micro-batches of at most ``cap`` tokens, and
    their time: ``work`` (the sequences' own times) plus an overhead per micro-batch.

    Each micro-batch has an id; ids grow in creation order, and best-fit ties go to the lowest.
    """

    __slots__ = ("cap", "work", "_batches", "_free", "_items", "_fit", "_next_id")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.work = 0.0  # sum of local_time of the sequences
        self._batches: dict[int, list[int]] = {}  # micro-batch id -> sample positions, in creation order
        self._free: dict[int, int] = {}  # micro-batch id -> tokens still free
        self._items: dict[int, _Item] = {}  # sample position -> where it is, its tokens and time
        self._fit = BestFit()  # the micro-batches with tokens free
        self._next_id = 0

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def batches(self) -> list[list[int]]:
        """The sample positions of each micro-batch."""
        return list(self._batches.values())

    def samples(self) -> list[int]:
        return list(self._items)

    def time(self, overhead: float) -> float:
        return self.work + overhead * len(self._batches)

    def opens_bin(self, n: int) -> bool:
        """Whether a sequence of ``n`` tokens would need a micro-batch of its own."""
        return not self._fit.fits(n)

    def holds_alone(self, sample: int) -> bool:
        """Whether ``sample`` is the only sequence of its micro-batch."""
        return sample in self._items and self._batches[self._items[sample].batch] == [sample]

    def add(self, sample: int, n: int, t: float) -> None:
        b = self._fit.take(n)
        if b is None:
            b, self._next_id = self._next_id, self._next_id + 1
            self._batches[b], self._free[b] = [sample], self.cap - n
        else:
            self._batches[b].append(sample)
            self._free[b] -= n
        self._fit.add(b, self._free[b])
        self._items[sample] = _Item(b, n, t)
        self.work += t

    def remove(self, sample: int) -> None:
        item = self._items.pop(sample)
        b, batch = item.batch, self._batches[item.batch]
        batch.remove(sample)
        self._fit.discard(b, self._free[b])
        if batch:
            self._free[b] += item.tokens
            self._fit.add(b, self._free[b])
        else:
            del self._batches[b], self._free[b]
        self.work -= item.time

    def batches_within(self, tokens: int) -> list[BatchWork]:
        """Every micro-batch of at most ``tokens`` tokens, sorted."""
        return sorted(
            BatchWork(self._work_of(batch), b)
            for b, batch in self._batches.items()
            if self.cap - self._free[b] <= tokens
        )

    def pop_batch(self, b: int) -> tuple[list[int], int]:
        """Take micro-batch ``b`` out of the segment: its sample positions and tokens."""
        batch, free = self._batches.pop(b), self._free.pop(b)
        self._fit.discard(b, free)
        self.work -= self._work_of(batch)
        for i in batch:
            del self._items[i]
        return batch, self.cap - free

    def _work_of(self, batch: list[int]) -> float:
        return sum(self._items[i].time for i in batch)
