"""Step-level data loading for HDP: global batches, plans, and only this rank's samples.

One item of the training DataLoader is one optimizer step for this rank:

1. :class:`GlobalBatchSampler` draws the global batch: dataset rows, in a seeded order that depends
   on the epoch and the seed only, never on the world size (so 1 rank and N ranks see the same
   batches).
2. :class:`HDPStepDataset` expands the rows into their documents (a pre-packed row holds several),
   runs the planner on the documents' lengths (identical on every rank; no tokens move to plan),
   loads only the rows this rank's pieces name, turns them into documents again
   (:func:`~hf_hdp.collators.documents.row_documents`: the user's collator, padding, boundaries) and packs
   each of its micro-batches with the :class:`~hf_hdp.collators.collator.HDPCollator`.

The sampler runs in the main process and the dataset in DataLoader workers, so planning and
loading overlap with training when ``dataloader_num_workers > 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..collators.collator import HDPCollator
from ..collators.documents import HONOURED_COLUMNS, RowRules, row_documents
from ..planning import StepPlan
from .checks import SOURCE_ROW_COLUMN, MeasuredDataset


@dataclass
class HDPStep:
    """What one rank needs for one optimizer step."""

    epoch: int
    step: int
    plan: StepPlan
    fingerprint: int
    rows: list[int]  # dataset index of each row of the global batch
    micro_batches: list[dict]  # this rank's packed micro-batches, in slot order
    num_loss_tokens: int  # label tokens of the whole global batch, over all ranks
    num_tokens: int  # tokens of the whole global batch
    local_tokens: int = 0
    global_step: int = 0  # the optimizer step this is, counted from 1 over all epochs (for messages)


class GlobalBatchSampler:
    """Yields ``[(epoch, step)]``, one key per optimizer step, as a batch sampler; the global batch of a
    key depends only on seed, epoch and step.

    Being a batch sampler of one-key batches lets accelerate's ``skip_first_batches`` (used by Trainer
    when resuming mid-epoch) skip steps without planning or loading them, and lets Trainer reach
    ``set_epoch`` through its wrapper.
    """

    def __init__(
        self, num_samples: int, global_batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False
    ):
        if num_samples < 1:
            raise ValueError("the training dataset is empty")
        if drop_last and num_samples < global_batch_size:
            raise ValueError(
                f"TrainingArguments.dataloader_drop_last=True drops every global batch: the dataset has "
                f"{num_samples} samples, fewer than the global batch of {global_batch_size}, so no step would run. "
                f"Lower the global batch (HDPConfig.global_batch_size, or per_device_train_batch_size x "
                f"gradient_accumulation_steps x world_size) to at most {num_samples}, or set dataloader_drop_last=False."
            )
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
        return -(-self.num_samples // self.global_batch_size)  # noqa: PLE0303 - both counts are non-negative

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
    """Maps ``(epoch, step)`` to this rank's :class:`HDPStep`.

    ``lengths``/``loss_tokens`` are per row; ``doc_offsets``/``doc_lengths`` (see
    :class:`~hf_hdp.data.checks.MeasuredDataset`) split rows into documents, one per row when omitted.
    """

    def __init__(
        self,
        dataset,
        lengths: np.ndarray,
        loss_tokens: np.ndarray,
        sampler: GlobalBatchSampler,
        planner: Callable[..., StepPlan],
        world_size: int,
        rank: int,
        tokens_per_rank: int,
        collator: HDPCollator,
        doc_offsets: np.ndarray | None = None,
        doc_lengths: np.ndarray | None = None,
        rules: RowRules = RowRules(),
        num_heads: int | None = None,
    ):
        if rules.collator is not None:
            keep = [
                c
                for c in dataset.column_names
                if not c.startswith("hdp_") and (rules.collator_columns is None or c in rules.collator_columns)
            ]
        else:
            keep = [c for c in HONOURED_COLUMNS if c in dataset.column_names]
        if SOURCE_ROW_COLUMN in dataset.column_names:
            keep.append(SOURCE_ROW_COLUMN)
        self.dataset = dataset.select_columns(keep)
        self.lengths = lengths
        self.loss_tokens = loss_tokens
        self.doc_offsets = doc_offsets if doc_offsets is not None else np.arange(len(lengths) + 1)
        self.doc_lengths = doc_lengths if doc_lengths is not None else lengths
        self.rules = rules
        self.sampler = sampler
        self.planner = planner
        self.world_size = world_size
        self.rank = rank
        self.tokens_per_rank = tokens_per_rank
        self.collator = collator
        self.num_heads = num_heads  # the model's query heads: every plan is checked against them before any P2P

    @classmethod
    def from_measured(
        cls,
        m: MeasuredDataset,
        sampler,
        planner,
        world_size: int,
        rank: int,
        tokens_per_rank: int,
        collator: HDPCollator,
        num_heads: int | None = None,
    ) -> HDPStepDataset:
        return cls(
            m.dataset,
            m.lengths,
            m.loss_tokens,
            sampler,
            planner,
            world_size,
            rank,
            tokens_per_rank,
            collator,
            m.doc_offsets,
            m.doc_lengths,
            m.rules,
            num_heads,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def documents(self, rows: list[int]) -> list[tuple[int, int]]:
        """``(position in rows, document index)`` of every document of the batch: the plan's samples."""
        return [(i, d) for i, r in enumerate(rows) for d in range(int(self.doc_offsets[r + 1] - self.doc_offsets[r]))]

    def plan(self, epoch: int, step: int) -> tuple[list[int], StepPlan]:
        rows = self.sampler.batch_rows(epoch, step)
        lengths = [int(self.doc_lengths[self.doc_offsets[rows[i]] + d]) for i, d in self.documents(rows)]
        plan = self.planner(lengths, self.world_size, self.tokens_per_rank)
        if any(p.ulysses != 1 for mb in plan.micro_batches for p in mb.pieces):
            plan.validate(num_heads=self.num_heads)  # a head-parallel degree must divide the heads: refused here
        return rows, plan

    def __getitem__(self, key) -> HDPStep:
        epoch, step = key
        rows, plan = self.plan(epoch, step)
        docs = self.documents(rows)
        packed = len(docs) != len(rows)
        mine = plan.for_rank(self.rank)
        needed = sorted({p.sample for mb in mine for p in mb.pieces})
        needed_rows = sorted({docs[s][0] for s in needed})
        loaded = self.dataset[[rows[i] for i in needed_rows]] if needed_rows else {}
        user_row = {i: rows[i] for i in range(len(rows))}
        if SOURCE_ROW_COLUMN in loaded:  # rows were dropped: name the user's rows in errors and metadata
            user_row.update({i: int(loaded[SOURCE_ROW_COLUMN][n]) for n, i in enumerate(needed_rows)})
        columns = [c for c in loaded if c != SOURCE_ROW_COLUMN]
        row_docs = {
            i: row_documents({c: loaded[c][n] for c in columns}, user_row[i], self.rules)
            for n, i in enumerate(needed_rows)
        }
        samples, names = {}, {}
        for s in needed:
            i, d = docs[s]
            doc = row_docs[i][d]
            samples[s] = {"input_ids": doc.input_ids, "labels": doc.labels}
        for s, (i, d) in enumerate(docs):
            names[s] = f"{user_row[i]} (document {d})" if packed else user_row[i]
        global_step = epoch * len(self.sampler) + step + 1
        micro = [self.collator(mb, samples, rows=names, step=global_step) for mb in mine]
        return HDPStep(
            epoch=epoch,
            step=step,
            plan=plan,
            fingerprint=plan.fingerprint(),
            rows=rows,
            micro_batches=micro,
            num_loss_tokens=int(sum(int(self.loss_tokens[r]) for r in rows)),
            num_tokens=int(sum(int(self.lengths[r]) for r in rows)),
            local_tokens=sum(int(m["input_ids"].shape[1]) for m in micro if not m["hdp_metadata"].placeholder),
            global_step=global_step,
        )


def _as_inputs(steps: list[HDPStep]) -> dict:
    """One step per batch. Trainer's loop reads the inputs as a mapping: ``input_ids``/``attention_mask``
    hold this rank's real tokens (every token of the global batch lies on exactly one rank), which is
    what ``include_num_input_tokens_seen`` counts and sums over ranks."""
    (step,) = steps
    n = step.local_tokens
    return {
        "hdp_step": step,
        "input_ids": torch.zeros(1, n, dtype=torch.long),
        "attention_mask": torch.ones(1, n, dtype=torch.long),
    }


class HDPDataLoader(DataLoader):
    """A DataLoader of ``{"hdp_step": HDPStep, ...}`` items, one per optimizer step, with ``set_epoch``."""

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
