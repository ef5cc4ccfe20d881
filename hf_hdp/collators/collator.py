"""The length-aware collator: packs one rank's micro-batch padding-free, with HDP attention metadata.

For a micro-batch of the step plan and the documents it names (see :mod:`hf_hdp.collators.documents`), it builds

- ``input_ids``, ``position_ids``, ``labels``: ``[1, T]`` with no padding;
- ``hdp_metadata``: an :class:`~hf_hdp.attention.metadata.HDPAttentionMetadata`.

Three rules keep the result exactly equal to training each sample alone:

1. ``position_ids`` are positions within each *whole* sequence, so a shard in the middle of a long
   sample gets the positions it has there and RoPE rotates it correctly.
2. Labels are shifted *before* sharding: token ``t`` is trained to predict ``labels[t + 1]`` of the
   same sample, and the last token of every sample gets ``-100``. A label never crosses into the
   next sequence, and a shard boundary never loses a target. The model is therefore called without
   ``labels`` and the loss is computed from these already-shifted targets.
3. Tokens are only moved, never dropped or padded: every token of the micro-batch's pieces appears
   once.

Bad samples raise :class:`HDPDataError` naming the dataset row, the value and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..attention.metadata import HDPAttentionMetadata, RingSegment, UlyssesSegment
from ..planning import MicroBatch
from ..planning.layout import even_split, head_rings, zigzag_front_back
from .documents import IGNORE_INDEX, HDPDataError, check_sample, shifted_targets


def segment_for(
    lengths,
    group: tuple[int, ...],
    ulysses: int,
    rank: int,
    start: int,
    end: int,
    samples: tuple,
    slot: int = 0,
    step: int = 0,
) -> RingSegment | UlyssesSegment:
    """The attention segment of ``rank`` for documents of ``lengths`` that share ``group`` and Ulysses degree
    ``ulysses``, held in rows ``[start, end)`` of its micro-batch (laid out as
    :func:`~hf_hdp.planning.layout.hybrid_token_ranges` says, document after document)."""
    member = group.index(rank)
    if ulysses == 1:
        layout = tuple(tuple(zigzag_front_back(s, len(group))[m] for s in lengths) for m in range(len(group)))
        return RingSegment(
            start=start, end=end, group=group, member=member, samples=samples, layout=layout, slot=slot, step=step
        )
    r = len(group) // ulysses
    p, j = divmod(member, ulysses)
    positions = tuple(tuple(zigzag_front_back(s, r)[q] for s in lengths) for q in range(r))
    ring = RingSegment(
        start=0,
        end=sum(f + b for f, b in positions[p]),
        group=head_rings(group, ulysses)[j],
        member=p,
        samples=samples,
        layout=positions,
        slot=slot,
        step=step,
    )
    shards = tuple(tuple(even_split(f + b, ulysses)[i] for f, b in positions[p]) for i in range(ulysses))
    return UlyssesSegment(
        start=start,
        end=end,
        group=group,
        member=member,
        ulysses=ulysses,
        samples=samples,
        shards=shards,
        ring=ring,
        slot=slot,
        step=step,
    )


def piece_order(mb: MicroBatch) -> tuple[list, list[tuple[tuple[int, ...], int, list]]]:
    """The order :class:`HDPCollator` packs ``mb``'s pieces in: ``(local, groups)``, the whole local samples by
    sample id, then the distributed pieces as ``(group, ulysses, pieces)``, grouped by their ranks and head split,
    each group's pieces by sample id and the groups by their first sample id."""
    local = sorted((p for p in mb.pieces if not p.distributed), key=lambda p: p.sample)
    by_group: dict[tuple[tuple[int, ...], int], list] = {}
    for p in sorted((p for p in mb.pieces if p.distributed), key=lambda p: p.sample):
        by_group.setdefault((p.group, p.ulysses), []).append(p)
    ordered = sorted(by_group.items(), key=lambda kv: kv[1][0].sample)
    return local, [(group, ulysses, pieces) for (group, ulysses), pieces in ordered]


def packed_ranges(mb: MicroBatch) -> list[tuple[int, int, int]]:
    """``(sample, start, end)`` of every run of tokens in ``mb``'s packed row, in row order (:func:`piece_order`):
    which sample's tokens each packed position holds, for callers that lay per-token values beside the row."""
    local, groups = piece_order(mb)
    ranges = [(p.sample, 0, p.length) for p in local]
    for _, _, pieces in groups:
        for p in pieces:
            ranges.extend((p.sample, a, b) for a, b in p.token_ranges(mb.rank))
    return ranges


class HDPCollator:
    """Packs micro-batches of a :class:`~hf_hdp.planning.StepPlan` for one rank."""

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size

    def __call__(
        self, mb: MicroBatch, samples: Mapping[int, Mapping], rows: Mapping[int, object] | None = None, step: int = 0
    ) -> dict:
        """Pack ``mb``. ``samples`` maps each sample position of the plan to its row
        (``input_ids`` and optional ``labels``); ``rows`` maps positions to dataset indices for error messages."""
        if not mb.pieces:
            return self.placeholder(mb.rank, mb.slot, step)
        rows = rows or {}
        ids_parts: list[list[int]] = []
        pos_parts: list[range] = []
        tgt_parts: list[list[int]] = []
        local_lens: list[int] = []
        local_samples: list[int] = []

        def load(p):
            row = rows.get(p.sample, p.sample)
            ids, labels = check_sample(row, samples[p.sample], self.vocab_size)
            if len(ids) != p.length:
                raise HDPDataError(
                    f"sample {row} has {len(ids)} tokens but its length column says {p.length}. "
                    "Recompute the `length` column (or drop it and let HDPTrainer compute it)."
                )
            return ids, shifted_targets(ids, labels)

        local, groups = piece_order(mb)
        for p in local:
            ids, tgt = load(p)
            ids_parts.append(ids)
            pos_parts.append(range(len(ids)))
            tgt_parts.append(tgt)
            local_lens.append(len(ids))
            local_samples.append(p.sample)
        local_len = sum(local_lens)

        segments = []
        cursor = local_len
        for group, ulysses, pieces in groups:
            start = cursor
            for p in pieces:
                ids, tgt = load(p)
                for a, b in p.token_ranges(mb.rank):
                    ids_parts.append(ids[a:b])
                    pos_parts.append(range(a, b))
                    tgt_parts.append(tgt[a:b])
                    cursor += b - a
            names = tuple(rows.get(p.sample, p.sample) for p in pieces)
            segments.append(
                segment_for([p.length for p in pieces], group, ulysses, mb.rank, start, cursor, names, mb.slot, step)
            )

        def flat(parts):
            return torch.tensor([t for part in parts for t in part], dtype=torch.long).unsqueeze(0)

        meta = HDPAttentionMetadata(
            num_tokens=cursor,
            local_len=local_len,
            local_seqlens=tuple(local_lens),
            rings=tuple(segments),
            rank=mb.rank,
            slot=mb.slot,
            step=step,
            local_samples=tuple(rows.get(s, s) for s in local_samples),
        )
        return {
            "input_ids": flat(ids_parts),
            "position_ids": flat(pos_parts),
            "labels": flat(tgt_parts),
            "hdp_metadata": meta,
        }

    @staticmethod
    def placeholder(rank: int, slot: int, step: int = 0) -> dict:
        """A micro-batch without work: one token (id 0, position 0) and no label, so its loss and every
        gradient it adds are exactly zero. A rank runs it where the others run FSDP's per-layer
        collectives and it has nothing of its own (an empty micro-batch of a lockstep plan; ZeRO-2
        mode's final reduce-scatter): its forward and backward join them layer by layer. It is not
        counted as a real token anywhere (its metadata's ``placeholder``)."""
        meta = HDPAttentionMetadata(
            num_tokens=1,
            local_len=1,
            local_seqlens=(1,),
            rings=(),
            rank=rank,
            slot=slot,
            step=step,
            local_samples=("placeholder",),
            placeholder=True,
        )
        return {
            "input_ids": torch.zeros(1, 1, dtype=torch.long),
            "position_ids": torch.zeros(1, 1, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "hdp_metadata": meta,
        }
