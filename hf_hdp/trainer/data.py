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

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..collators.hdp_collator import IGNORE_INDEX, HDPCollator, HDPDataError, count_loss_tokens
from ..planning import StepPlan

LOSS_TOKENS_COLUMN = "hdp_loss_tokens"
MIN_ID_COLUMN = "hdp_min_id"  # smallest token id of a row (input_ids and labels other than -100)
MAX_ID_COLUMN = "hdp_max_id"  # largest token id of a row
SOURCE_ROW_COLUMN = "hdp_source_row"  # the row of the user's dataset, added when long_sample_policy drops rows
#: per-token columns truncated together with ``input_ids`` by ``long_sample_policy="truncate"``
PER_TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask", "token_type_ids", "special_tokens_mask")
_MEASURED = (LOSS_TOKENS_COLUMN, MIN_ID_COLUMN, MAX_ID_COLUMN)

logger = logging.getLogger(__name__)


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


def _short(values, n: int = 8) -> str:
    values = list(values)
    return repr(values[:n])[:-1] + (f", ... ({len(values)} in all)]" if len(values) > n else "]")


def _id_range(row, column: str, values, skip_ignore: bool = False) -> tuple[int, int] | None:
    """``(min, max)`` of a row's token ids (``None`` if it has none); raise naming the row on a missing id."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        for pos, t in enumerate(values):
            if t is None or isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise HDPDataError(
                    f"sample {row}: `{column}` holds {t!r} ({type(t).__name__}) at position {pos}, not an integer "
                    f"token id. Every token needs an id: fix or filter this sample "
                    f"(e.g. ds.filter(lambda s: None not in s['{column}']))."
                )
        arr = arr.astype(np.int64)
    if skip_ignore:
        arr = arr[arr != IGNORE_INDEX]
    if arr.size == 0:
        return None
    return int(arr.min()), int(arr.max())


def _measure(batch: dict, indices: list[int], length_column: str, has_length: bool) -> dict:
    lengths, loss_tokens, lows, highs = [], [], [], []
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
        ranges = [_id_range(row, "input_ids", ids)]
        if labels is not None:
            ranges.append(_id_range(row, "labels", labels, skip_ignore=True))
        ranges = [r for r in ranges if r is not None]
        lows.append(min((r[0] for r in ranges), default=0))
        highs.append(max((r[1] for r in ranges), default=0))
        lengths.append(len(ids))
        loss_tokens.append(count_loss_tokens(ids, labels))
    out = {LOSS_TOKENS_COLUMN: loss_tokens, MIN_ID_COLUMN: lows, MAX_ID_COLUMN: highs}
    if not has_length:
        out[length_column] = lengths
    return out


def _first_row(dataset, column: str, bad) -> tuple[int, object] | None:
    """The first row (and its value) of ``column`` for which ``bad(value)`` holds; scans in batches."""
    for start in range(0, len(dataset), 1000):
        values = dataset[start : start + 1000][column]
        for n, v in enumerate(values):
            if bad(v):
                return start + n, v
    return None


def _not_whole(values) -> bool:
    return values is not None and any(t is not None and not float(t).is_integer() for t in values)


def check_token_columns(dataset) -> None:
    """Refuse ``input_ids``/``labels`` columns that do not hold flat lists of integers, naming a row.

    Reads only the column types (``dataset.features``); a bad column is scanned to name the first
    offending row. Arrow stores a column with one type, so one float token makes the whole column
    float: the error names the first row holding a value that is not a whole number.
    """
    features = getattr(dataset, "features", None) or {}
    for column in ("input_ids", "labels"):
        feature = features.get(column)
        if feature is None:
            continue
        inner = getattr(feature, "feature", None)  # List / LargeList / Sequence
        if inner is None and str(getattr(feature, "dtype", "")) == "null":  # every value missing: no labels
            continue
        if inner is None:  # not a list at all: untokenized text, or one number per row
            found = _first_row(dataset, column, lambda v: v is not None)
            row, value = found if found else (0, None)
            raise HDPDataError(
                f"sample {row}: `{column}` is {value!r:.80} ({getattr(feature, 'dtype', feature)}), not a list of "
                "token ids. Tokenize the text first (e.g. with datasets.map and the model's tokenizer)."
            )
        if getattr(inner, "feature", None) is not None or not hasattr(inner, "dtype"):  # nested lists
            found = _first_row(dataset, column, lambda v: bool(v))
            row, value = found if found else (0, None)
            raise HDPDataError(
                f"sample {row}: `{column}` is a nested list ({feature}), e.g. {_short(value or [], 3)}; HDP needs one "
                "flat list of token ids per sample. Flatten it (e.g. ds.map(lambda s: {"
                f"'{column}': sum(s['{column}'], [])}})) or, for a batch of chat turns, concatenate the turns."
            )
        dtype = str(inner.dtype)
        if dtype.startswith(("int", "uint")):
            continue
        if dtype.startswith("float") or dtype.startswith("double") or dtype.startswith("decimal"):
            found = _first_row(dataset, column, _not_whole)
            if found is not None:
                row, value = found
                bad = next(t for t in value if t is not None and not float(t).is_integer())
                raise HDPDataError(
                    f"sample {row}: `{column}` holds {bad!r}, not an integer token id ({_short(value)}). Fix or "
                    "filter this sample; then cast the column to integers, "
                    f"ds.cast_column('{column}', datasets.List(datasets.Value('int64')))."
                )
            raise HDPDataError(
                f"sample 0: `{column}` is stored as {dtype} ({_short(dataset[0][column])}); token ids must be "
                "integers, or float rounding could change them. Cast the column: "
                f"ds.cast_column('{column}', datasets.List(datasets.Value('int64')))."
            )
        raise HDPDataError(
            f"sample 0: `{column}` holds {dtype} values ({_short(dataset[0][column])}), not integer token ids. "
            "Tokenize with the model's tokenizer, or cast the column to int64."
        )


def measure_dataset(dataset, length_column: str = "length", num_proc: int | None = None):
    """Add the length, loss-token and token-id-range columns (cached by ``datasets``); return
    ``(dataset, lengths, loss_tokens)``.

    Refuses, naming the dataset row: a missing ``input_ids`` column, ids or labels that are not flat
    lists of integers (nested, float, text, missing values), labels not aligned with the ids, and a
    length column that disagrees with the ids."""
    if "input_ids" not in dataset.column_names:
        raise HDPDataError(
            f"the training dataset has no `input_ids` column (columns: {dataset.column_names}). "
            "HDPTrainer trains on tokenized data: map the dataset through the tokenizer first."
        )
    check_token_columns(dataset)
    has_length = length_column in dataset.column_names
    if not has_length or any(c not in dataset.column_names for c in _MEASURED):
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
    check_not_empty(lengths)
    limit = world_size * tokens_per_rank
    too_long = np.flatnonzero(lengths > limit)
    if too_long.size:
        i = int(too_long[0])
        raise HDPDataError(
            f"sample {i} has {int(lengths[i])} tokens, more than world_size x tokens_per_rank = {world_size} x "
            f"{tokens_per_rank} = {limit}{f' ({too_long.size - 1} more samples too)' if too_long.size > 1 else ''}. "
            f"Raise tokens_per_rank to at least {-(-int(lengths.max()) // world_size)}, use more ranks, or filter "
            "the long samples out; HDP never truncates silently (HDPConfig(long_sample_policy='truncate' or 'drop') "
            "does it for you, and logs what it changed)."
        )


def check_not_empty(lengths: np.ndarray, source_rows: np.ndarray | None = None) -> None:
    empty = np.flatnonzero(lengths <= 0)
    if empty.size:
        row = int(empty[0]) if source_rows is None else int(source_rows[empty[0]])
        raise HDPDataError(
            f"sample {row} is empty (0 tokens){f' and {empty.size - 1} more' if empty.size > 1 else ''}. "
            "Filter empty samples out, e.g. ds.filter(lambda s: len(s['input_ids']) > 0)."
        )


def rows_text(rows, first: int = 5) -> str:
    """``"3, 8, 11 and 4 more"``: the first few dataset rows of a list, for messages."""
    rows = list(rows)
    shown = ", ".join(str(int(r)) for r in rows[:first])
    return shown + (f" and {len(rows) - first} more" if len(rows) > first else "")


def _truncate_rows(batch: dict, indices: list[int], limit: int, length_column: str) -> dict:
    n_rows = len(batch["input_ids"])
    out = {c: list(batch[c]) for c in PER_TOKEN_COLUMNS if c in batch}
    measured = {c: list(batch[c]) for c in (length_column, *_MEASURED)}
    for n in range(n_rows):
        ids = out["input_ids"][n]
        if len(ids) <= limit:
            continue
        full = len(ids)
        for c in out:
            if out[c][n] is not None and len(out[c][n]) == full:
                out[c][n] = list(out[c][n][:limit])
        stats = _measure({"input_ids": [out["input_ids"][n]],
                          **({"labels": [out["labels"][n]]} if "labels" in out else {})},
                         [indices[n]], length_column, has_length=False)
        for c in measured:
            measured[c][n] = stats[c][0]
    return {**out, **measured}


def apply_long_sample_policy(dataset, lengths: np.ndarray, loss_tokens: np.ndarray, world_size: int,
                             tokens_per_rank: int, policy: str = "error", length_column: str = "length"):
    """Handle samples longer than ``world_size * tokens_per_rank``; return ``(dataset, lengths, loss_tokens, source_rows)``.

    - ``"error"``: :func:`check_lengths` refuses them (nothing changes);
    - ``"truncate"``: keeps their first ``world_size * tokens_per_rank`` tokens, cutting ``input_ids``,
      ``labels`` and the other per-token columns (:data:`PER_TOKEN_COLUMNS`) together, so labels stay
      aligned; the length and loss-token columns are recomputed for the cut rows;
    - ``"drop"``: removes them; ``source_rows`` then maps each kept row to the user's row, also stored
      in the :data:`SOURCE_ROW_COLUMN` column so that later errors name the user's rows.

    Both opt-in policies log (a warning) how many samples they changed, which rows (the first few),
    and how many tokens and label tokens were removed. ``source_rows`` is ``None`` unless rows were dropped.
    """
    check_not_empty(lengths)
    limit = world_size * tokens_per_rank
    too_long = np.flatnonzero(lengths > limit)
    if policy == "error" or too_long.size == 0:
        check_lengths(lengths, world_size, tokens_per_rank)
        return dataset, lengths, loss_tokens, None
    where = (f"longer than world_size x tokens_per_rank = {world_size} x {tokens_per_rank} = {limit} tokens "
             f"(rows {rows_text(too_long)})")
    total_tokens, total_loss = int(lengths.sum()), int(loss_tokens.sum())
    if policy == "truncate":
        dataset = dataset.map(
            _truncate_rows, batched=True, with_indices=True,
            fn_kwargs={"limit": limit, "length_column": length_column},
            desc="hf_hdp: truncating long samples",
        )
        columns = dataset.with_format("numpy", columns=[length_column, LOSS_TOKENS_COLUMN])
        new_lengths = np.asarray(columns[length_column], dtype=np.int64)
        new_loss = np.asarray(columns[LOSS_TOKENS_COLUMN], dtype=np.int64)
        removed, removed_loss = total_tokens - int(new_lengths.sum()), total_loss - int(new_loss.sum())
        unlabelled = too_long[new_loss[too_long] == 0]
        logger.warning(
            "hf_hdp: long_sample_policy='truncate' cut %d sample(s) %s to their first %d tokens (input_ids and "
            "labels together); removed %d of %d tokens (%.2f%%) and %d of %d label tokens.%s",
            too_long.size, where, limit, removed, total_tokens, 100.0 * removed / max(total_tokens, 1),
            removed_loss, total_loss,
            f" {unlabelled.size} of them keep no label token (rows {rows_text(unlabelled)}) and add nothing to "
            "the loss." if unlabelled.size else "",
        )
        return dataset, new_lengths, new_loss, None
    if policy == "drop":
        keep = np.flatnonzero(lengths <= limit)
        if keep.size == 0:
            raise HDPDataError(
                f"long_sample_policy='drop' would drop every sample: all {lengths.size} are {where}. Raise "
                f"tokens_per_rank to at least {-(-int(lengths.max()) // world_size)} or use more ranks."
            )
        source = keep
        if SOURCE_ROW_COLUMN in dataset.column_names:  # dropped before: keep naming the user's rows
            source = np.asarray(dataset.with_format("numpy", columns=[SOURCE_ROW_COLUMN])[SOURCE_ROW_COLUMN])[keep]
            dataset = dataset.remove_columns(SOURCE_ROW_COLUMN)
        dataset = dataset.select(keep.tolist()).add_column(SOURCE_ROW_COLUMN, source.tolist())
        removed, removed_loss = int(lengths[too_long].sum()), int(loss_tokens[too_long].sum())
        logger.warning(
            "hf_hdp: long_sample_policy='drop' removed %d of %d sample(s) %s; removed %d of %d tokens (%.2f%%) and "
            "%d of %d label tokens. The training dataset now has %d samples; errors still name the original rows.",
            too_long.size, lengths.size, where, removed, total_tokens, 100.0 * removed / max(total_tokens, 1),
            removed_loss, total_loss, keep.size,
        )
        return dataset, lengths[keep], loss_tokens[keep], source
    raise ValueError(f"long_sample_policy must be 'error', 'truncate' or 'drop', got {policy!r}")


def check_vocab_range(dataset, vocab_size: int, source_rows: np.ndarray | None = None) -> None:
    """Refuse token ids (in ``input_ids``, or in ``labels`` other than -100) outside ``[0, vocab_size)``,
    before training, naming the first such row; reads the id-range columns :func:`measure_dataset` added."""
    if MIN_ID_COLUMN not in dataset.column_names or MAX_ID_COLUMN not in dataset.column_names:
        return
    columns = dataset.with_format("numpy", columns=[MIN_ID_COLUMN, MAX_ID_COLUMN])
    low = np.asarray(columns[MIN_ID_COLUMN], dtype=np.int64)
    high = np.asarray(columns[MAX_ID_COLUMN], dtype=np.int64)
    bad = np.flatnonzero((low < 0) | (high >= vocab_size))
    if not bad.size:
        return
    i = int(bad[0])
    sample = dataset[i]
    column, value = "input_ids", None
    for c in ("input_ids", "labels"):
        values = [t for t in (sample.get(c) or []) if not (c == "labels" and t == IGNORE_INDEX)]
        outside = [t for t in values if t < 0 or t >= vocab_size]
        if outside:
            column, value = c, outside[0]
            break
    row = i if source_rows is None else int(source_rows[i])
    more = f" ({bad.size - 1} more samples too)" if bad.size > 1 else ""
    fix = ("Labels hold target token ids or -100 for no loss" if column == "labels"
           else "Tokenize with the model's own tokenizer, or resize the embeddings")
    raise HDPDataError(
        f"sample {row}: {'label' if column == 'labels' else 'token'} id {value} is outside the model's vocabulary "
        f"[0, {vocab_size}) (in `{column}`){more}. {fix} (model.resize_token_embeddings(len(tokenizer)))."
    )


def prepare_dataset(dataset, config, world_size: int, vocab_size: int | None = None):
    """Everything HDPTrainer checks and measures in a train (or eval) dataset, in one call; returns
    ``(dataset, lengths, loss_tokens)`` of the samples to use.

    :func:`measure_dataset` (columns, types, label alignment, lengths), empty samples,
    ``config.long_sample_policy`` (:func:`apply_long_sample_policy`), then the vocabulary range of the
    kept samples (:func:`check_vocab_range`, if ``vocab_size`` is given). Every error names the user's row.
    Call it inside ``TrainingArguments.main_process_first``: it may write ``datasets`` cache files.
    """
    ds, lengths, loss_tokens = measure_dataset(dataset, config.length_column, config.length_num_proc)
    ds, lengths, loss_tokens, source = apply_long_sample_policy(
        ds, lengths, loss_tokens, world_size, config.tokens_per_rank, config.long_sample_policy, config.length_column
    )
    if vocab_size is not None:
        check_vocab_range(ds, vocab_size, source)
    return ds, lengths, loss_tokens


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
        keep = [c for c in ("input_ids", "labels", SOURCE_ROW_COLUMN) if c in dataset.column_names]
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
            s: {col: loaded[col][n] for col in loaded if col != SOURCE_ROW_COLUMN} for n, s in enumerate(needed)
        }
        row_of = {s: rows[s] for s in range(len(rows))}
        if SOURCE_ROW_COLUMN in loaded:  # rows were dropped: name the user's rows in errors and metadata
            row_of.update({s: int(loaded[SOURCE_ROW_COLUMN][n]) for n, s in enumerate(needed)})
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


def _is_iterable(dataset) -> bool:
    """A stream: a ``datasets.IterableDataset`` (``streaming=True``) or a torch ``IterableDataset``."""
    from datasets import IterableDataset

    return isinstance(dataset, (IterableDataset, torch.utils.data.IterableDataset))


def _is_map_style(dataset) -> bool:
    """A dataset HDP can plan: sized, indexable by a list of rows, with columns (``datasets.Dataset``)."""
    if _is_iterable(dataset):  # datasets.IterableDataset has column_names and select_columns too
        return False
    return all(hasattr(dataset, a) for a in ("column_names", "select_columns", "__getitem__", "__len__"))


def require_map_style(dataset, what: str) -> None:
    """Refuse a dataset HDP cannot plan (a stream, or no Arrow columns), saying how to convert it."""
    if _is_map_style(dataset):
        return
    if _is_iterable(dataset):
        fix = ("HDP plans each global batch from the lengths of its samples and loads samples by index, "
               "which a stream cannot give. Load the data without streaming (load_dataset(..., "
               "streaming=False) memory-maps it from disk, so its size does not matter), or convert the "
               "stream once: `def gen(ds): yield from ds`, then datasets.Dataset.from_generator("
               "functools.partial(gen, iterable_ds), features=iterable_ds.features).")
    else:
        fix = ("HDP reads a length column and loads samples by index from an Arrow table: build one with "
               "datasets.Dataset.from_list(rows) or datasets.Dataset.from_dict(columns).")
    raise TypeError(f"HDPTrainer needs a map-style datasets.Dataset as {what}, got {type(dataset).__name__}. {fix}")
