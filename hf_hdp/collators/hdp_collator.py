"""The length-aware collator: packs one rank's micro-batch padding-free, with HDP attention metadata.

For a micro-batch of the step plan and the samples it names, it builds

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

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..attention.metadata import HDPAttentionMetadata, RingSegment
from ..planning import MicroBatch
from ..planning.layout import zigzag_front_back

IGNORE_INDEX = -100


class HDPDataError(ValueError):
    """A training sample cannot be trained on as given."""


def _as_token_list(value, row, column: str) -> list[int]:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        floating = value.is_floating_point() or value.is_complex() if isinstance(value, torch.Tensor) else (
            not np.issubdtype(value.dtype, np.integer))
        if value.ndim != 1 or floating:
            raise HDPDataError(
                f"sample {row}: `{column}` must be a flat sequence of integers, got a {value.dtype} array of "
                f"shape {tuple(value.shape)}. Tokenize to a list of token ids per sample."
            )
        return value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise HDPDataError(
            f"sample {row}: `{column}` must be a list of token ids, got {type(value).__name__}. "
            "Tokenize the text first (e.g. with datasets.map and the model's tokenizer)."
        )
    out = list(value)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise HDPDataError(
                f"sample {row}: `{column}` must hold integer token ids, found {t!r} ({type(t).__name__}). "
                "Nested, float or missing token ids are not samples: flatten the lists or cast the column to int."
            )
    return [int(t) for t in out]


def check_sample(row, sample: Mapping, vocab_size: int | None = None) -> tuple[list[int], list[int] | None]:
    """Validate one dataset row; return its ``input_ids`` and ``labels`` (or ``None``) as lists."""
    if "input_ids" not in sample:
        raise HDPDataError(
            f"sample {row} has no `input_ids` (columns: {sorted(sample)}). HDPTrainer trains on tokenized data: "
            "map the dataset through the tokenizer first."
        )
    ids = _as_token_list(sample["input_ids"], row, "input_ids")
    if not ids:
        raise HDPDataError(f"sample {row} is empty (0 tokens). Filter empty samples out, e.g. ds.filter(lambda s: len(s['input_ids']) > 0).")
    if vocab_size is not None:
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise HDPDataError(
                f"sample {row}: token id {hi if hi >= vocab_size else lo} is outside the model's vocabulary "
                f"[0, {vocab_size}). Tokenize with the model's own tokenizer, or resize the embeddings."
            )
    labels = sample.get("labels")
    if labels is not None:
        labels = _as_token_list(labels, row, "labels")
        if len(labels) != len(ids):
            raise HDPDataError(
                f"sample {row}: `labels` has {len(labels)} entries but `input_ids` has {len(ids)}. "
                "Labels must align with input_ids token for token (use -100 for tokens without loss); "
                "HDP shifts them itself."
            )
        if vocab_size is not None:
            bad = next((t for t in labels if t != IGNORE_INDEX and (t < 0 or t >= vocab_size)), None)
            if bad is not None:
                raise HDPDataError(
                    f"sample {row}: label id {bad} is outside the model's vocabulary [0, {vocab_size}) and is not "
                    f"{IGNORE_INDEX}. Labels hold target token ids, or {IGNORE_INDEX} for tokens without loss."
                )
    return ids, labels


def shifted_targets(ids: list[int], labels: list[int] | None) -> list[int]:
    """Targets aligned with the inputs: position ``t`` predicts ``labels[t + 1]``; the last gets -100."""
    source = labels if labels is not None else ids
    return list(source[1:]) + [IGNORE_INDEX]


def count_loss_tokens(ids: list[int], labels: list[int] | None) -> int:
    """Label tokens a sample contributes to the loss (after the shift)."""
    if labels is None:
        return max(len(ids) - 1, 0)
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


class HDPCollator:
    """Packs micro-batches of a :class:`~hf_hdp.planning.StepPlan` for one rank."""

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size

    def __call__(self, mb: MicroBatch, samples: Mapping[int, Mapping], rows: Mapping[int, object] | None = None,
                 step: int = 0) -> dict:
        """Pack ``mb``. ``samples`` maps each sample position of the plan to its row
        (``input_ids`` and optional ``labels``); ``rows`` maps positions to dataset indices for error messages."""
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

        local = [p for p in mb.pieces if not p.distributed]
        distributed = [p for p in mb.pieces if p.distributed]
        for p in sorted(local, key=lambda p: p.sample):
            ids, tgt = load(p)
            ids_parts.append(ids)
            pos_parts.append(range(len(ids)))
            tgt_parts.append(tgt)
            local_lens.append(len(ids))
            local_samples.append(p.sample)
        local_len = sum(local_lens)

        by_group: dict[tuple[int, ...], list] = {}
        for p in sorted(distributed, key=lambda p: p.sample):
            by_group.setdefault(p.group, []).append(p)
        segments = []
        cursor = local_len
        for group, pieces in sorted(by_group.items(), key=lambda kv: kv[1][0].sample):
            start = cursor
            for p in pieces:
                ids, tgt = load(p)
                for a, b in p.token_ranges(mb.rank):
                    ids_parts.append(ids[a:b])
                    pos_parts.append(range(a, b))
                    tgt_parts.append(tgt[a:b])
                    cursor += b - a
            layout = tuple(
                tuple(zigzag_front_back(p.length, len(group))[m] for p in pieces) for m in range(len(group))
            )
            segments.append(
                RingSegment(
                    start=start, end=cursor, group=group, member=group.index(mb.rank),
                    samples=tuple(rows.get(p.sample, p.sample) for p in pieces), layout=layout,
                    slot=mb.slot, step=step,
                )
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
