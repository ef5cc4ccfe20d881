"""The step plan: which rank runs which tokens of which sample, in which time slot.

A plan is plain data. It is made by a planner (pure Python, run identically on every rank),
serialised to JSON, hashed for the cross-rank consistency check, and read by the collator
(which tokens to load and pack) and the attention layer (who to exchange KV with).

Vocabulary
----------
- *sample*: a position ``0..B-1`` in the global batch (not a dataset index: the sampler maps
  positions to dataset rows).
- *piece*: one sample placed on a group of ``k`` ranks. With ``k == 1`` the rank holds the
  whole sequence and attention needs no communication. With ``k > 1`` the sequence is cut into
  ``2k`` zigzag chunks (see :mod:`hf_hdp.planning.layout`); member ``i`` of ``group`` holds
  chunks ``i`` and ``2k-1-i`` and runs ring attention with the other members. A piece may instead
  be *head-parallel*, of Ulysses degree ``u`` (``Piece.ulysses``, dividing ``k``): a zigzag ring over
  ``r = k / u`` positions, each a sub-group of ``u`` ranks that splits the attention heads with
  all-to-alls (:mod:`hf_hdp.attention.ulysses`). Its *split* is ``"ring"`` (``u = 1``), ``"ulysses"``
  (``u = k``) or ``"hybrid"``; the layout is :func:`~hf_hdp.planning.layout.hybrid_token_ranges`.
- *micro-batch*: what one rank runs in one forward/backward: the pieces it holds in one slot,
  at most ``tokens_per_rank`` tokens in all.
- *slot*: a time index. All members of a piece's group hold it in the same slot, and every rank
  runs its micro-batches in increasing slot order; together with a fixed order of ring segments
  inside a micro-batch this makes every placement deadlock-free. A rank may have no
  micro-batch in a slot.
- *lockstep plan* (:func:`lockstep`): every rank holds a micro-batch in every slot, an *empty* one
  (no piece: a placeholder the rank runs as a one-token forward and backward without a label) where
  it has no work. FSDP's ZeRO-3 mode needs it: its per-layer collectives make every slot a barrier
  of all ranks (:mod:`hf_hdp.engine.fsdp`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .layout import check_degree, hybrid_member_sizes, hybrid_token_ranges
from .splits import split_kind


class PlanError(ValueError):
    """A plan breaks one of the invariants of docs/design.md §7."""


@dataclass(frozen=True)
class Piece:
    """One sample placed on an ordered group of ranks.

    With ``ulysses == 1`` (a ring), ``group[i]`` holds zigzag chunks ``i`` and ``2k-1-i`` of the
    sequence, where ``k = len(group)``. For ``k == 1`` the single member holds the whole sequence.
    With ``ulysses = u > 1``, ``group[p*u + j]`` is sub-member ``j`` of ring position ``p`` (see the
    module docstring).
    """

    sample: int
    length: int
    group: tuple[int, ...]
    ulysses: int = 1

    @property
    def split(self) -> str:
        """``"local"`` (one rank), ``"ring"``, ``"ulysses"`` (heads only) or ``"hybrid"`` (heads x ring):
        :func:`~hf_hdp.planning.splits.split_kind`."""
        return split_kind(len(self.group), self.ulysses)

    @property
    def k(self) -> int:
        return len(self.group)

    @property
    def distributed(self) -> bool:
        return len(self.group) > 1

    def member(self, rank: int) -> int:
        """This rank's place in the group."""
        try:
            return self.group.index(rank)
        except ValueError:
            raise PlanError(f"rank {rank} is not a member of the group {self.group} of sample {self.sample}") from None

    def tokens_on(self, rank: int) -> int:
        """How many of the sequence's tokens ``rank`` holds."""
        return hybrid_member_sizes(self.length, self.k, self.ulysses)[self.member(rank)]

    def token_ranges(self, rank: int) -> list[tuple[int, int]]:
        """The ``[start, end)`` token ranges of the sequence that ``rank`` holds, in row order."""
        return hybrid_token_ranges(self.length, self.k, self.member(rank), self.ulysses)

    def to_dict(self) -> dict:
        d = {"sample": self.sample, "length": self.length, "group": list(self.group)}
        if self.ulysses != 1:  # a ring's dict (and so every ring plan's fingerprint) is unchanged
            d["ulysses"] = self.ulysses
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Piece:
        return cls(
            sample=int(d["sample"]),
            length=int(d["length"]),
            group=tuple(int(r) for r in d["group"]),
            ulysses=int(d.get("ulysses", 1)),
        )


@dataclass(frozen=True)
class MicroBatch:
    """The pieces ``rank`` runs in ``slot``: one forward and one backward pass."""

    rank: int
    slot: int
    pieces: tuple[Piece, ...]

    @property
    def num_tokens(self) -> int:
        return sum(p.tokens_on(self.rank) for p in self.pieces)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "slot": self.slot, "pieces": [p.to_dict() for p in self.pieces]}

    @classmethod
    def from_dict(cls, d: dict) -> MicroBatch:
        return cls(rank=int(d["rank"]), slot=int(d["slot"]), pieces=tuple(Piece.from_dict(p) for p in d["pieces"]))


@dataclass(frozen=True)
class StepPlan:
    """Every rank's micro-batches for one optimizer step.

    ``micro_batches`` is sorted by ``(slot, rank)``; no two share a ``(slot, rank)``.
    """

    world_size: int
    tokens_per_rank: int
    lengths: tuple[int, ...]
    micro_batches: tuple[MicroBatch, ...]
    planner: str = "unknown"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    # ----------------------------------------------------------------- queries
    @property
    def is_lockstep(self) -> bool:
        """Every rank holds a micro-batch (possibly an empty placeholder) in every slot."""
        return len(self.micro_batches) == self.num_slots * self.world_size

    @property
    def num_slots(self) -> int:
        return 1 + max((mb.slot for mb in self.micro_batches), default=-1)

    def for_rank(self, rank: int) -> list[MicroBatch]:
        """``rank``'s micro-batches in slot order (possibly none)."""
        return [mb for mb in self.micro_batches if mb.rank == rank]

    def pieces(self) -> list[Piece]:
        """Every distinct piece of the plan, in sample order."""
        seen: dict[int, Piece] = {}
        for mb in self.micro_batches:
            for p in mb.pieces:
                seen.setdefault(p.sample, p)
        return [seen[s] for s in sorted(seen)]

    def splits(self) -> dict[str, int]:
        """How many samples each split kind holds (``"local"``, ``"ring"``, ``"ulysses"``, ``"hybrid"``)."""
        out: dict[str, int] = {}
        for p in self.pieces():
            out[p.split] = out.get(p.split, 0) + 1
        return out

    def group_sizes(self) -> dict[int, int]:
        """How many samples were placed on a group of each size ``k``."""
        sizes: dict[int, int] = {}
        for p in self.pieces():
            sizes[p.k] = sizes.get(p.k, 0) + 1
        return dict(sorted(sizes.items()))

    # ------------------------------------------------------------ validation
    def validate(self, num_heads: int | None = None) -> StepPlan:
        """Check the invariants of docs/design.md §7; raise :class:`PlanError` naming the first broken one.

        ``num_heads`` (the model's query heads; the trainer passes it before any P2P): every
        head-parallel piece's Ulysses degree must divide it."""
        W, C = self.world_size, self.tokens_per_rank
        if W < 1 or C < 1:
            raise PlanError(f"world_size ({W}) and tokens_per_rank ({C}) must be at least 1")
        seen_slots: set[tuple[int, int]] = set()
        # piece identity: the same sample must appear as the same Piece in every member's micro-batch
        placed: dict[int, tuple[Piece, int, set[int]]] = {}
        last = (-1, -1)
        for mb in self.micro_batches:
            if not 0 <= mb.rank < W:
                raise PlanError(f"micro-batch on rank {mb.rank} is outside the world of {W} ranks")
            if mb.slot < 0:
                raise PlanError(f"micro-batch on rank {mb.rank} has a negative slot {mb.slot}")
            if (mb.slot, mb.rank) <= last:
                raise PlanError("micro_batches must be sorted by (slot, rank) without repeats")
            last = (mb.slot, mb.rank)
            seen_slots.add((mb.slot, mb.rank))
            for p in mb.pieces:
                if p.ulysses != 1:
                    try:
                        check_degree(p.k, p.ulysses)
                    except ValueError:
                        raise PlanError(
                            f"sample {p.sample}: a Ulysses degree of {p.ulysses} does not divide its group of {p.k} "
                            "ranks; the group must be whole sub-groups of that degree"
                        ) from None
                    if num_heads is not None and num_heads % p.ulysses:
                        raise PlanError(
                            f"sample {p.sample}: a Ulysses degree of {p.ulysses} does not divide the model's "
                            f"{num_heads} query heads. Plan it with a degree that divides them (the planners "
                            "never make such a piece; attention_split='ring' avoids head parallelism)"
                        )
            if mb.num_tokens > C:
                raise PlanError(
                    f"rank {mb.rank} slot {mb.slot} holds {mb.num_tokens} tokens, more than tokens_per_rank={C}"
                )
            samples_here = [p.sample for p in mb.pieces]
            if len(set(samples_here)) != len(samples_here):
                raise PlanError(f"rank {mb.rank} slot {mb.slot} holds a sample twice: {samples_here}")
            for p in mb.pieces:
                if not 0 <= p.sample < len(self.lengths):
                    raise PlanError(f"piece names sample {p.sample}, outside the global batch of {len(self.lengths)}")
                if p.length != self.lengths[p.sample]:
                    raise PlanError(
                        f"sample {p.sample}: piece length {p.length} differs from the batch length {self.lengths[p.sample]}"
                    )
                if len(set(p.group)) != len(p.group) or not all(0 <= r < W for r in p.group):
                    raise PlanError(f"sample {p.sample}: group {p.group} repeats a rank or leaves the world")
                if mb.rank not in p.group:
                    raise PlanError(f"sample {p.sample} is on rank {mb.rank}, which is not in its group {p.group}")
                if p.sample in placed:
                    first, slot, members = placed[p.sample]
                    if first != p:
                        raise PlanError(f"sample {p.sample} is placed twice, as {first} and as {p}")
                    if slot != mb.slot:
                        raise PlanError(
                            f"sample {p.sample}: group members run it in different slots ({slot} and {mb.slot})"
                        )
                    members.add(mb.rank)
                else:
                    placed[p.sample] = (p, mb.slot, {mb.rank})
        for s, length in enumerate(self.lengths):
            if s not in placed:
                raise PlanError(f"sample {s} (length {length}) is not placed")
            p, slot, members = placed[s]
            if members != set(p.group):
                missing = sorted(set(p.group) - members)
                raise PlanError(f"sample {s}: group members {missing} do not hold it in slot {slot}")
        return self

    # --------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "tokens_per_rank": self.tokens_per_rank,
            "lengths": list(self.lengths),
            "planner": self.planner,
            "micro_batches": [mb.to_dict() for mb in self.micro_batches],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> StepPlan:
        return cls(
            world_size=int(d["world_size"]),
            tokens_per_rank=int(d["tokens_per_rank"]),
            lengths=tuple(int(x) for x in d["lengths"]),
            micro_batches=tuple(MicroBatch.from_dict(m) for m in d["micro_batches"]),
            planner=str(d.get("planner", "unknown")),
        )

    @classmethod
    def from_json(cls, text: str) -> StepPlan:
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> int:
        """A 63-bit hash of the plan, equal on every rank exactly when the plans are equal."""
        digest = hashlib.sha256(self.to_json(sort_keys=True, separators=(",", ":")).encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_plan(
    lengths: Iterable[int],
    world_size: int,
    tokens_per_rank: int,
    placements: Iterable[tuple[int, int, Iterable[Piece]]],
    planner: str,
    meta: dict | None = None,
) -> StepPlan:
    """Assemble a sorted :class:`StepPlan` from ``(rank, slot, pieces)`` triples; empty ones are dropped
    (:func:`lockstep` adds placeholders where a plan needs them).

    Pieces inside a micro-batch are ordered by sample, so that every member of a group sees the
    same order of ring segments.
    """
    mbs = [MicroBatch(rank=r, slot=s, pieces=tuple(sorted(ps, key=lambda p: p.sample))) for r, s, ps in placements]
    mbs = [mb for mb in mbs if mb.pieces]
    mbs.sort(key=lambda mb: (mb.slot, mb.rank))
    return StepPlan(
        world_size=world_size,
        tokens_per_rank=tokens_per_rank,
        lengths=tuple(int(x) for x in lengths),
        micro_batches=tuple(mbs),
        planner=planner,
        meta=dict(meta or {}),
    )


def lockstep(plan: StepPlan) -> StepPlan:
    """``plan`` with the same number of micro-batches on every rank: slots that no rank uses are
    dropped (the order of the others, and so every ring's shared slot, is kept), and every rank
    without a micro-batch in a slot gets an empty one there. ``meta["lockstep"]`` is set, which
    :func:`~hf_hdp.planning.metrics.plan_metrics` reads as "every slot is a barrier of all ranks"."""
    used = sorted({mb.slot for mb in plan.micro_batches})
    renumber = {slot: i for i, slot in enumerate(used)}
    held = {(renumber[mb.slot], mb.rank): mb.pieces for mb in plan.micro_batches}
    mbs = tuple(
        MicroBatch(rank=r, slot=s, pieces=held.get((s, r), ()))
        for s in range(len(used))
        for r in range(plan.world_size)
    )
    return StepPlan(
        world_size=plan.world_size,
        tokens_per_rank=plan.tokens_per_rank,
        lengths=plan.lengths,
        micro_batches=mbs,
        planner=plan.planner,
        meta={**plan.meta, "lockstep": True},
    )
