"""``hf-hdp``'s inputs: sizes on the command line, sample lengths (files, datasets, the built-in corpus), the model
and the hardware. Every bad input is a :class:`CLIError` naming it and the fix."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from hf_hdp.planning.compare import LengthPool
from hf_hdp.planning.cost import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec
from hf_hdp.planning.cost.windows import pattern_masks


class CLIError(Exception):
    """A user error: printed as ``hf-hdp: error: ...`` with exit status 2, no traceback."""


# --------------------------------------------------------------------------- lengths


def parse_size(text: str) -> int:
    """``"32M"`` -> 33554432, ``"8K"`` -> 8192, ``"1000"`` -> 1000 (binary suffixes K, M, G)."""
    t = text.strip().upper().replace("_", "").replace(",", "")
    mult = 1
    if t and t[-1] in "KMG":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[t[-1]]
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 8192, 8K or 32M, got {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 8192, 8K or 32M, got {text!r}")
    return int(value)


_MEMORY_UNITS = {"TB": 1e12, "GB": 1e9, "G": 1e9, "MB": 1e6, "TIB": 2.0**40, "GIB": 2.0**30, "MIB": 2.0**20}


def parse_memory(text: str) -> float:
    """``"80GB"`` -> 80e9 bytes, ``"141 GB"``, ``"80GiB"`` -> 80 x 2^30, ``"512MiB"`` (GB, G and MB are decimal)."""
    t = text.strip().upper().replace(" ", "").replace("_", "")
    for unit in sorted(_MEMORY_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)]) * _MEMORY_UNITS[unit]
            except ValueError:
                break
            if value > 0 and value != float("inf"):
                return value
            break
    raise argparse.ArgumentTypeError(f"expected a memory size with a unit, such as 80GB, 141GB or 80GiB, got {text!r}")


def parse_ratio(text: str) -> float:
    """A number in [0, 1] (``--offload-ratio``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def parse_chunk(text: str) -> int | None:
    """``--loss-chunk-tokens``: a positive size (``4096``, ``4K``) or ``none`` (the full logits)."""
    if text.strip().lower() == "none":
        return None
    return parse_size(text)


def read_lengths_file(path: str) -> LengthPool:
    """One positive integer per line; blank lines and lines starting with ``#`` are skipped.
    ``-`` reads standard input."""
    if path == "-":
        lines, label = sys.stdin.read().splitlines(), "<stdin>"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise CLIError(f"cannot read --lengths file {path!r}: {e.strerror or e}") from None
        label = path
    lengths: list[int] = []
    line_of: list[int] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            value = int(text)
        except ValueError:
            raise CLIError(
                f"{label}, line {number}: expected one integer (a sample's token count) per line, got {text!r}"
            ) from None
        if value < 1:
            raise CLIError(f"{label}, line {number}: a sample length must be at least 1 token, got {value}")
        lengths.append(value)
        line_of.append(number)
    if not lengths:
        raise CLIError(f"{label} holds no lengths: write one integer per line")
    return LengthPool(lengths, f"{label} ({len(lengths):,} lengths)", lambda i: f"line {line_of[i]} of {label}")


def dataset_lengths(name: str, column: str, split: str) -> LengthPool:
    """A column of a HF dataset: integer lengths, or sequences (``input_ids``) whose lengths are taken.

    ``name`` is a folder written by ``save_to_disk``, a data file (``.json``, ``.jsonl``, ``.csv``,
    ``.parquet``), or a name for ``datasets.load_dataset``.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of hf_hdp
        raise CLIError("--dataset needs the `datasets` package: pip install datasets") from None
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        if os.path.isdir(name) and (
            os.path.exists(os.path.join(name, "dataset_info.json"))
            or os.path.exists(os.path.join(name, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(name)
        elif os.path.isfile(name):
            ext = os.path.splitext(name)[1].lstrip(".").lower()
            builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
            if builder is None:
                raise CLIError(
                    f"--dataset {name!r}: unknown file type .{ext}; use .json/.jsonl/.csv/.parquet or a folder"
                )
            ds = datasets.load_dataset(builder, data_files=name, split="train")
        else:
            ds = datasets.load_dataset(name, split=split)
    except CLIError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise CLIError(f"cannot load --dataset {name!r}: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CLIError(f"--dataset {name!r} has no split {split!r}; its splits: {', '.join(ds)} (use --split)")
        ds = ds[split]
    if column not in ds.column_names:
        raise CLIError(
            f"--dataset {name!r} has no column {column!r}; its columns: {', '.join(ds.column_names)} "
            f"(use --column; a column of token ids such as input_ids works too)"
        )
    col = ds.select_columns([column]).with_format("arrow")[:].column(column)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        values = pc.list_value_length(col).to_pylist()
    elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        values = col.to_pylist()
    else:
        raise CLIError(
            f"column {column!r} of {name!r} has type {col.type}: expected integer lengths or lists of token ids"
        )
    rows = [i for i, v in enumerate(values) if v is not None and v >= 1]
    if not rows:
        raise CLIError(f"column {column!r} of {name!r} has no positive lengths")
    dropped = len(values) - len(rows)
    lengths = [int(values[i]) for i in rows]
    source = f"dataset {name!r} [{column}] ({len(lengths):,} samples" + (
        f", {dropped:,} empty skipped)" if dropped else ")"
    )
    return LengthPool(lengths, source, lambda i: f"row {rows[i]} of {name!r}")


def stdlib_pool() -> LengthPool:
    """The built-in corpus: approximate token lengths of the Python standard library's files."""
    from hf_hdp.corpus import stdlib_dir, stdlib_files, stdlib_lengths

    lengths = stdlib_lengths()

    def names(i: int) -> str:
        files = [p for p in stdlib_files() if os.path.getsize(p)]
        if len(files) == len(lengths):
            return f"standard-library file {os.path.relpath(files[i], stdlib_dir())}"
        return f"standard-library sample {i}"

    return LengthPool(lengths, f"the Python standard library ({len(lengths):,} files)", names)


# --------------------------------------------------------------------------- model and hardware


def load_model_spec(name: str) -> ModelSpec:
    """A preset name (``llama-7b`` ...), or a transformers config: a folder, a ``config.json``, or a Hub id."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    presets = ", ".join(MODEL_PRESETS)
    if not os.path.exists(name) and ("/" not in name or name.startswith((".", "/"))):
        raise CLIError(
            f"unknown --model {name!r}: use a preset ({presets}), a folder with a transformers config.json, "
            f"or a Hub id as owner/name"
        )
    try:
        from transformers import AutoConfig

        if os.path.isfile(name):
            with open(name, encoding="utf-8") as f:
                raw = json.load(f)
            model_type = raw.pop("model_type", None)
            if model_type is None:
                raise ValueError("config.json has no model_type")
            config = AutoConfig.for_model(model_type, **raw)
        else:
            config = AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the message goes into the CLI error
        raise CLIError(
            f"cannot load --model {name!r} as a transformers config ({type(e).__name__}: {e}); presets: {presets}"
        ) from None
    config = getattr(config, "text_config", None) or config  # multimodal configs keep the decoder here
    missing = [
        a
        for a in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if getattr(config, a, None) is None
    ]
    if missing:
        raise CLIError(
            f"--model {name!r}: its config lacks {', '.join(missing)}; use a decoder config or a preset ({presets})"
        )
    if os.path.exists(name):
        folder = os.path.dirname(os.path.abspath(name)) if os.path.isfile(name) else os.path.abspath(name)
        label = os.path.basename(folder) or name
    else:
        label = name
    return ModelSpec.from_config(config, name=label)


def load_hardware(name: str) -> HardwareSpec:
    try:
        return HARDWARE_PRESETS[name]
    except KeyError:
        raise CLIError(f"unknown --hardware {name!r}; valid presets: {', '.join(HARDWARE_PRESETS)}") from None


def model_from_args(args: argparse.Namespace) -> ModelSpec:
    """The model of ``--model`` / ``--model-config``, with ``--sliding-window`` / ``--attention-chunk`` applied."""
    if args.model_config is not None:
        if args.model is not None:
            raise CLIError("give --model or --model-config, not both")
        if not os.path.exists(args.model_config):
            raise CLIError(f"--model-config {args.model_config!r}: no such file or folder")
        model = load_model_spec(args.model_config)
    else:
        model = load_model_spec(args.model or "llama-7b")
    window, chunk = args.sliding_window, args.attention_chunk
    if window is None and chunk is None:
        if args.sliding_layers is not None:
            raise CLIError("--sliding-layers applies only with --sliding-window or --attention-chunk")
        return model
    try:
        masks = pattern_masks(model.num_layers, window, chunk, args.sliding_layers)
    except ValueError as e:
        raise CLIError(f"--sliding-layers: {e}") from None
    return replace(model, layer_masks=masks)
