"""Preparing a model and a dataset for HDP, shared by every front door: switch the model to the ``"hdp"``
attention (:func:`enable_hdp_attention`), refuse a model wrapped in DDP (:func:`refuse_wrapped`), the
balanced planner's cost model (:func:`hdp_cost_model`) and the loader of one rank's planned steps
(:func:`hdp_step_loader`)."""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import PreTrainedModel

from ..attention.interface import HDP_ATTENTION
from ..attention.recurrent import enable_hdp_mixers
from ..collators.collator import HDPCollator
from ..data.checks import MeasuredDataset
from ..data.loader import GlobalBatchSampler, HDPDataLoader, HDPStepDataset
from ..distributed.launch import launcher_ranks_per_node
from ..models import model_heads, require_hdp_routable
from ..planning import HARDWARE_PRESETS, CostModel, get_planner
from .fsdp import LockstepPlanner

logger = logging.getLogger(__name__)


def enable_hdp_attention(model, state_split: str = "auto") -> PreTrainedModel:
    """Switch ``model`` (or the model inside a PEFT wrapper) to the ``"hdp"`` attention, and its state-carrying
    layers to HDP's (split by ``state_split``, :class:`~hf_hdp.config.HDPConfig`), or explain why it cannot be."""
    base = require_hdp_routable(model)  # decoder-only, attention through AttentionInterface (hf_hdp.models)
    base.set_attn_implementation(HDP_ATTENTION)
    enable_hdp_mixers(
        base, state_split
    )  # Gated DeltaNet layers: HDP's packed and split recurrence (hf_hdp.attention.recurrent)
    return base


def hdp_cost_model(
    model, config, device, low_precision: bool = False, checkpointing: bool = False
) -> tuple[CostModel, float]:
    """``(cost model, peak FLOP/s)`` of ``model`` on ``config.hardware`` ("auto": h100 on CUDA, else cpu).

    The balanced planner's estimate of each sequence's time and the logged MFU's peak. ``low_precision``:
    bf16/fp16 autocast (2-byte activations), else the model's dtype; ``checkpointing``: the layers are
    recomputed in backward (priced with ``config.offload_ratio``). A config without the usual shape
    fields plans with LLaMA-7B's cost model (logged).
    """
    hardware = config.hardware
    if hardware == "auto":
        hardware = "h100" if torch.device(device).type == "cuda" else "cpu"
    peak = HARDWARE_PRESETS[hardware].peak_flops
    value_bytes = 2 if low_precision else model.dtype.itemsize
    try:
        cost = CostModel.from_config(model.config, hardware, bytes_per_value=value_bytes)
    except (AttributeError, TypeError) as err:  # a config without the usual shape fields
        logger.warning("hf_hdp: no cost model for %s (%s); planning with LLaMA-7B's.", type(model).__name__, err)
        return CostModel.default(), peak
    if cost.layer_states:  # the method the trainer runs for split state-carrying layers
        cost = dataclasses.replace(cost, state_split=config.state_split)
    rpn = launcher_ranks_per_node(config.ranks_per_node)
    if rpn is not None:  # where the fast links end: Ulysses sub-groups stay inside a node
        cost = dataclasses.replace(cost, ranks_per_node=rpn)
    ratio = config.offload_ratio
    if isinstance(ratio, (int, float)) and ratio > 0:  # the copies compute does not hide count in each estimate
        cost = dataclasses.replace(cost, offload_ratio=float(ratio), offload_checkpointing=bool(checkpointing))
    return cost, peak


def hdp_step_loader(
    measured: MeasuredDataset,
    sampler: GlobalBatchSampler,
    config,
    cost_model: CostModel,
    world_size: int,
    rank: int,
    collator: HDPCollator,
    model,
    num_workers: int = 0,
    lockstep: bool = False,
) -> HDPDataLoader:
    """A loader of this rank's HDP steps over ``measured``: ``config.planner`` with ``cost_model``.

    ``lockstep``: every rank runs the same number of micro-batches (FSDP's per-layer collectives,
    :class:`~hf_hdp.engine.fsdp.LockstepPlanner`). Each item is ``{"hdp_step": HDPStep, ...}``.
    """
    planner = get_planner(
        config.planner, cost_model, attention_split=config.attention_split, **({"lockstep": True} if lockstep else {})
    )
    if lockstep:
        planner = LockstepPlanner(planner)  # any planner: the same micro-batch count on every rank
    steps = HDPStepDataset.from_measured(
        measured,
        sampler,
        planner,
        world_size,
        rank,
        config.tokens_per_rank,
        collator,
        num_heads=model_heads(model.config),
    )
    return HDPDataLoader(steps, num_workers=num_workers)


def refuse_wrapped(model, where: str = "HDP") -> None:
    """Refuse a model in DDP (or DataParallel): its per-backward all-reduce would hang when ranks run
    different numbers of micro-batches, and HDP reduces the gradients itself, once per step."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        raise TypeError(
            f"{where}: the model is wrapped in {type(model).__name__}, whose gradient all-reduce runs in every "
            "backward: HDP ranks run different numbers of micro-batches, so it would hang, and HDP reduces the "
            "gradients itself, once per step. Pass the bare model (model.module) to HDPAccelerator.prepare, "
            "not a model prepared by a plain accelerate.Accelerator or wrapped in DistributedDataParallel."
        )
