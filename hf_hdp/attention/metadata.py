"""Per-micro-batch attention metadata, built by the collator and read by the ``"hdp"`` attention.

A packed micro-batch of ``T`` tokens is laid out as::

    [ whole local sequences ............ | ring segment 0 | ring segment 1 | ... ]
      0                          local_len

- The *local region* holds whole sequences (``k == 1`` pieces). They run one varlen kernel with
  ``local_cu_seqlens`` and never communicate.
- A *ring segment* holds this rank's zigzag chunks of every distributed piece that shares one
  group. For each of its documents (in sample order) the segment holds ``front`` then ``back``
  chunk rows. The segment runs zigzag ring attention with the group members only.

A *head-parallel segment* (:class:`UlyssesSegment`) holds this rank's rows of the pieces of Ulysses
degree ``u > 1`` that share one group: for each document, its slice of its ring position's rows. It
runs :mod:`hf_hdp.attention.ulysses` (all-to-all to heads, the ring over the positions, all-to-all back).

Segments are ordered by their first sample, which is the same order on every member: together with
slot order this is what makes any valid plan deadlock-free (see :mod:`hf_hdp.planning.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..planning.reach import LayerMask, member_pairs, needed_count, needed_rows


@dataclass(frozen=True)
class RingBlock:
    """One step of the ring for one member: which local query rows attend to which source KV rows.

    ``q_index``/``kv_index`` are ``None`` when all rows are used in order. ``positions``: ``None``, or per
    packed sequence the positions of its first query and key row (the blocks of windowed and chunked layers,
    :meth:`RingSegment.reach_blocks`; the backend contract's ``positions``).
    """

    source: int  # member index whose KV this step uses
    causal: bool
    q_index: torch.Tensor | None
    kv_index: torch.Tensor | None
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    positions: tuple[tuple[int, int], ...] | None = None

    @property
    def empty(self) -> bool:
        return self.max_q == 0 or self.max_k == 0


@dataclass
class RingSegment:
    """The rows of a micro-batch that run zigzag ring attention over one group of ranks."""

    start: int
    end: int
    group: tuple[int, ...]
    member: int
    samples: tuple[int, ...]
    # layout[m][d] = (front_len, back_len) of document d on member m
    layout: tuple[tuple[tuple[int, int], ...], ...]
    slot: int = 0
    step: int = 0
    _blocks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def k(self) -> int:
        return len(self.group)

    def rows_of(self, m: int) -> int:
        """Rows member ``m`` holds in this segment (the size of the KV it sends)."""
        return sum(f + b for f, b in self.layout[m])

    def doc_lengths(self) -> tuple[int, ...]:
        """The whole length of each document of the segment (every layer asks: computed once)."""
        if "lengths" not in self._blocks:
            self._blocks["lengths"] = tuple(
                sum(sum(self.layout[m][d]) for m in range(self.k)) for d in range(len(self.samples))
            )
        return self._blocks["lengths"]

    def rows_per_doc(self) -> tuple[int, ...]:
        """The rows this member holds of each document, in row order."""
        return tuple(f + b for f, b in self.layout[self.member])

    @property
    def next_rank(self) -> int:
        return self.group[(self.member + 1) % self.k]

    @property
    def prev_rank(self) -> int:
        return self.group[(self.member - 1) % self.k]

    def source_at(self, step: int) -> int:
        return (self.member - step) % self.k

    def next_at(self, step: int) -> int:
        """The rank ``step`` members after us (the windowed exchange's destination in round ``step``)."""
        return self.group[(self.member + step) % self.k]

    def prev_at(self, step: int) -> int:
        """The rank ``step`` members before us (the windowed exchange's source in round ``step``)."""
        return self.group[(self.member - step) % self.k]

    def block(self, step: int, device: torch.device) -> RingBlock:
        """The attention block of ring step ``step`` (cached per device).

        Step 0 uses this member's own KV with a causal mask: within one document the local rows
        are ``front_i`` then ``back_i`` and all front positions precede all back positions, so plain
        causal attention over the concatenation is exact. For a source ``j < i`` every local row
        attends to the source's front chunk only (its back chunk lies after all of ours). For
        ``j > i`` only our back chunk attends, to all of the source's rows.
        """
        key = (step, str(device))
        if key not in self._blocks:
            self._blocks[key] = self._make_block(step, device)
        return self._blocks[key]

    def _make_block(self, step: int, device: torch.device) -> RingBlock:
        i, j = self.member, self.source_at(step)
        mine, theirs = self.layout[i], self.layout[j]
        q_rows: list[tuple[int, int]] = []  # (start, length) in local rows
        kv_rows: list[tuple[int, int]] = []  # (start, length) in source rows
        q_off = kv_off = 0
        for (fi, bi), (fj, bj) in zip(mine, theirs):
            if j == i:
                q, kv = (q_off, fi + bi), (kv_off, fj + bj)
            elif j < i:
                q, kv = (q_off, fi + bi), (kv_off, fj)
            else:
                q, kv = (q_off + fi, bi), (kv_off, fj + bj)
            if q[1] > 0 and kv[1] > 0:
                q_rows.append(q)
                kv_rows.append(kv)
            q_off += fi + bi
            kv_off += fj + bj
        return RingBlock(
            source=j,
            causal=(j == i),
            q_index=_gather_index(q_rows, q_off, device),
            kv_index=_gather_index(kv_rows, kv_off, device),
            cu_q=_cumsum([n for _, n in q_rows], device),
            cu_k=_cumsum([n for _, n in kv_rows], device),
            max_q=max((n for _, n in q_rows), default=0),
            max_k=max((n for _, n in kv_rows), default=0),
        )

    # ------------------------------------------------ windowed and chunked layers (hf_hdp.planning.reach)
    def layer_mask(self, mask: LayerMask) -> LayerMask:
        """``mask`` without the parts this segment's documents are too short to feel (a full mask: the relay ring)."""
        return mask.for_length(max(self.doc_lengths(), default=0))

    def reach_send(self, step: int, mask: LayerMask, device: torch.device) -> torch.Tensor | None:
        """The rows of ours that member ``member + step`` needs under ``mask`` (``None``: none, nothing is sent)."""
        key = ("send", step, mask, str(device))
        if key not in self._blocks:
            rows = needed_rows(self.layout, (self.member + step) % self.k, self.member, mask)
            self._blocks[key] = _gather_index(list((a, b - a) for a, b in rows), -1, device) if rows else None
        return self._blocks[key]

    def reach_recv(self, step: int, mask: LayerMask) -> int:
        """How many rows of member ``member - step`` we need under ``mask`` (0: nothing is received)."""
        key = ("recv", step, mask)
        if key not in self._blocks:
            self._blocks[key] = needed_count(self.layout, self.member, self.source_at(step), mask)
        return self._blocks[key]

    def reach_blocks(self, step: int, mask: LayerMask, device: torch.device) -> list[RingBlock]:
        """The blocks our rows compute with the K/V of member ``member - step`` under ``mask``.

        Step 0 uses our own rows; any other step the compact buffer of the rows :meth:`reach_recv` counts, in
        their order. Each block holds the pairs of one chunk of the source (front, then back), so no query row
        repeats within a block and a block merges like the relay ring's; pairs carry their positions.
        """
        key = ("reach", step, mask, str(device))
        if key not in self._blocks:
            self._blocks[key] = self._make_reach_blocks(step, mask, device)
        return self._blocks[key]

    def _make_reach_blocks(self, step: int, mask: LayerMask, device: torch.device) -> list[RingBlock]:
        j = self.source_at(step)
        pairs = member_pairs(self.layout, self.member, j, mask)
        if step == 0:
            compact = None
        else:  # source row -> row of the received buffer
            compact, at = {}, 0
            for a, b in needed_rows(self.layout, self.member, j, mask):
                compact[a] = at
                at += b - a
        blocks = []
        for chunk in (0, 1):
            mine = [p for p in pairs if p.k_chunk == chunk]
            if not mine:
                continue
            q_rows = [(p.q_row, p.q_len) for p in mine]
            kv_rows = [(p.k_row if compact is None else _compact_row(compact, p.k_row), p.k_len) for p in mine]
            blocks.append(
                RingBlock(
                    source=j,
                    causal=True,
                    q_index=_gather_index(q_rows, -1, device),
                    kv_index=_gather_index(kv_rows, -1, device),
                    cu_q=_cumsum([p.q_len for p in mine], device),
                    cu_k=_cumsum([p.k_len for p in mine], device),
                    max_q=max(p.q_len for p in mine),
                    max_k=max(p.k_len for p in mine),
                    positions=tuple((p.q_pos, p.k_pos) for p in mine),
                )
            )
        return blocks


def _compact_row(compact: dict[int, int], row: int) -> int:
    """A source row's place in the compact buffer of its needed ranges (``compact``: range start -> offset)."""
    start = max(a for a in compact if a <= row)
    return compact[start] + row - start


@dataclass
class UlyssesSegment:
    """The rows of a micro-batch that run head-parallel attention (Ulysses degree ``ulysses``) over one group.

    ``group`` in member order: member ``m`` is sub-member ``m % u`` of ring position ``m // u``
    (:mod:`hf_hdp.planning.layout`). ``shards[j][d]``: the rows of document ``d`` that sub-member ``j`` of
    this member's position holds; this member's rows are, per document in order, its own ``shards``.
    ``ring``: the ring over the positions that this member runs for its slice of the heads, after the
    all-to-all; its rows per document are the position's whole rows, front chunk then back chunk.
    """

    start: int
    end: int
    group: tuple[int, ...]
    member: int
    ulysses: int
    samples: tuple[int, ...]
    shards: tuple[tuple[int, ...], ...]
    ring: RingSegment
    slot: int = 0
    step: int = 0
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def k(self) -> int:
        return len(self.group)

    @property
    def sub_member(self) -> int:
        return self.member % self.ulysses

    @property
    def subgroup(self) -> tuple[int, ...]:
        """The ranks of this member's position, in sub-member order (the all-to-alls' group)."""
        p = self.member // self.ulysses
        return self.group[p * self.ulysses : (p + 1) * self.ulysses]

    def rows_from(self, j: int) -> int:
        """Rows sub-member ``j`` holds in this segment."""
        return sum(self.shards[j])

    def doc_lengths(self) -> tuple[int, ...]:
        return self.ring.doc_lengths()

    def rows_per_doc(self) -> tuple[int, ...]:
        return tuple(self.shards[self.sub_member])

    def position_index(self, device: torch.device) -> torch.Tensor | None:
        """Rows received from the sub-members (sub-member 0's rows of every document, then 1's, ...) to the
        position's row order (per document, sub-member 0's slice, then 1's, ...); ``None`` when equal."""
        key = ("gather", str(device))
        if key not in self._index:
            u, docs = self.ulysses, len(self.samples)
            offset = [[0] * docs for _ in range(u)]
            at = 0
            for j in range(u):
                for d in range(docs):
                    offset[j][d] = at
                    at += self.shards[j][d]
            rows = [(offset[j][d], self.shards[j][d]) for d in range(docs) for j in range(u)]
            self._index[key] = _gather_index(rows, at, device)
        return self._index[key]

    def concat_index(self, device: torch.device) -> torch.Tensor | None:
        """The inverse of :meth:`position_index`: position rows back to received order."""
        key = ("scatter", str(device))
        if key not in self._index:
            gather = self.position_index(device)
            if gather is None:
                self._index[key] = None
            else:
                inverse = torch.empty_like(gather)
                inverse[gather] = torch.arange(gather.numel(), device=device)
                self._index[key] = inverse
        return self._index[key]


def _cumsum(lengths: list[int], device: torch.device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _gather_index(rows: list[tuple[int, int]], total: int, device: torch.device) -> torch.Tensor | None:
    """Row indices selecting ``rows``; ``None`` when they are exactly ``0..total-1`` in order."""
    idx = [r for a, n in rows for r in range(a, a + n)]
    if len(idx) == total and idx == list(range(total)):
        return None
    return torch.tensor(idx, dtype=torch.long, device=device)


class RingComm(Protocol):
    """What ring attention needs from the mesh (:class:`hf_hdp.distributed.mesh.DynamicMesh` is one)."""

    rank: int

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, what: str = "") -> list: ...

    def wait(self, handles: list) -> None: ...


@dataclass
class AttentionRuntime:
    """What the runner supplies when a micro-batch runs (the collator builds everything else): the mesh
    carrying the ring's P2P, the kernel backend's name, and a count of attention calls (a forward that
    never called the ``"hdp"`` attention ignored the packing, and is refused)."""

    mesh: RingComm | None = None
    backend: str = "auto"
    calls: int = 0


@dataclass
class HDPAttentionMetadata:
    """Everything the ``"hdp"`` attention needs for one micro-batch, passed to the model as the
    ``hdp_metadata`` keyword (it travels through ``TransformersKwargs`` to every attention layer)."""

    num_tokens: int
    local_len: int
    local_seqlens: tuple[int, ...]
    rings: tuple[RingSegment | UlyssesSegment, ...]
    rank: int = 0
    slot: int = 0
    step: int = 0
    local_samples: tuple[int, ...] = ()
    placeholder: bool = False  # a micro-batch without work (HDPCollator.placeholder): no real token
    runtime: AttentionRuntime = field(default_factory=AttentionRuntime)
    _cache: dict = field(default_factory=dict, repr=False)  # per micro-batch: cu_seqlens per device, max_seqlen

    def bind(self, mesh: RingComm | None, backend: str = "auto") -> HDPAttentionMetadata:
        """Attach the run-time context (mesh and backend) before the micro-batch's forward; returns ``self``."""
        self.runtime = AttentionRuntime(mesh=mesh, backend=backend)
        return self

    @property
    def attention_calls(self) -> int:
        return self.runtime.calls

    def local_cu_seqlens(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = _cumsum(list(self.local_seqlens), device)
        return self._cache[key]

    @property
    def local_max_seqlen(self) -> int:
        return max(self.local_seqlens, default=0)

    @property
    def max_seqlen(self) -> int:
        """The longest whole sequence this micro-batch touches (which windows and chunks can restrict; every
        layer asks: computed once)."""
        if "max_seqlen" not in self._cache:
            docs = (n for seg in self.rings for n in seg.doc_lengths())
            self._cache["max_seqlen"] = max((self.local_max_seqlen, *docs))
        return self._cache["max_seqlen"]

    def describe(self) -> str:
        return f"rank {self.rank}, step {self.step}, slot {self.slot}"
