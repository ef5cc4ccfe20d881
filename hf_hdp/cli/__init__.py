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
(:mod:`hf_hdp.planning.cost.timing`): a model config's ``layer_types``, ``sliding_window`` and
``attention_chunk_size`` give them, or ``--sliding-window`` / ``--attention-chunk`` with ``--sliding-layers``.

With ``--memory`` it also prints the ``C`` (tokens per rank) that much memory per rank allows, as
``HDPConfig(tokens_per_rank="auto")`` computes it (:func:`hf_hdp.planning.cost.tokens_per_rank_for_memory`),
with the estimated peak broken down (weights, gradients, optimizer states, activations, logits, the
reserve), and plans with that ``C`` unless ``--tokens-per-rank`` is given.

Everything here runs on the CPU with the pure-Python planners and the analytic cost model
(:mod:`hf_hdp.planning.cost`); no GPU and no torch.distributed are involved. ``python -m hf_hdp``
is the same command.

This package reads the command line and its inputs (:mod:`.inputs`: length files, datasets, model configs),
runs each subcommand (:mod:`.plan`) and prints (:mod:`.render`); the comparison itself is
:mod:`hf_hdp.planning.compare`, the timelines figure :func:`hf_hdp.planning.report.plot_timelines`.
``--json`` prints the planners' figures and, under ``"inputs"``, what they were planned from.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import consolidate, plan
from .inputs import (
    CLIError,
    dataset_lengths,
    load_hardware,
    load_model_spec,
    parse_size,
    read_lengths_file,
    stdlib_pool,
)
from .plan import MEMORY_DEFAULTS, PRECISIONS, capacity_from_args, cmd_plan
from .render import fmt_groups, fmt_splits, render_layer_types, render_memory, render_table

__all__ = [
    "MEMORY_DEFAULTS",
    "PRECISIONS",
    "CLIError",
    "build_parser",
    "capacity_from_args",
    "cmd_plan",
    "dataset_lengths",
    "fmt_groups",
    "fmt_splits",
    "load_hardware",
    "load_model_spec",
    "main",
    "parse_size",
    "read_lengths_file",
    "render_layer_types",
    "render_memory",
    "render_table",
    "stdlib_pool",
]


def build_parser() -> argparse.ArgumentParser:
    """``hf-hdp``'s parser: one subcommand per module (``plan``: :mod:`.plan`; ``consolidate``: :mod:`.consolidate`)."""
    parser = argparse.ArgumentParser(
        prog="hf-hdp", description="Hybrid Data Parallelism (ByteScale) for transformers: planning tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    plan.add_parser(sub)
    consolidate.add_parser(sub)
    return parser


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
