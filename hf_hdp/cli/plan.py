"""``hf-hdp plan``: plan global batches three ways and print what each costs (see :mod:`hf_hdp.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields, replace

from hf_hdp.config import HDPConfig
from hf_hdp.planning.compare import (
    PLANNER_ORDER,
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
    CostModel,
    HardwareSpec,
    ModelSpec,
    layer_type_times,
    memory_breakdown,
    tokens_per_rank_for_memory,
)
from hf_hdp.planning.cost.memory import fmt_gb
from hf_hdp.planning.cost.recurrent import MODES as STATE_SPLITS
from hf_hdp.planning.plan import PlanError
from hf_hdp.planning.report import INSTALL_MATPLOTLIB, MAX_PLOT_RANKS, plot_timelines
from hf_hdp.planning.sharding import resolve_sharding
from hf_hdp.planning.splits import SPLITS

from .inputs import (
    CLIError,
    dataset_lengths,
    load_hardware,
    model_from_args,
    parse_chunk,
    parse_memory,
    parse_ratio,
    parse_size,
    read_lengths_file,
    stdlib_pool,
)
from .render import render_layer_types, render_memory, render_table

MEMORY_DEFAULTS = {
    "zero_stage": None,
    "fsdp": None,
    "checkpointing": False,
    "offload_ratio": 0.0,
    "loss_chunk_tokens": {f.name: f.default for f in fields(HDPConfig)}["loss_chunk_tokens"],
    "precision": "bf16-autocast",
    "reserve_fraction": 0.1,
}

# --precision: bytes per weight, gradient and optimizer state (AdamW's two moments) and per activation value
PRECISIONS = {
    "bf16-autocast": (4, 4, 8, 2),  # TrainingArguments(bf16=True): float32 weights, bf16 autocast
    "bf16": (2, 2, 4, 2),  # a model loaded in bfloat16, no autocast
    "fp32": (4, 4, 8, 4),
}


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``plan`` and its flags to the ``hf-hdp`` subcommands ``sub``."""
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
    src.add_argument(
        "--dataset", metavar="PATH_OR_NAME", help="a HF dataset: save_to_disk folder, data file, or Hub name"
    )
    src.add_argument("--stdlib", action="store_true", help="the built-in corpus: the Python standard library's files")
    lengths.add_argument(
        "--column",
        default="length",
        help="with --dataset: a column of lengths, or of token ids such as input_ids (default: length)",
    )
    lengths.add_argument("--split", default="train", help="with --dataset: the split (default: train)")

    m = p.add_argument_group("model and cluster")
    m.add_argument(
        "--model",
        default=None,
        help="a preset (llama-7b, llama-13b, llama-30b, llama-70b), a folder with a transformers config.json, "
        "or a Hub id (default: llama-7b)",
    )
    m.add_argument(
        "--model-config",
        metavar="CONFIG",
        default=None,
        help="a transformers config.json (or a folder holding one) instead of --model; its layer_types, "
        "sliding_window and attention_chunk_size price the sliding-window and chunked layers",
    )
    m.add_argument(
        "--sliding-window",
        type=parse_size,
        metavar="W",
        default=None,
        help="price the layers --sliding-layers names as sliding-window layers of W tokens (overrides the config's)",
    )
    m.add_argument(
        "--attention-chunk",
        type=parse_size,
        metavar="C",
        default=None,
        help="price the layers --sliding-layers names as chunked attention of C tokens (Llama 4's "
        "attention_chunk_size; overrides the config's)",
    )
    m.add_argument(
        "--sliding-layers",
        metavar="SPEC",
        default=None,
        help="which layers --sliding-window / --attention-chunk apply to: 'all' (the default), a count "
        "such as 40, or a pattern restricted:full such as 5:1 (Gemma 3) or 1:1 (gpt-oss)",
    )
    m.add_argument("--hardware", default="h100", help=f"hardware preset: {', '.join(HARDWARE_PRESETS)} (default: h100)")
    m.add_argument("--world-size", type=int, default=64, help="number of ranks (GPUs) (default: 64)")
    m.add_argument(
        "--tokens-per-rank",
        type=parse_size,
        default=None,
        help="C, the tokens of one rank's micro-batch (default: what --memory allows, else 8K)",
    )
    m.add_argument(
        "--delta", type=float, default=0.05, help="the balance scheduler's tolerance, relative (default: 0.05)"
    )
    m.add_argument(
        "--attention-split",
        choices=SPLITS,
        default="auto",
        help="how the balanced planner splits a long sample's attention: 'auto' (per sample, whichever of "
        "ring, Ulysses and hybrid ends the step earliest), or one of them for every sample (default: auto)",
    )
    m.add_argument(
        "--state-split",
        choices=STATE_SPLITS,
        default="auto",
        help="how a split sample's Gated DeltaNet layers run (HDPConfig.state_split): 'auto' (per segment, "
        "the faster), 'heads' (head-parallel all-to-alls) or 'scan' (state scan) (default: auto)",
    )
    m.add_argument(
        "--ranks-per-node",
        type=int,
        default=None,
        metavar="N",
        help="ranks per node, where the fast links end (default: the hardware preset's)",
    )

    mem = p.add_argument_group("memory (C from a rank's memory, as HDPConfig(tokens_per_rank='auto'))")
    mem.add_argument(
        "--memory",
        type=parse_memory,
        metavar="SIZE",
        help="memory of one rank, e.g. 80GB or 80GiB: print the C it allows and the memory breakdown",
    )
    mem.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2),
        default=MEMORY_DEFAULTS["zero_stage"],
        help="ZeRO stage (default: 1 on several ranks, 0 on one, as HDPConfig)",
    )
    mem.add_argument(
        "--fsdp",
        choices=FSDP_MODES,
        default=MEMORY_DEFAULTS["fsdp"],
        help="FSDP mode instead of ZeRO: shard_grad_op (whole weights during the step) or full_shard",
    )
    mem.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (each layer recomputed)")
    mem.add_argument(
        "--offload-ratio",
        type=parse_ratio,
        default=MEMORY_DEFAULTS["offload_ratio"],
        metavar="R",
        help="offload the saved activations of the first ceil(R x layers) layers to host memory (default: 0)",
    )
    mem.add_argument(
        "--loss-chunk-tokens",
        type=parse_chunk,
        default=MEMORY_DEFAULTS["loss_chunk_tokens"],
        metavar="N",
        help="tokens per chunk of the LM head and loss, or 'none' for the full logits "
        f"(default: {MEMORY_DEFAULTS['loss_chunk_tokens']}, HDPConfig's)",
    )
    mem.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default=MEMORY_DEFAULTS["precision"],
        help="bf16-autocast (float32 weights, AdamW states, bf16 activations; the default), bf16, fp32",
    )
    mem.add_argument(
        "--reserve-fraction",
        type=float,
        default=MEMORY_DEFAULTS["reserve_fraction"],
        help="fraction of --memory kept back for the CUDA context and buffers (default: 0.1)",
    )

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
    o.add_argument(
        "--json",
        action="store_true",
        help='print {"static": {...}, "naive": {...}, "balanced": {...}, ..., '
        '"inputs": {...}} (inputs: world size, C, model, hardware, planner and split settings, '
        "batches)",
    )
    o.add_argument("--plot", metavar="FILE.png", help=f"draw the per-rank timelines (first {MAX_PLOT_RANKS} ranks)")
    o.add_argument(
        "--progress", action="store_true", help="show a progress bar on stderr even when it is not a terminal"
    )
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    check_args(args)
    model = model_from_args(args)
    hardware = load_hardware(args.hardware)
    cost = cost_from_args(args, model, hardware)
    memory = capacity_from_args(args, model) if args.memory is not None else None
    c_from = "--tokens-per-rank" if args.tokens_per_rank is not None else "--memory" if memory else "default"
    if args.tokens_per_rank is None:
        args.tokens_per_rank = memory["tokens_per_rank"] if memory is not None else 8192
    pool = lengths_from_args(args)
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
        runs = compare_planners(
            batches, W, C, cost, delta=args.delta, progress=show, attention_split=args.attention_split
        )
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
            summary = {
                **summary,
                "layers": {
                    "description": cost.describe_layers(),
                    "masks": cost.to_dict()["layer_masks"],
                    "state_split": cost.state_split,
                    "reference_tokens": C,
                    "types": layer_type_times(model, cost, C),
                },
            }
        summary = {**summary, "inputs": plan_inputs(args, c_from, model, hardware, cost, pool, samples, tokens)}
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


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags out of range, and flags given without the flag they apply with."""
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
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise CLIError(f"--ranks-per-node must be at least 1, got {args.ranks_per_node}")
    if args.memory is None:
        given = [f"--{k.replace('_', '-')}" for k, default in MEMORY_DEFAULTS.items() if getattr(args, k) != default]
        if given:
            raise CLIError(
                f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with --memory "
                "(the memory of one rank, e.g. --memory 80GB)"
            )


def cost_from_args(args: argparse.Namespace, model: ModelSpec, hardware: HardwareSpec) -> CostModel:
    """The cost model of the model and hardware, with ``--state-split`` and ``--ranks-per-node`` applied."""
    cost = CostModel.from_specs(model, hardware)
    if args.state_split != "auto":
        cost = replace(cost, state_split=args.state_split)
    if args.ranks_per_node is not None:
        cost = replace(cost, ranks_per_node=args.ranks_per_node)
    return cost


def lengths_from_args(args: argparse.Namespace) -> LengthPool:
    """The sample lengths of ``--lengths``, ``--dataset`` or the built-in corpus."""
    if args.lengths is not None:
        return read_lengths_file(args.lengths)
    if args.dataset is not None:
        return dataset_lengths(args.dataset, args.column, args.split)
    return stdlib_pool()


MODEL_FIELDS = (
    "name",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "v_head_dim",
    "intermediate_size",
    "vocab_size",
    "bytes_per_value",
)


def plan_inputs(
    args: argparse.Namespace,
    c_from: str,
    model: ModelSpec,
    hardware: HardwareSpec,
    cost: CostModel,
    pool: LengthPool,
    samples: int | None,
    tokens: int | None,
) -> dict:
    """What ``--json`` planned from: the world, C, the model, the hardware, the planners' and the splits' settings,
    the lengths and the batches, so that its output can be read (and rerun) without the command line. ``c_from``:
    where C came from (``"--tokens-per-rank"``, ``"--memory"`` or ``"default"``)."""
    source = ("--model-config", args.model_config) if args.model_config is not None else ("--model", args.model)
    hw = {k: (None if v == float("inf") else v) for k, v in asdict(hardware).items()}
    return {
        "world_size": args.world_size,
        "tokens_per_rank": args.tokens_per_rank,
        "tokens_per_rank_from": c_from,
        "model": {
            "flag": source[0],
            "value": source[1] or "llama-7b",
            **{k: getattr(model, k) for k in MODEL_FIELDS},
            "params": model.num_params,
            "layers": cost.describe_layers(),
            "sliding_window": args.sliding_window,
            "attention_chunk": args.attention_chunk,
            "sliding_layers": args.sliding_layers,
        },
        "hardware": {**hw, "ranks_per_node": int(cost.ranks_per_node)},
        "cost_model": cost.label,
        "planners": list(PLANNER_ORDER),
        "delta": args.delta,
        "attention_split": args.attention_split,
        "state_split": args.state_split,
        "lengths": pool.source,
        "global_batch_samples": samples,
        "global_batch_tokens": tokens,
        "steps": args.steps,
        "seed": args.seed,
    }


def capacity_from_args(args: argparse.Namespace, model: ModelSpec) -> dict:
    """The C ``--memory`` allows, and the breakdown of the estimated peak at it (and at ``--tokens-per-rank``)."""
    if not 0 <= args.reserve_fraction < 1:
        raise CLIError(f"--reserve-fraction must be in [0, 1), got {args.reserve_fraction}")
    W = args.world_size
    try:
        zero_stage, fsdp = resolve_sharding(args.zero_stage, args.fsdp, W, zero_name="--zero-stage", fsdp_name="--fsdp")
    except ValueError as e:
        raise CLIError(str(e)) from None
    weight, grad, optimizer, value = PRECISIONS[args.precision]
    spec = replace(model, bytes_per_value=value)
    settings = dict(
        world_size=W,
        zero_stage=zero_stage,
        fsdp=fsdp,
        checkpointing=args.checkpointing,
        offload_ratio=args.offload_ratio,
        loss_chunk_tokens=args.loss_chunk_tokens,
        weight_bytes=weight,
        grad_bytes=grad,
        optimizer_bytes=optimizer,
    )
    try:
        c = tokens_per_rank_for_memory(spec, args.memory, reserve_fraction=args.reserve_fraction, **settings)
    except ValueError as e:
        raise CLIError(f"--memory {fmt_gb(args.memory)}: {e}") from None
    reserve = args.memory * args.reserve_fraction
    out = {
        "tokens_per_rank": c,
        "memory_bytes": args.memory,
        "reserve_fraction": args.reserve_fraction,
        "precision": args.precision,
        "settings": settings,
        "breakdown": memory_breakdown(spec, c, reserve=reserve, **settings).to_dict(),
    }
    if args.tokens_per_rank is not None:
        out["at_tokens_per_rank"] = memory_breakdown(spec, args.tokens_per_rank, reserve=reserve, **settings).to_dict()
    return out
