"""``hf-hdp consolidate CHECKPOINT OUT``: a sharded HDPTrainer checkpoint as a transformers model folder.

Runs on one process without a process group, one file's worth of tensors at a time
(:func:`hf_hdp.engine.export.consolidate`); ``--optimizer`` also writes the whole optimizer state in
``torch.optim``'s format. torch is imported only when the subcommand runs, so ``hf-hdp plan`` stays light.
"""

from __future__ import annotations

import argparse

from .inputs import CLIError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "consolidate",
        help="a sharded HDPTrainer checkpoint as a transformers model folder",
        description="Turn a sharded HDPTrainer checkpoint into a transformers model folder (from_pretrained), on one "
        "process, one file's worth of tensors at a time.",
    )
    p.add_argument("checkpoint", help="a checkpoint-N folder with hdp_sharded/")
    p.add_argument("out", help="the model folder to write")
    p.add_argument(
        "--optimizer",
        action="store_true",
        help="also write optimizer.pt: the whole optimizer state in torch.optim's format",
    )
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    p.set_defaults(func=cmd_consolidate)


def cmd_consolidate(args: argparse.Namespace) -> int:
    from ..engine.export import consolidate  # torch, only for this subcommand

    try:
        consolidate(args.checkpoint, args.out, optimizer=args.optimizer, max_shard_size=args.max_shard_size)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    print(f"wrote {args.out}")
    return 0
