"""From a row of the user's dataset to the documents HDP trains on: the one per-row validation layer.

A row becomes one or more *documents*, each a whole causal sequence that HDP places on its own
(one rank, or a group): no attention and no label crosses from one document into the next. Every
row goes through the same three steps, when it is measured (once, before planning) and again when
its rank loads it:

1. **The user's data collator**, if one was given: it runs on ``[row]`` alone, with the columns stock
   Trainer would hand it (only the model's forward arguments under ``remove_unused_columns=True``),
   exactly as it would run inside a batch of one. Its output must be that same sample: one row whose
   real tokens are the row's tokens, with ``labels`` (completion-only or prompt masking, padding
   masked with -100), ``attention_mask`` and ``position_ids`` as it sets them. A collator that packs,
   splits, reorders or changes tokens (masked language modelling) is refused.
2. **Padding** (``attention_mask``): leading and trailing zeros are padding and are removed, so they
   take no capacity, get no loss, and positions start at the first real token. A zero between real
   tokens is something HDP cannot express and is refused naming the row.
3. **Documents** (``position_ids`` or TRL's ``seq_lengths``): a pre-packed row, as
   ``DataCollatorWithFlattening`` or TRL's packing make it, is split wherever the positions restart;
   each piece must count ``0, 1, 2, ...``. Labels are then shifted inside each document, as the
   stock padding-free path does.

Every error names the user's row, the value found and the fix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100

#: the columns HDP reads from a row, or from a data collator's output
HONOURED_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids", "seq_lengths")
#: keys a padding-free collator may add that only restate the document boundaries of ``position_ids``
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class HDPDataError(ValueError):
    """A training sample cannot be trained on as given."""


@dataclass(frozen=True)
class Document:
    """One whole causal sequence: its token ids and its (unshifted) labels, ``None`` = train on every token."""

    input_ids: list[int]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------- token lists
def as_token_list(value, row, column: str) -> list[int]:
    """``value`` as a flat list of Python ints, or :class:`HDPDataError` naming the row and the bad value."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if isinstance(value, torch.Tensor):
            floating = value.is_floating_point() or value.is_complex()
        else:
            floating = not np.issubdtype(value.dtype, np.integer)
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
    for pos, t in enumerate(out):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise HDPDataError(
                f"sample {row}: `{column}` must hold integer token ids, found {t!r} ({type(t).__name__}) at position "
                f"{pos}. Nested, float or missing token ids are not samples: fix or filter this sample (e.g. "
                f"ds.filter(lambda s: None not in s['{column}'])), flatten nested lists, or cast the column to int."
            )
    return [int(t) for t in out]


def check_sample(row, sample: Mapping, vocab_size: int | None = None) -> tuple[list[int], list[int] | None]:
    """Validate one document's ``input_ids``/``labels``; return them as lists (labels ``None`` if absent)."""
    if "input_ids" not in sample:
        raise HDPDataError(
            f"sample {row} has no `input_ids` (columns: {sorted(sample)}). HDPTrainer trains on tokenized data: "
            "map the dataset through the tokenizer first."
        )
    ids = as_token_list(sample["input_ids"], row, "input_ids")
    if not ids:
        raise HDPDataError(
            f"sample {row} is empty (0 tokens). Filter empty samples out, e.g. "
            "ds.filter(lambda s: len(s['input_ids']) > 0)."
        )
    if vocab_size is not None:
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise HDPDataError(
                f"sample {row}: token id {hi if hi >= vocab_size else lo} is outside the model's vocabulary "
                f"[0, {vocab_size}). Tokenize with the model's own tokenizer, or resize the embeddings."
            )
    labels = sample.get("labels")
    if labels is not None:
        labels = as_token_list(labels, row, "labels")
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
    """Label tokens a document contributes to the loss (after the shift)."""
    if labels is None:
        return max(len(ids) - 1, 0)
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


# --------------------------------------------------------------------------- the user's collator
@dataclass(frozen=True)
class RowRules:
    """How rows of one dataset become documents: the user's collator and the columns it is given.

    ``collator_columns`` is ``None`` when the collator sees every column (``remove_unused_columns=False``).
    ``truncate_to`` cuts every document to its first tokens (``long_sample_policy="truncate"``).
    """

    collator: Callable | None = None
    collator_columns: tuple[str, ...] | None = None
    truncate_to: int | None = None

    def with_truncation(self, limit: int | None) -> RowRules:
        return RowRules(self.collator, self.collator_columns, limit)


def collator_name(collator) -> str:
    return getattr(collator, "__qualname__", None) or type(collator).__name__


def _per_row(value, row, key: str, name: str):
    """One row of a collator output: a tensor/array of shape ``[1, L]`` (or ``[L]``) becomes a list."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim == 2:
            if value.shape[0] != 1:
                raise HDPDataError(
                    f"sample {row}: the data collator {name} returned `{key}` with {value.shape[0]} rows for one "
                    "sample, so it splits or packs samples; HDP packs them itself. Use a per-sample collator "
                    "(label masking, padding) or none."
                )
            value = value[0]
        return value.tolist() if value.ndim == 1 else value.item()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        if len(value) != 1:
            raise HDPDataError(
                f"sample {row}: the data collator {name} returned `{key}` with {len(value)} rows for one sample, so "
                "it splits or packs samples; HDP packs them itself. Use a per-sample collator or none."
            )
        return list(value[0])
    return value


def apply_collator(rules: RowRules, sample: Mapping, row) -> dict:
    """The user's collator run on ``[sample]``; returns the one row it made, checked to be the same sample."""
    name = collator_name(rules.collator)
    columns = rules.collator_columns
    features = {k: v for k, v in sample.items() if not k.startswith("hdp_") and (columns is None or k in columns)}
    out = rules.collator([features])
    if not isinstance(out, Mapping):
        raise HDPDataError(
            f"sample {row}: the data collator {name} returned {type(out).__name__}, not a mapping of columns; HDP "
            "runs a data collator on each sample and needs `input_ids` (and optional `labels`, `attention_mask`, "
            "`position_ids`) back."
        )
    unknown = [k for k in out if k not in HONOURED_COLUMNS and k not in BOUNDARY_KEYS]
    if unknown:
        raise HDPDataError(
            f"sample {row}: the data collator {name} returned {unknown}, which HDPTrainer would not pass to the model "
            f"(it honours {list(HONOURED_COLUMNS)}). Drop those outputs from the collator, or use the stock Trainer."
        )
    result = {k: _per_row(v, row, k, name) for k, v in out.items() if k in HONOURED_COLUMNS}
    if "input_ids" not in result:
        raise HDPDataError(f"sample {row}: the data collator {name} returned no `input_ids` (keys: {list(out)}).")
    if "input_ids" in features and _real_tokens(result, row) != _real_tokens(features, row):
        raise HDPDataError(
            f"sample {row}: the data collator {name} changed the sample's tokens (its output's real tokens, where "
            "attention_mask is 1, are not the sample's), e.g. by masking or replacing them. HDP runs a data "
            "collator on each sample and needs it to keep the sample's tokens (label masking and padding are "
            "fine); change tokens with datasets.map instead."
        )
    return result


def _real_tokens(sample: Mapping, row) -> list[int]:
    ids = as_token_list(sample["input_ids"], row, "input_ids")
    if sample.get("attention_mask") is None:
        return ids
    mask = as_token_list(sample["attention_mask"], row, "attention_mask")
    return [t for t, m in zip(ids, mask) if m]


# --------------------------------------------------------------------------- padding and documents
def _unpad(mask: list[int], row) -> tuple[int, int]:
    """``(start, end)`` of the real tokens; refuses zeros between real tokens."""
    real = [i for i, m in enumerate(mask) if m]
    if not real:
        return 0, 0
    start, end = real[0], real[-1] + 1
    if end - start != len(real):
        hole = next(i for i in range(start, end) if not mask[i])
        raise HDPDataError(
            f"sample {row}: `attention_mask` is 0 at position {hole}, between real tokens ({start}..{end - 1}). "
            "Leading and trailing zeros are padding and are removed; a zero inside a sample would hide a token "
            "from attention, which HDP's causal kernels cannot express. Remove the masked tokens from the sample "
            "(or, for a packed row, give `position_ids` that restart at each document instead)."
        )
    return start, end


def _boundaries(positions: list[int] | None, seq_lengths, n: int, row) -> list[tuple[int, int]]:
    """``(start, end)`` of each document: where ``position_ids`` restart, or ``seq_lengths``."""
    cuts = [(0, n)]
    if seq_lengths is not None:
        lengths = as_token_list(seq_lengths, row, "seq_lengths")
        if sum(lengths) != n or any(x <= 0 for x in lengths):
            raise HDPDataError(
                f"sample {row}: `seq_lengths` {lengths[:8]} must be positive and add up to the row's {n} tokens "
                f"(they add up to {sum(lengths)}). Recompute the packing, or drop the column."
            )
        starts = np.cumsum([0] + lengths).tolist()
        cuts = list(zip(starts[:-1], starts[1:]))
    if positions is not None:
        if len(positions) != n:
            raise HDPDataError(
                f"sample {row}: `position_ids` has {len(positions)} entries but the sample has {n} tokens. "
                "Positions must align with input_ids token for token."
            )
        starts = [0] + [t for t in range(1, n) if positions[t] != positions[t - 1] + 1]
        from_positions = list(zip(starts, starts[1:] + [n]))
        for a, _ in from_positions:
            if positions[a] != 0:
                raise HDPDataError(
                    f"sample {row}: `position_ids` has a document starting at token {a} with position "
                    f"{positions[a]}; HDP gives every document the positions 0, 1, 2, ... (as the stock padding-free "
                    "path with position_ids does). Positions must restart at 0 at each document: fix the "
                    "position_ids, or drop the column if the row is one document."
                )
        if seq_lengths is not None and from_positions != cuts:
            raise HDPDataError(
                f"sample {row}: `position_ids` restart at tokens {[a for a, _ in from_positions][:8]} but "
                f"`seq_lengths` start documents at {[a for a, _ in cuts][:8]}. Give one of them, or make them agree."
            )
        cuts = from_positions
    return cuts


def row_documents(sample: Mapping, row, rules: RowRules = RowRules()) -> list[Document]:
    """The documents of one dataset row (see the module docstring); every error names ``row``."""
    if rules.collator is not None:
        sample = apply_collator(rules, sample, row)
    ids, labels = check_sample(row, sample)
    n = len(ids)
    positions = sample.get("position_ids")
    positions = as_token_list(positions, row, "position_ids") if positions is not None else None
    mask = sample.get("attention_mask")
    if mask is not None:
        mask = as_token_list(mask, row, "attention_mask")
        if len(mask) != n:
            raise HDPDataError(
                f"sample {row}: `attention_mask` has {len(mask)} entries but `input_ids` has {n}. The mask must "
                "align with input_ids token for token."
            )
        start, end = _unpad(mask, row)
        if end - start == 0:
            raise HDPDataError(
                f"sample {row} is all padding (attention_mask is 0 everywhere). Filter it out, e.g. "
                "ds.filter(lambda s: sum(s['attention_mask']) > 0)."
            )
        ids = ids[start:end]
        labels = labels[start:end] if labels is not None else None
        positions = positions[start:end] if positions is not None else None
        n = end - start
    docs = []
    for a, b in _boundaries(positions, sample.get("seq_lengths"), n, row):
        if rules.truncate_to is not None:
            b = min(b, a + rules.truncate_to)
        docs.append(Document(ids[a:b], labels[a:b] if labels is not None else None))
    return docs


def row_digest(docs: list[Document]) -> int:
    """A 63-bit hash of a row's documents: token ids, labels and boundaries (for resume checks)."""
    h = hashlib.blake2b(digest_size=8)
    for d in docs:
        h.update(np.asarray(d.input_ids, dtype=np.int64).tobytes())
        h.update(b"L" if d.labels is not None else b"N")
        if d.labels is not None:
            h.update(np.asarray(d.labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") >> 1
