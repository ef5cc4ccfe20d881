"""Measuring and checking a dataset before planning: one pass over the rows, every error naming a row.

:func:`prepare_dataset` is what HDPTrainer runs on its train and eval sets at construction:

1. :func:`require_map_style` and :func:`check_token_columns` read only the dataset's type and
   features: a stream, untokenized text, nested or float token columns are refused at once.
2. :func:`measure_dataset` maps every row through :func:`~hf_hdp.collators.documents.row_documents`
   (the user's collator, padding removal, document splitting, the per-row checks) and stores what
   planning needs in ``hdp_*`` columns: tokens, label tokens (after the shift, per document),
   document lengths, token-id range and a content digest. The columns are *always* recomputed from
   the rows: stale ones from an earlier run are dropped first, so editing a measured dataset (new
   labels, a new collator) can never leave an old count in place. ``datasets`` caches the map, so an
   unchanged on-disk dataset is not measured twice.
3. The long-sample policy and the vocabulary range, on the measured columns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..collators.documents import (
    IGNORE_INDEX,
    HDPDataError,
    RowRules,
    collator_name,
    count_loss_tokens,
    row_digest,
    row_documents,
)

LENGTH_COLUMN = "hdp_length"  # tokens HDP trains on in a row (padding removed, documents kept)
LOSS_TOKENS_COLUMN = "hdp_loss_tokens"  # label tokens of a row, after the shift inside each document
DOC_LENGTHS_COLUMN = "hdp_doc_lengths"  # the row's documents, each placed as its own sequence
MIN_ID_COLUMN = "hdp_min_id"  # smallest token id of a row (input_ids and labels other than -100)
MAX_ID_COLUMN = "hdp_max_id"  # largest token id of a row
DIGEST_COLUMN = "hdp_digest"  # 63-bit hash of the row's documents (token ids, labels, boundaries)
SOURCE_ROW_COLUMN = "hdp_source_row"  # the row of the user's dataset, added when long_sample_policy drops rows
_MEASURED = (LENGTH_COLUMN, LOSS_TOKENS_COLUMN, DOC_LENGTHS_COLUMN, MIN_ID_COLUMN, MAX_ID_COLUMN, DIGEST_COLUMN)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ what a dataset is
def _is_iterable(dataset) -> bool:
    """A stream: a ``datasets.IterableDataset`` (``streaming=True``) or a torch ``IterableDataset``."""
    from datasets import IterableDataset

    return isinstance(dataset, (IterableDataset, torch.utils.data.IterableDataset))


def require_map_style(dataset, what: str) -> None:
    """Refuse a dataset HDP cannot plan (a stream, no Arrow columns, or no row at all), saying how to fix it."""
    if not _is_iterable(dataset) and all(
        hasattr(dataset, a) for a in ("column_names", "select_columns", "__getitem__", "__len__")
    ):
        if len(dataset) == 0:
            name = "the training dataset" if what == "train_dataset" else what
            raise HDPDataError(
                f"{name} is empty ({what} has 0 rows), so there is nothing to plan or train on. Check the split "
                "you loaded and every filter, length limit or train/test split applied to it before the trainer."
            )
        return
    if _is_iterable(dataset):
        fix = (
            "HDP plans each global batch from the lengths of its samples and loads samples by index, "
            "which a stream cannot give. Load the data without streaming (load_dataset(..., "
            "streaming=False) memory-maps it from disk, so its size does not matter), or convert the "
            "stream once: `def gen(ds): yield from ds`, then datasets.Dataset.from_generator("
            "functools.partial(gen, iterable_ds), features=iterable_ds.features)."
        )
    else:
        fix = (
            "HDP reads a length column and loads samples by index from an Arrow table: build one with "
            "datasets.Dataset.from_list(rows) or datasets.Dataset.from_dict(columns)."
        )
    raise TypeError(f"HDPTrainer needs a map-style datasets.Dataset as {what}, got {type(dataset).__name__}. {fix}")


def _short(values, n: int = 8) -> str:
    values = list(values)
    return repr(values[:n])[:-1] + (f", ... ({len(values)} in all)]" if len(values) > n else "]")


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
        if dtype.startswith(("float", "double", "decimal")):
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


# ------------------------------------------------------------------ measuring
@dataclass
class MeasuredDataset:
    """A dataset with its ``hdp_*`` columns, and what planning reads from them (numpy, one entry per row).

    Unpacks as ``dataset, lengths, loss_tokens``.
    """

    dataset: object
    lengths: np.ndarray  # tokens per row
    loss_tokens: np.ndarray  # label tokens per row
    doc_offsets: np.ndarray  # row r's documents are doc_lengths[doc_offsets[r]:doc_offsets[r + 1]]
    doc_lengths: np.ndarray
    rules: RowRules = RowRules()
    source_rows: np.ndarray | None = None  # the user's row of each kept row, when rows were dropped

    def __iter__(self):
        return iter((self.dataset, self.lengths, self.loss_tokens))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def digest(self) -> str:
        """A digest of the content in dataset order (token ids, labels, document boundaries) for resume checks."""
        column = self.dataset.with_format("numpy", columns=[DIGEST_COLUMN])[DIGEST_COLUMN]
        return hashlib.sha256(np.ascontiguousarray(column, dtype=np.int64).tobytes()).hexdigest()[:16]

    def documents(self, row: int) -> list[int]:
        return self.doc_lengths[self.doc_offsets[row] : self.doc_offsets[row + 1]].tolist()


def _measure(batch: dict, indices: list[int], rules: RowRules, length_column: str | None) -> dict:
    out = {c: [] for c in _MEASURED}
    sources = batch.get(SOURCE_ROW_COLUMN)
    keys = list(batch)
    for n, index in enumerate(indices):
        row = int(sources[n]) if sources is not None else index
        sample = {k: batch[k][n] for k in keys}
        ids = sample["input_ids"]
        if ids is None or isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise HDPDataError(f"sample {row}: `input_ids` is {type(ids).__name__}, not a list of token ids.")
        if length_column is not None and int(sample[length_column]) != len(ids):
            raise HDPDataError(
                f"sample {row}: the `{length_column}` column says {sample[length_column]} but `input_ids` has "
                f"{len(ids)} tokens. Drop the column (HDPTrainer measures every sample itself) or fix it."
            )
        docs = row_documents(sample, row, rules)
        values = [t for d in docs for t in d.input_ids]
        values += [t for d in docs if d.labels is not None for t in d.labels if t != IGNORE_INDEX]
        out[LENGTH_COLUMN].append(sum(len(d) for d in docs))
        out[LOSS_TOKENS_COLUMN].append(sum(count_loss_tokens(d.input_ids, d.labels) for d in docs))
        out[DOC_LENGTHS_COLUMN].append([len(d) for d in docs])
        out[MIN_ID_COLUMN].append(min(values))
        out[MAX_ID_COLUMN].append(max(values))
        out[DIGEST_COLUMN].append(row_digest(docs))
    return out


def _read(dataset, rules: RowRules, source_rows=None) -> MeasuredDataset:
    columns = dataset.with_format("numpy", columns=[LENGTH_COLUMN, LOSS_TOKENS_COLUMN])
    docs = dataset.with_format("arrow", columns=[DOC_LENGTHS_COLUMN])[DOC_LENGTHS_COLUMN].combine_chunks()
    return MeasuredDataset(
        dataset=dataset,
        lengths=np.asarray(columns[LENGTH_COLUMN], dtype=np.int64),
        loss_tokens=np.asarray(columns[LOSS_TOKENS_COLUMN], dtype=np.int64),
        doc_offsets=np.concatenate([[0], np.cumsum(docs.value_lengths())]).astype(np.int64),
        doc_lengths=np.asarray(docs.flatten(), dtype=np.int64),
        rules=rules,
        source_rows=source_rows,
    )


def _check_deterministic(dataset, rules: RowRules) -> None:
    """HDP runs the collator when it measures a row and again when it loads it: both must agree."""
    sample = dataset[0]
    first, second = row_documents(sample, 0, rules), row_documents(sample, 0, rules)
    if first != second:
        raise HDPDataError(
            f"the data collator {collator_name(rules.collator)} gave a different output for the same sample "
            "(sample 0) when called twice. HDP runs a data collator on each sample when it measures the dataset "
            "(lengths and label counts for planning) and again when a rank loads it, so it must be deterministic; "
            "apply random augmentation with datasets.map before training instead."
        )


def measure_dataset(
    dataset, length_column: str = "length", num_proc: int | None = None, rules: RowRules = RowRules()
) -> MeasuredDataset:
    """Add the ``hdp_*`` columns, always recomputed from the rows (cached by ``datasets``).

    Refuses, naming the dataset row: a missing ``input_ids`` column, ids or labels that are not flat
    lists of integers (nested, float, text, missing values), labels not aligned with the ids, a
    length column that disagrees with the ids, and every row problem of
    :func:`~hf_hdp.collators.documents.row_documents` (padding inside a sample, bad positions, a collator
    that changes the sample)."""
    if "input_ids" not in dataset.column_names:
        raise HDPDataError(
            f"the training dataset has no `input_ids` column (columns: {dataset.column_names}). "
            "HDPTrainer trains on tokenized data: map the dataset through the tokenizer first."
        )
    check_token_columns(dataset)
    if rules.collator is not None and len(dataset):
        _check_deterministic(dataset, rules)
    stale = [c for c in _MEASURED if c in dataset.column_names]
    if stale:  # from an earlier measurement: the rows may have changed since
        dataset = dataset.remove_columns(stale)
    dataset = dataset.map(
        _measure,
        batched=True,
        with_indices=True,
        num_proc=num_proc,
        fn_kwargs={"rules": rules, "length_column": length_column if length_column in dataset.column_names else None},
        desc="hf_hdp: measuring samples",
    )
    source = None
    if SOURCE_ROW_COLUMN in dataset.column_names:
        source = np.asarray(dataset.with_format("numpy", columns=[SOURCE_ROW_COLUMN])[SOURCE_ROW_COLUMN])
    return _read(dataset, rules, source)


# ------------------------------------------------------------------ what no plan can hold
def rows_text(rows, first: int = 5) -> str:
    """``"3, 8, 11 and 4 more"``: the first few dataset rows of a list, for messages."""
    rows = list(rows)
    shown = ", ".join(str(int(r)) for r in rows[:first])
    return shown + (f" and {len(rows) - first} more" if len(rows) > first else "")


def check_not_empty(lengths: np.ndarray, source_rows: np.ndarray | None = None) -> None:
    empty = np.flatnonzero(lengths <= 0)
    if empty.size:
        row = int(empty[0]) if source_rows is None else int(source_rows[empty[0]])
        raise HDPDataError(
            f"sample {row} is empty (0 tokens){f' and {empty.size - 1} more' if empty.size > 1 else ''}. "
            "Filter empty samples out, e.g. ds.filter(lambda s: len(s['input_ids']) > 0)."
        )


def check_lengths(lengths: np.ndarray, world_size: int, tokens_per_rank: int) -> None:
    """Refuse samples (documents) no plan can hold, before training starts."""
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


def _longest_document(m: MeasuredDataset) -> np.ndarray:
    """The longest document of every row (every row has at least one)."""
    return np.maximum.reduceat(m.doc_lengths, m.doc_offsets[:-1]) if len(m) else np.zeros(0, dtype=np.int64)


def apply_long_sample_policy(
    m: MeasuredDataset,
    world_size: int,
    tokens_per_rank: int,
    policy: str = "error",
    length_column: str = "length",
    num_proc: int | None = None,
) -> MeasuredDataset:
    """Handle documents longer than ``world_size * tokens_per_rank``, which no plan can hold.

    - ``"error"``: refuse them, naming the row and the capacity that would fit;
    - ``"truncate"``: keep each too-long document's first ``world_size * tokens_per_rank`` tokens, ids
      and labels together (the rows are measured again with the cut; the data is not rewritten);
    - ``"drop"``: remove the rows holding them; the :data:`SOURCE_ROW_COLUMN` column then maps each
      kept row to the user's row, so later errors name the user's rows.

    Both opt-in policies log (a warning) how many samples they changed, which rows (the first few),
    and how many tokens and label tokens were removed.
    """
    limit = world_size * tokens_per_rank  # (empty rows never get here: measuring refuses them)
    longest = _longest_document(m)
    too_long = np.flatnonzero(longest > limit)
    if too_long.size == 0:
        return m
    names = too_long if m.source_rows is None else m.source_rows[too_long]
    if policy == "error":
        i = int(too_long[0])
        raise HDPDataError(
            f"sample {int(names[0])} has {int(longest[i])} tokens{' in one document' if len(m.documents(i)) > 1 else ''}"
            f", more than world_size x tokens_per_rank = {world_size} x {tokens_per_rank} = {limit}"
            f"{f' ({too_long.size - 1} more samples too)' if too_long.size > 1 else ''}. "
            f"Raise tokens_per_rank to at least {-(-int(longest.max()) // world_size)}, use more ranks, or filter "
            "the long samples out; HDP never truncates silently (HDPConfig(long_sample_policy='truncate' or 'drop') "
            "does it for you, and logs what it changed)."
        )
    where = (
        f"longer than world_size x tokens_per_rank = {world_size} x {tokens_per_rank} = {limit} tokens "
        f"(rows {rows_text(names)})"
    )
    total_tokens, total_loss = int(m.lengths.sum()), int(m.loss_tokens.sum())
    if policy == "truncate":
        cut = measure_dataset(m.dataset, length_column, num_proc, m.rules.with_truncation(limit))
        cut.source_rows = m.source_rows
        removed, removed_loss = total_tokens - int(cut.lengths.sum()), total_loss - int(cut.loss_tokens.sum())
        unlabelled = names[cut.loss_tokens[too_long] == 0]
        logger.warning(
            "hf_hdp: long_sample_policy='truncate' cut %d sample(s) %s to their first %d tokens (input_ids and "
            "labels together); removed %d of %d tokens (%.2f%%) and %d of %d label tokens.%s",
            too_long.size,
            where,
            limit,
            removed,
            total_tokens,
            100.0 * removed / max(total_tokens, 1),
            removed_loss,
            total_loss,
            f" {unlabelled.size} of them keep no label token (rows {rows_text(unlabelled)}) and add nothing to "
            "the loss."
            if unlabelled.size
            else "",
        )
        return cut
    if policy == "drop":
        keep = np.flatnonzero(longest <= limit)
        if keep.size == 0:
            raise HDPDataError(
                f"long_sample_policy='drop' would drop every sample: all {len(m)} are {where}. Raise "
                f"tokens_per_rank to at least {-(-int(longest.max()) // world_size)} or use more ranks."
            )
        source = keep if m.source_rows is None else m.source_rows[keep]
        dataset = m.dataset
        if SOURCE_ROW_COLUMN in dataset.column_names:  # dropped before: keep naming the user's rows
            dataset = dataset.remove_columns(SOURCE_ROW_COLUMN)
        dataset = dataset.select(keep.tolist()).add_column(SOURCE_ROW_COLUMN, source.tolist())
        removed, removed_loss = int(m.lengths[too_long].sum()), int(m.loss_tokens[too_long].sum())
        logger.warning(
            "hf_hdp: long_sample_policy='drop' removed %d of %d sample(s) %s; removed %d of %d tokens (%.2f%%) and "
            "%d of %d label tokens. The training dataset now has %d samples; errors still name the original rows.",
            too_long.size,
            len(m),
            where,
            removed,
            total_tokens,
            100.0 * removed / max(total_tokens, 1),
            removed_loss,
            total_loss,
            keep.size,
        )
        return _read(dataset, m.rules, source)
    raise ValueError(f"long_sample_policy must be 'error', 'truncate' or 'drop', got {policy!r}")


def check_vocab_range(m: MeasuredDataset, vocab_size: int) -> None:
    """Refuse token ids (in ``input_ids``, or in ``labels`` other than -100) outside ``[0, vocab_size)``,
    before training, naming the first such row; reads the id-range columns :func:`measure_dataset` added."""
    columns = m.dataset.with_format("numpy", columns=[MIN_ID_COLUMN, MAX_ID_COLUMN])
    low = np.asarray(columns[MIN_ID_COLUMN], dtype=np.int64)
    high = np.asarray(columns[MAX_ID_COLUMN], dtype=np.int64)
    bad = np.flatnonzero((low < 0) | (high >= vocab_size))
    if not bad.size:
        return
    i = int(bad[0])
    row = i if m.source_rows is None else int(m.source_rows[i])
    column, value = "input_ids", None
    for doc in row_documents(m.dataset[i], row, m.rules):
        outside = [t for t in doc.input_ids if t < 0 or t >= vocab_size]
        labels = [t for t in (doc.labels or []) if t != IGNORE_INDEX and (t < 0 or t >= vocab_size)]
        if outside or labels:
            column, value = ("input_ids", outside[0]) if outside else ("labels", labels[0])
            break
    more = f" ({bad.size - 1} more samples too)" if bad.size > 1 else ""
    fix = (
        "Labels hold target token ids or -100 for no loss"
        if column == "labels"
        else "Tokenize with the model's own tokenizer, or resize the embeddings"
    )
    raise HDPDataError(
        f"sample {row}: {'label' if column == 'labels' else 'token'} id {value} is outside the model's vocabulary "
        f"[0, {vocab_size}) (in `{column}`){more}. {fix} (model.resize_token_embeddings(len(tokenizer)))."
    )


def prepare_dataset(
    dataset, config, world_size: int, vocab_size: int | None = None, rules: RowRules = RowRules()
) -> MeasuredDataset:
    """Everything HDPTrainer checks and measures in a train (or eval) dataset, in one call.

    :func:`measure_dataset`, empty samples, ``config.long_sample_policy``
    (:func:`apply_long_sample_policy`), then the vocabulary range of the kept samples
    (:func:`check_vocab_range`, if ``vocab_size`` is given). Every error names the user's row.
    Call it inside ``TrainingArguments.main_process_first``: it may write ``datasets`` cache files.
    """
    m = measure_dataset(dataset, config.length_column, config.length_num_proc, rules)
    m = apply_long_sample_policy(
        m, world_size, config.tokens_per_rank, config.long_sample_policy, config.length_column, config.length_num_proc
    )
    if vocab_size is not None:
        check_vocab_range(m, vocab_size)
    return m


@contextlib.contextmanager
def progress_bars(show: bool):
    """``datasets`` progress bars only where ``show`` (rank 0): the other ranks' bars would interleave."""
    from datasets.utils import logging as datasets_logging

    hide = not show and datasets_logging.is_progress_bar_enabled()
    if hide:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            datasets_logging.enable_progress_bar()
