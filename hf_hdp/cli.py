"""The ``hf-hdp`` command line: see what HDP gains on your data before spending GPU hours.

``hf-hdp plan`` draws global batches from a length distribution, plans each one three ways (the
static DP x CP mesh that today's tools use, naive HDP, balanced HDP), and prints the estimated step
time, speedup over the static mesh, imbalance, idle fraction, P2P traffic, group sizes and planning
time side by side::

    hf-hdp plan                                     # the standard-library corpus, LLaMA-7B on H100
    hf-hdp plan --lengths lengths.txt --world-size 256 --global-batch-tokens 8M
    hf-hdp plan --dataset ./my_ds --column input_ids --model ./my_model --json
    hf-hdp plan --plot timelines.png
    hf-hdp plan --memory 80GB --zero-stage 1 --checkpointing   # C from a rank's memory, and its breakdown
    hf-hdp plan --model-config gemma3/config.json              # its sliding layers priced as such
    hf-hdp plan --sliding-window 1024 --sliding-layers 5:1      # a preset with Gemma 3's layer pattern

Sliding-window and chunked layers are priced by what they compute (``s·w``, not ``s²``) and by the direct
exchange a split sample's windowed layer does instead of the relay ring
(:mod:`hf_hdp.planning.cost.model`): a model config's ``layer_types``, ``sliding_window`` and
``attention_chunk_size`` give them, or ``--sliding-window`` / ``--attention-chunk`` with ``--sliding-layers``.

With ``--memory`` it also prints the ``C`` (tokens per rank) that much memory per rank allows, as
``HDPConfig(tokens_per_rank="auto")`` computes it (:func:`hf_hdp.planning.cost.tokens_per_rank_for_memory`),
with the estimated peak broken down (weights, gradients, optimizer states, activations, logits, the
reserve), and plans with that ``C`` unless ``--tokens-per-rank`` is given.

Everything here runs on the CPU with the pure-Python planners and the analytic cost model
(:mod:`hf_hdp.planning.cost`); no GPU and no torch.distributed are involved. ``python -m hf_hdp``
is the same command.

This module reads the command line and its inputs (length files, datasets, model configs) and
prints; the comparison itself is :mod:`hf_hdp.planning.compare`, the timelines figure
:func:`hf_hdp.planning.report.plot_timelines`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields, replace
from typing import Callable, Sequence

from hf_hdp.config import HDPConfig
from hf_hdp.planning.compare import (
    PLANNER_ORDER,
    PLANNER_TITLES,
    DoesNotFit,
    LengthPool,
    check_fits,
    compare_planners,
    draw_batches,
    summarize,
)
from hf_hdp.planning.cost import (
    FSDP_MODES,
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    CostModel,
    HardwareSpec,
    ModelSpec,
    layer_type_times,
    memory_breakdown,
    tokens_per_rank_for_memory,
)
from hf_hdp.planning.cost.memory import fmt_gb
from hf_hdp.planning.cost.windows import pattern_masks
from hf_hdp.planning.plan import PlanError
from hf_hdp.planning.splits import SPLITS
from hf_hdp.planning.report import INSTALL_MATPLOTLIB, MAX_PLOT_RANKS, fmt_bytes, fmt_seconds, plot_timelines


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


# the options that only --memory uses, and their defaults (HDPConfig's where it has the setting)
MEMORY_DEFAULTS = {"zero_stage": None, "fsdp": None, "checkpointing": False, "offload_ratio": 0.0,
                   "loss_chunk_tokens": {f.name: f.default for f in fields(HDPConfig)}["loss_chunk_tokens"],
                   "precision": "bf16-autocast", "reserve_fraction": 0.1}

# --precision: bytes per weight, gradient and optimizer state (AdamW's two moments) and per activation value
PRECISIONS = {
    "bf16-autocast": (4, 4, 8, 2),  # TrainingArguments(bf16=True): float32 weights, bf16 autocast
    "bf16": (2, 2, 4, 2),  # a model loaded in bfloat16, no autocast
    "fp32": (4, 4, 8, 4),
}


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
            os.path.exists(os.path.join(name, "dataset_info.json")) or os.path.exists(os.path.join(name, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(name)
        elif os.path.isfile(name):
            ext = os.path.splitext(name)[1].lstrip(".").lower()
            builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
            if builder is None:
                raise CLIError(f"--dataset {name!r}: unknown file type .{ext}; use .json/.jsonl/.csv/.parquet or a folder")
            ds = datasets.load_dataset(builder, data_files=name, split="train")
        else:
            ds = datasets.load_dataset(name, split=split)
    except CLIError:
        raise
    except Exception as e:  # datasets raises many types; the message is what matters
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
        raise CLIError(f"column {column!r} of {name!r} has type {col.type}: expected integer lengths or lists of token ids")
    rows = [i for i, v in enumerate(values) if v is not None and v >= 1]
    if not rows:
        raise CLIError(f"column {column!r} of {name!r} has no positive lengths")
    dropped = len(values) - len(rows)
    lengths = [int(values[i]) for i in rows]
    source = f"dataset {name!r} [{column}] ({len(lengths):,} samples" + (f", {dropped:,} empty skipped)" if dropped else ")")
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
    except Exception as e:
        raise CLIError(
            f"cannot load --model {name!r} as a transformers config ({type(e).__name__}: {e}); "
            f"presets: {presets}"
        ) from None
    config = getattr(config, "text_config", None) or config  # multimodal configs keep the decoder here
    missing = [
        a
        for a in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if getattr(config, a, None) is None
    ]
    if missing:
        raise CLIError(f"--model {name!r}: its config lacks {', '.join(missing)}; use a decoder config or a preset ({presets})")
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


# --------------------------------------------------------------------------- text output


def fmt_groups(groups: dict[str, int], limit: int = 5) -> str:
    """``{"1": 900, "2": 12, ...}`` -> ``"k=1 x900, k=2 x12, ..."``, longest-k last, truncated."""
    items = [f"k={k}:{n}" for k, n in groups.items()]
    if len(items) > limit:
        ks = [int(k) for k in groups]
        return f"{', '.join(items[: limit - 1])}, ... ({len(items)} sizes, k<={max(ks)})"
    return ", ".join(items)


def fmt_splits(d: dict) -> str:
    """``{"ring": 3, "hybrid": 2}`` and ``{"8": 2}`` -> ``"ring:3, hybrid:2 (u=8:2)"``; distributed pieces only."""
    kinds = [f"{kind}:{n}" for kind, n in d.get("splits", {}).items() if kind != "local"]
    degrees = ", ".join(f"u={u}:{n}" for u, n in d.get("ulysses_degrees", {}).items())
    return (", ".join(kinds) or "-") + (f" ({degrees})" if degrees else "")


def _mesh(d: dict) -> str:
    cps = [c for c in d.get("cp_per_step", []) if c is not None]
    if cps and min(cps) != max(cps):
        return f"CP {min(cps)}-{max(cps)} (per batch)"
    return f"DP={d['dp']} x CP={d['cp']}"


def render_table(summary: dict[str, dict], header: str) -> str:
    rows: list[tuple[str, Callable[[str, dict], str]]] = [
        ("mesh", lambda n, d: _mesh(d) if n == "static" else "one pool, any k"),
        ("step time", lambda n, d: fmt_seconds(d["step_time_s"])),
        ("speedup vs static", lambda n, d: "-" if d["speedup_vs_static"] is None else f"{d['speedup_vs_static']:.2f}x"),
        ("tokens/s", lambda n, d: "-" if not d["tokens_per_s"] else f"{d['tokens_per_s']:,.0f}"),
        ("imbalance (max/mean)", lambda n, d: f"{d['imbalance']:.3f}"),
        ("rank spread (max/min)", lambda n, d: f"{d['rank_spread']:.2f}x"),
        ("idle fraction", lambda n, d: f"{d['idle_fraction']:.1%}"),
        ("exposed P2P / busy", lambda n, d: f"{d['p2p_time_fraction']:.1%}"),
        ("P2P bytes / step", lambda n, d: fmt_bytes(d["p2p_bytes"])),
        ("P2P messages / step", lambda n, d: f"{d['p2p_messages']:,.0f}"),
        ("slots", lambda n, d: f"{d['num_slots']:.1f}" if d["steps"] > 1 else f"{d['num_slots']:.0f}"),
        (
            "micro-batches / rank",
            lambda n, d: f"{d['micro_batches_per_rank']['min']}-{d['micro_batches_per_rank']['max']}"
            f" (mean {d['micro_batches_per_rank']['mean']:.1f})",
        ),
        ("group sizes", lambda n, d: fmt_groups(d["group_sizes"], limit=3)),
        ("splits (samples)", lambda n, d: fmt_splits(d)),
        ("planning time", lambda n, d: fmt_seconds(d["planning_time_s"])),
    ]
    names = [n for n in PLANNER_ORDER if n in summary]
    table = [[""] + [PLANNER_TITLES[n] for n in names]]
    for label, f in rows:
        table.append([label] + [f(n, summary[n]) for n in names])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [header, ""]
    for j, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-hdp", description="Hybrid Data Parallelism (ByteScale) for transformers: planning tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "plan",
        help="compare the static DP x CP mesh, naive HDP and balanced HDP on your length distribution",
        description=(
            "Draw global batches from a length distribution, plan each with the static DP x CP mesh, "
            "naive HDP and balanced HDP, and print estimated step times (from the analytic cost model) "
            "side by side."
        ),
    )
    lengths = p.add_argument_group("lengths (one of; default --stdlib)")
    src = lengths.add_mutually_exclusive_group()
    src.add_argument("--lengths", metavar="FILE", help="text file with one sample length per line ('-' = stdin)")
    src.add_argument("--dataset", metavar="PATH_OR_NAME", help="a HF dataset: save_to_disk folder, data file, or Hub name")
    src.add_argument("--stdlib", action="store_true", help="the built-in corpus: the Python standard library's files")
    lengths.add_argument(
        "--column", default="length", help="with --dataset: a column of lengths, or of token ids such as input_ids (default: length)"
    )
    lengths.add_argument("--split", default="train", help="with --dataset: the split (default: train)")

    m = p.add_argument_group("model and cluster")
    m.add_argument(
        "--model",
        default=None,
        help="a preset (llama-7b, llama-13b, llama-30b, llama-70b), a folder with a transformers config.json, "
        "or a Hub id (default: llama-7b)",
    )
    m.add_argument("--model-config", metavar="CONFIG", default=None,
                   help="a transformers config.json (or a folder holding one) instead of --model; its layer_types, "
                   "sliding_window and attention_chunk_size price the sliding-window and chunked layers")
    m.add_argument("--sliding-window", type=parse_size, metavar="W", default=None,
                   help="price the layers --sliding-layers names as sliding-window layers of W tokens "
                   "(overrides the config's)")
    m.add_argument("--attention-chunk", type=parse_size, metavar="C", default=None,
                   help="price the layers --sliding-layers names as chunked attention of C tokens (Llama 4's "
                   "attention_chunk_size; overrides the config's)")
    m.add_argument("--sliding-layers", metavar="SPEC", default=None,
                   help="which layers --sliding-window / --attention-chunk apply to: 'all' (the default), a count "
                   "such as 40, or a pattern restricted:full such as 5:1 (Gemma 3) or 1:1 (gpt-oss)")
    m.add_argument("--hardware", default="h100", help=f"hardware preset: {', '.join(HARDWARE_PRESETS)} (default: h100)")
    m.add_argument("--world-size", type=int, default=64, help="number of ranks (GPUs) (default: 64)")
    m.add_argument(
        "--tokens-per-rank", type=parse_size, default=None,
        help="C, the tokens of one rank's micro-batch (default: what --memory allows, else 8K)",
    )
    m.add_argument(
        "--delta", type=float, default=0.05, help="the balance scheduler's tolerance, relative (default: 0.05)"
    )
    m.add_argument("--attention-split", choices=SPLITS, default="auto",
                   help="how the balanced planner splits a long sample's attention: 'auto' (per sample, whichever of "
                   "ring, Ulysses and hybrid ends the step earliest), or one of them for every sample (default: auto)")
    m.add_argument("--state-split", choices=("auto", "heads", "scan"), default="auto",
                   help="how a split sample's Gated DeltaNet layers run (HDPConfig.state_split): 'auto' (per segment, "
                   "the faster), 'heads' (head-parallel all-to-alls) or 'scan' (state scan) (default: auto)")
    m.add_argument("--ranks-per-node", type=int, default=None, metavar="N",
                   help="ranks per node, where the fast links end (default: the hardware preset's)")

    mem = p.add_argument_group("memory (C from a rank's memory, as HDPConfig(tokens_per_rank='auto'))")
    mem.add_argument("--memory", type=parse_memory, metavar="SIZE",
                     help="memory of one rank, e.g. 80GB or 80GiB: print the C it allows and the memory breakdown")
    mem.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=MEMORY_DEFAULTS["zero_stage"],
                     help="ZeRO stage (default: 1 on several ranks, 0 on one, as HDPConfig)")
    mem.add_argument("--fsdp", choices=FSDP_MODES, default=MEMORY_DEFAULTS["fsdp"],
                     help="FSDP mode instead of ZeRO: shard_grad_op (whole weights during the step) or full_shard")
    mem.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (each layer recomputed)")
    mem.add_argument("--offload-ratio", type=parse_ratio, default=MEMORY_DEFAULTS["offload_ratio"], metavar="R",
                     help="offload the saved activations of the first ceil(R x layers) layers to host memory "
                     "(default: 0)")
    mem.add_argument("--loss-chunk-tokens", type=parse_chunk, default=MEMORY_DEFAULTS["loss_chunk_tokens"], metavar="N",
                     help="tokens per chunk of the LM head and loss, or 'none' for the full logits "
                     f"(default: {MEMORY_DEFAULTS['loss_chunk_tokens']}, HDPConfig's)")
    mem.add_argument("--precision", choices=tuple(PRECISIONS), default=MEMORY_DEFAULTS["precision"],
                     help="bf16-autocast (float32 weights, AdamW states, bf16 activations; the default), bf16, fp32")
    mem.add_argument("--reserve-fraction", type=float, default=MEMORY_DEFAULTS["reserve_fraction"],
                     help="fraction of --memory kept back for the CUDA context and buffers (default: 0.1)")

    b = p.add_argument_group("global batch")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--global-batch-samples", type=parse_size, metavar="N", help="samples per global batch")
    g.add_argument(
        "--global-batch-tokens",
        type=parse_size,
        metavar="T",
        help="tokens per global batch (e.g. 32M); default 4 x world-size x tokens-per-rank",
    )
    b.add_argument("--steps", type=int, default=1, help="global batches to average over (default: 1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the batch sampler (default: 0)")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help='print {"static": {...}, "naive": {...}, "balanced": {...}}')
    o.add_argument("--plot", metavar="FILE.png", help=f"draw the per-rank timelines (first {MAX_PLOT_RANKS} ranks)")
    o.add_argument("--progress", action="store_true", help="show a progress bar on stderr even when it is not a terminal")
    p.set_defaults(func=cmd_plan)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise CLIError(f"--world-size must be at least 1, got {args.world_size}")
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if not 0 <= args.delta < 1:
        raise CLIError(f"--delta must be in [0, 1), got {args.delta}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise CLIError(f"--plot writes a PNG; give a file name ending in .png, got {args.plot!r}")
    if args.dataset is None and (args.column != "length" or args.split != "train"):
        raise CLIError("--column and --split apply only with --dataset")
    if args.memory is None:
        given = [f"--{k.replace('_', '-')}" for k, default in MEMORY_DEFAULTS.items() if getattr(args, k) != default]
        if given:
            raise CLIError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with --memory "
                           "(the memory of one rank, e.g. --memory 80GB)")

    model = model_from_args(args)
    hardware = load_hardware(args.hardware)
    cost = CostModel.from_specs(model, hardware)
    if args.state_split != "auto":
        cost = replace(cost, state_split=args.state_split)
    if args.ranks_per_node is not None:
        if args.ranks_per_node < 1:
            raise CLIError(f"--ranks-per-node must be at least 1, got {args.ranks_per_node}")
        cost = replace(cost, ranks_per_node=args.ranks_per_node)
    memory = capacity_from_args(args, model) if args.memory is not None else None
    if args.tokens_per_rank is None:
        args.tokens_per_rank = memory["tokens_per_rank"] if memory is not None else 8192

    if args.lengths is not None:
        pool = read_lengths_file(args.lengths)
    elif args.dataset is not None:
        pool = dataset_lengths(args.dataset, args.column, args.split)
    else:
        pool = stdlib_pool()
    W, C = args.world_size, args.tokens_per_rank
    try:
        check_fits(pool, W, C)
    except DoesNotFit as e:
        raise CLIError(e.advice("--world-size", "--tokens-per-rank")) from None

    samples, tokens = args.global_batch_samples, args.global_batch_tokens
    if samples is None and tokens is None:
        tokens = 4 * W * C
    batches = draw_batches(pool.lengths, args.steps, args.seed, samples=samples, tokens=tokens)

    show = args.progress or sys.stderr.isatty()
    try:
        runs = compare_planners(batches, W, C, cost, delta=args.delta, progress=show,
                                attention_split=args.attention_split)
    except PlanError as e:
        raise CLIError(str(e)) from None
    summary = summarize(runs)

    note = None
    if args.plot:
        try:
            note = plot_timelines(runs, cost, args.plot)
        except ImportError:
            raise CLIError(f"--plot needs matplotlib, which is not installed: {INSTALL_MATPLOTLIB}") from None
        except OSError as e:
            raise CLIError(f"cannot write --plot {args.plot!r}: {e.strerror or e}") from None

    if args.json:
        if memory is not None:
            summary = {**summary, "memory": memory}
        if cost.layer_masks or cost.layer_states:
            summary = {**summary, "layers": {"description": cost.describe_layers(),
                                             "masks": cost.to_dict()["layer_masks"],
                                             "state_split": cost.state_split, "reference_tokens": C,
                                             "types": layer_type_times(model, cost, C)}}
        print(json.dumps(summary, indent=2, sort_keys=False))
    else:
        if memory is not None:
            print(render_memory(memory, args.tokens_per_rank) + "\n")
        n_tokens = summary["static"]["tokens"]
        n_samples = summary["static"]["samples"]
        budget = f"{samples:,} samples" if samples is not None else f"{tokens:,} tokens"
        layers = render_layer_types(model, cost, C) if cost.layer_masks or cost.layer_states else ""
        header = (
            f"hf-hdp plan: {cost.label}; {W:,} ranks x {C:,} tokens (C)\n{layers}"
            f"lengths from {pool.source}; global batch {budget} "
            f"(mean {n_samples:,.0f} samples, {n_tokens:,.0f} tokens), "
            f"{args.steps} step{'s' if args.steps > 1 else ''}, seed {args.seed}"
        )
        print(render_table(summary, header))
        print("\nstep times are estimates of the analytic cost model (hf_hdp.planning.cost), not measurements.")
        if args.plot:
            print(f"timelines written to {args.plot}" + (f" ({note})" if note else ""))
    if args.plot and args.json and note:
        print(f"hf-hdp: {note} in {args.plot}", file=sys.stderr)
    return 0


def render_layer_types(model: ModelSpec, cost: CostModel, tokens: int) -> str:
    """The ``layers:`` lines of the text output: each layer type's count, and one layer's forward + backward time for
    a ``tokens``-token sample alone on a rank, split into its parts."""
    names = {"delta": "Gated DeltaNet", "ssd": "Mamba-2", "conv": "short convolution"}
    states = [names[k] for k in names if any(st.kind == k for st, _ in cost.state_kinds)]
    kinds = (["sliding and chunked"] if cost.layer_masks else []) + states
    recurrent = [n for n in states if n != "short convolution"]
    split = (f", split samples' {' and '.join(recurrent)} layers by {cost.state_split!r}" if recurrent else "")
    lines = [f"layers: {cost.describe_layers()} ({', '.join(kinds)} layers priced as such{split})",
             f"  one layer, forward + backward, a {tokens:,}-token sample alone on a rank:"]
    for t in layer_type_times(model, cost, tokens):
        parts = [f"projections and MLP {fmt_seconds(t['linear'])}"]
        if t["quadratic"]:
            parts.append(f"attention {fmt_seconds(t['quadratic'])}")
        if t["state"]:
            what = "convolution" if t["layer"].startswith("short convolution") else "convolution and recurrence"
            parts.append(f"{what} {fmt_seconds(t['state'])}")
        lines.append(f"    {t['layers']} x {t['layer']}: {fmt_seconds(t['seconds'])} ({', '.join(parts)})")
    return "\n".join(lines) + "\n"


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


def capacity_from_args(args: argparse.Namespace, model: ModelSpec) -> dict:
    """The C ``--memory`` allows, and the breakdown of the estimated peak at it (and at ``--tokens-per-rank``)."""
    if args.fsdp is not None and args.zero_stage is not None:
        raise CLIError(f"--fsdp {args.fsdp} shards the optimizer states and gradients itself; drop --zero-stage")
    if not 0 <= args.reserve_fraction < 1:
        raise CLIError(f"--reserve-fraction must be in [0, 1), got {args.reserve_fraction}")
    weight, grad, optimizer, value = PRECISIONS[args.precision]
    spec = replace(model, bytes_per_value=value)
    W = args.world_size
    zero_stage = 0 if args.fsdp is not None or W == 1 else (1 if args.zero_stage is None else args.zero_stage)
    settings = dict(world_size=W, zero_stage=zero_stage, fsdp=args.fsdp, checkpointing=args.checkpointing,
                    offload_ratio=args.offload_ratio, loss_chunk_tokens=args.loss_chunk_tokens, weight_bytes=weight,
                    grad_bytes=grad, optimizer_bytes=optimizer)
    try:
        c = tokens_per_rank_for_memory(spec, args.memory, reserve_fraction=args.reserve_fraction, **settings)
    except ValueError as e:
        raise CLIError(f"--memory {fmt_gb(args.memory)}: {e}") from None
    reserve = args.memory * args.reserve_fraction
    out = {"tokens_per_rank": c, "memory_bytes": args.memory, "reserve_fraction": args.reserve_fraction,
           "precision": args.precision, "settings": settings,
           "breakdown": memory_breakdown(spec, c, reserve=reserve, **settings).to_dict()}
    if args.tokens_per_rank is not None:
        out["at_tokens_per_rank"] = memory_breakdown(spec, args.tokens_per_rank, reserve=reserve, **settings).to_dict()
    return out


def render_memory(memory: dict, tokens_per_rank: int) -> str:
    """The ``--memory`` lines of the text output."""
    s = memory["settings"]
    sharding = f"FSDP {s['fsdp']}" if s["fsdp"] else f"ZeRO stage {s['zero_stage']}"
    chunk = "full logits" if s["loss_chunk_tokens"] is None else f"loss chunks of {s['loss_chunk_tokens']:,} tokens"
    lines = [
        f"memory: C = {memory['tokens_per_rank']:,} tokens per rank fit {fmt_gb(memory['memory_bytes'])} "
        f"({memory['reserve_fraction']:.0%} kept back): {s['world_size']:,} ranks, {sharding}, "
        f"{'checkpointing' if s['checkpointing'] else 'no checkpointing'}, offload ratio {s['offload_ratio']:g}, "
        f"{chunk}, {memory['precision']}",
        "  at C: " + _breakdown_text(memory["breakdown"]),
    ]
    at = memory.get("at_tokens_per_rank")
    if at is not None:
        fits = at["total"] <= memory["memory_bytes"]
        lines.append(f"  at --tokens-per-rank {tokens_per_rank:,}: " + _breakdown_text(at)
                     + ("" if fits else f"  -- more than {fmt_gb(memory['memory_bytes'])}"))
    return "\n".join(lines)


def _breakdown_text(b: dict) -> str:
    names = ("weights", "gradients", "optimizer", "activations", "logits", "reserve", "total")
    return ", ".join(f"{n} {fmt_gb(b[n])}" for n in names)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-hdp``; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return args.func(args)
    except CLIError as e:
        print(f"hf-hdp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-hdp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hf-hdp plan | head`: stop quietly, as other command-line tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
