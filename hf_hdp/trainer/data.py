"""Step-level data loading for HDP: global batches, plans, and only this rank's samples.

One item of the training DataLoader is one optimizer step for this rank:

1. :class:`GlobalBatchSampler` draws the global batch: dataset rows, in a seeded order that depends
   on the epoch and the seed only, never on the world size (so 1 rank and N ranks see the same
   batches).
2. :class:`HDPStepDataset` looks up the rows' lengths (a column: no tokens move to plan), runs the
   planner (identical on every rank), loads only the rows this rank's pieces name, and packs each
   of its micro-batches with the :class:`~hf_hdp.collators.HDPCollator`.

The sampler runs in the main process and the dataset in DataLoader workers, so planning and
loading overlap with training when ``dataloader_num_workers > 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..collators.hdp_collator import IGNORE_INDEX, HDPCollator, HDPDataError
from ..planning import StepPlan

LOSS_TOKENS_COLUMN = "hdp_loss_tokens"


@dataclass
class HDPStep:
    """What one rank needs for one optimizer step."""

    epoch: int
    step: int
    plan: StepPlan
    fingerprint: int
    rows: list[int]  # dataset index of each sample position of the global batch
    micro_batches: list[dict]  # this rank's packed micro-batches, in slot order
    num_loss_tokens: int  # label tokens of the whole global batch, over all ranks
    num_tokens: int  # tokens of the whole global batch
    local_tokens: int = 0


def _measure(batch: dict, indices: list[int], length_column: str, has_length: bool) -> dict:
    lengths, loss_tokens = [], []
    labels_col = batch.get("labels")
    for n, (row, ids) in enumerate(zip(indices, batch["input_ids"])):
        if ids is None or isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise HDPDataError(f"sample {row}: `input_ids` is {type(ids).__name__}, not a list of token ids.")
        labels = labels_col[n] if labels_col is not None else None
        if labels is not None and len(labels) != len(ids):
            raise HDPDataError(
                f"sample {row}: `labels` has {len(labels)} entries but `input_ids` has {len(ids)}. Labels must align "
                "with input_ids token for token (use -100 for tokens without loss); HDP shifts them itself."
            )
        if has_length and int(batch[length_column][n]) != len(ids):
            raise HDPDataError(
                f"sample {row}: the `{length_column}` column says {batch[length_column][n]} but `input_ids` has "
                f"{len(ids)} tokens. Drop the column and let HDPTrainer compute it."
            )
        lengths.append(len(ids))
        if labels is None:
            loss_tokens.append(max(len(ids) - 1, 0))
        else:
            loss_tokens.append(sum(1 for t in list(labels)[1:] if t != IGNORE_INDEX))
    out = {LOSS_TOKENS_COLUMN: loss_tokens}
    if not has_length:
        out[length_column] = lengths
    return out


def measure_dataset(dataset, length_column: str = "length", num_proc: int | None = None):
    """Add the length and loss-token columns (cached by ``datasets``); return ``(dataset, lengths, loss_tokens)``."""
    if "input_ids" not in dataset.column_names:
        raise HDPDataError(
            f"the training dataset has no `input_ids` column (columns: {dataset.column_names}). "
            "HDPTrainer trains on tokenized data: map the dataset through the tokenizer first."
        )
    has_length = length_column in dataset.column_names
    if not has_length or LOSS_TOKENS_COLUMN not in dataset.column_names:
        dataset = dataset.map(
            _measure,
            batched=True,
            with_indices=True,
            num_proc=num_proc,
            fn_kwargs={"length_column": length_column, "has_length": has_length},
            desc="hf_hdp: measuring sample lengths",
        )
    columns = dataset.with_format("numpy", columns=[length_column, LOSS_TOKENS_COLUMN])
    lengths = np.asarray(columns[length_column], dtype=np.int64)
    loss_tokens = np.asarray(columns[LOSS_TOKENS_COLUMN], dtype=np.int64)
    return dataset, lengths, loss_tokens


def check_lengths(lengths: np.ndarray, world_size: int, tokens_per_rank: int) -> None:
    """Refuse samples no plan can hold, before training starts."""
    empty = np.flatnonzero(lengths <= 0)
    if empty.size:
        raise HDPDataError(
            f"sample {int(empty[0])} is empty (0 tokens){f' and {empty.size - 1} more' if empty.size > 1 else ''}. "
            "Filter empty samples out, e.g. ds.filter(lambda s: len(s['input_ids']) > 0)."
        )
    limit = world_size * tokens_per_rank
    too_long = np.flatnonzero(lengths > limit)
    if too_long.size:
        i = int(too_long[0])
        raise HDPDataError(
            f"sample {i} has {int(lengths[i])} tokens, more than world_size x tokens_per_rank = {world_size} x "
            f"{tokens_per_rank} = {limit}{f' ({too_long.size - 1} more samples too)' if too_long.size > 1 else ''}. "
            f"Raise tokens_per_rank to at least {-(-int(lengths.max()) // world_size)}, use more ranks, or filter "
            "the long samples out; HDP never truncates silently."
        )


class GlobalBatchSampler:
    """Yields ``[(epoch, step)]``, one key per optimizer step, as a batch sampler; the global batch of a
    key depends only on seed, epoch and step.

    Being a batch sampler of one-key batches lets accelerate's ``skip_first_batches`` (used by Trainer
    when resuming mid-epoch) skip steps without planning or loading them, and lets Trainer reach
    ``set_epoch`` through its wrapper.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if num_samples < 1:
            raise ValueError("the training dataset is empty")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return max(self.num_samples // self.global_batch_size, 0)
        return -(-self.num_samples // self.global_batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def batch_rows(self, epoch: int, step: int) -> list[int]:
        order = self.order(epoch)
        g = self.global_batch_size
        return [int(i) for i in order[step * g : (step + 1) * g]]

    def __iter__(self):
        for step in range(len(self)):
            yield [(self.epoch, step)]


class HDPStepDataset(Dataset):
    """Maps ``(epoch, step)`` to this rank's :class:`HDPStep`."""

    def __init__(self, dataset, lengths: np.ndarray, loss_tokens: np.ndarray, sampler: GlobalBatchSampler,
                 planner: Callable[..., StepPlan], world_size: int, rank: int, tokens_per_rank: int,
                 collator: HDPCollator):
        keep = [c for c in ("input_ids", "labels") if c in dataset.column_names]
        self.dataset = dataset.select_columns(keep)
        self.lengths = lengths
        self.loss_tokens = loss_tokens
        self.sampler = sampler
        self.planner = planner
        self.world_size = world_size
        self.rank = rank
        self.tokens_per_rank = tokens_per_rank
        self.collator = collator

    def __len__(self) -> int:
        return len(self.sampler)

    def plan(self, epoch: int, step: int) -> tuple[list[int], StepPlan]:
        rows = self.sampler.batch_rows(epoch, step)
        plan = self.planner([int(self.lengths[r]) for r in rows], self.world_size, self.tokens_per_rank)
        return rows, plan

    def __getitem__(self, key) -> HDPStep:
        epoch, step = key
        rows, plan = self.plan(epoch, step)
        mine = plan.for_rank(self.rank)
        needed = sorted({p.sample for mb in mine for p in mb.pieces})
        loaded = self.dataset[[rows[s] for s in needed]] if needed else {}
        samples = {
            s: {col: loaded[col][n] for col in loaded} for n, s in enumerate(needed)
        }
        row_of = {s: rows[s] for s in range(len(rows))}
        micro = [self.collator(mb, samples, rows=row_of, step=step) for mb in mine]
        return HDPStep(
            epoch=epoch,
            step=step,
            plan=plan,
            fingerprint=plan.fingerprint(),
            rows=rows,
            micro_batches=micro,
            num_loss_tokens=int(sum(int(self.loss_tokens[r]) for r in rows)),
            num_tokens=int(sum(int(self.lengths[r]) for r in rows)),
            local_tokens=sum(int(m["input_ids"].shape[1]) for m in micro),
        )


def _as_inputs(steps: list[HDPStep]) -> dict:
    # one step per batch; the Trainer's loop looks into its inputs like a mapping
    (step,) = steps
    return {"hdp_step": step}


class HDPDataLoader(DataLoader):
    """A DataLoader of ``{"hdp_step": HDPStep}`` items, one per optimizer step, with ``set_epoch``."""

    def __init__(self, step_dataset: HDPStepDataset, num_workers: int = 0, **kwargs):
        super().__init__(
            step_dataset,
            batch_sampler=step_dataset.sampler,
            collate_fn=_as_inputs,
            num_workers=num_workers,
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def move_to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
