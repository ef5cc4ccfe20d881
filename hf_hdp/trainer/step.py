"""One rank's part of an HDP step: forward (and backward) of its packed micro-batches, in slot order.

Shared by :class:`~hf_hdp.trainer.HDPTrainer`'s training step, its evaluation loop, the tests and
the benchmarks. The loss is token-level: a micro-batch's summed token losses over the label-token
count of the whole global batch, computed from labels the collator already shifted.

Also the pieces HDPTrainer and :class:`~hf_hdp.accelerator.HDPAccelerator` (a custom accelerate loop)
share to plan: :func:`hdp_cost_model` (the balanced planner's cost model of a model) and
:func:`hdp_step_loader` (a loader of one rank's HDP steps over a measured dataset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data.checks import MeasuredDataset
from ..data.collator import HDPCollator
from ..data.documents import IGNORE_INDEX
from ..data.loader import GlobalBatchSampler, HDPDataLoader, HDPStepDataset, move_to
from ..launch import launcher_ranks_per_node
from ..mesh import DynamicMesh
from ..models import model_heads
from ..planning import HARDWARE_PRESETS, CostModel, get_planner
from .loss import chunked_head
from .offload import ActivationOffloader

logger = logging.getLogger(__name__)


def hdp_cost_model(model, config, device, low_precision: bool = False,
                   checkpointing: bool = False) -> tuple[CostModel, float]:
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


def hdp_step_loader(measured: MeasuredDataset, sampler: GlobalBatchSampler, config, cost_model: CostModel,
                    world_size: int, rank: int, collator: HDPCollator, model, num_workers: int = 0,
                    lockstep: bool = False) -> HDPDataLoader:
    """A loader of this rank's HDP steps over ``measured``: ``config.planner`` with ``cost_model``.

    ``lockstep``: every rank runs the same number of micro-batches (FSDP's per-layer collectives,
    :class:`~hf_hdp.trainer.fsdp.LockstepPlanner`). Each item is ``{"hdp_step": HDPStep, ...}``.
    """
    planner = get_planner(config.planner, cost_model, attention_split=config.attention_split,
                          **({"lockstep": True} if lockstep else {}))
    if lockstep:
        from .fsdp import LockstepPlanner

        planner = LockstepPlanner(planner)  # any planner: the same micro-batch count on every rank
    steps = HDPStepDataset.from_measured(measured, sampler, planner, world_size, rank, config.tokens_per_rank,
                                         collator, num_heads=model_heads(model.config))
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


def hdp_loss(model, inputs, num_loss_tokens: int, return_outputs: bool = False, loss_func=None, *,
             chunk_tokens: int | None = None):
    """Sum of the micro-batch's token losses divided by the global batch's label count.

    ``chunk_tokens``: compute the LM head and the loss ``chunk_tokens`` tokens at a time, never holding
    the full ``[T, vocab]`` float32 logits (:func:`~hf_hdp.trainer.loss.chunked_cross_entropy`), for
    the models whose head :func:`~hf_hdp.trainer.loss.chunked_head` accepts; their ``outputs.logits``
    is None. None (the default), a ``loss_func`` or any other model computes the full logits.

    ``loss_func`` is a Trainer ``compute_loss_func(outputs, labels, num_items_in_batch)``. Its
    contract is stock Trainer's: ``labels`` aligned with the inputs, which the function shifts itself
    (``logits[:, :-1]`` against ``labels[:, 1:]``, as transformers' causal-LM loss does). HDP's
    labels are already shifted (target ``t`` belongs to input ``t``, -100 at every document's end),
    so the function gets them behind one leading -100 and the logits followed by one zero row: its
    shift then pairs every logit with its own target, inside each document, and drops the zero row.
    ``num_items_in_batch`` is the global label-token count, so the sum over micro-batches and ranks
    is stock Trainer's loss of the whole batch on one device.
    """
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive integer or None (full logits), got {chunk_tokens!r}")
    model_inputs = dict(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                        hdp_metadata=inputs["hdp_metadata"], use_cache=False)
    targets = inputs["labels"]
    head = chunked_head(model) if chunk_tokens is not None and loss_func is None else None
    if head is not None:
        loss, outputs = head(model, targets, chunk_tokens, **model_inputs)
        loss = loss / max(int(num_loss_tokens), 1)
        outputs = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                         attentions=getattr(outputs, "attentions", None))
        return (loss, outputs) if return_outputs else loss
    outputs = model(**model_inputs)
    if loss_func is not None:
        logits = outputs.logits
        outputs["logits"] = torch.cat([logits, logits.new_zeros(logits.shape[0], 1, logits.shape[2])], dim=1)
        labels = torch.cat([targets.new_full((targets.shape[0], 1), IGNORE_INDEX), targets], dim=1)
        count = torch.tensor(int(num_loss_tokens), dtype=torch.long, device=targets.device)
        loss = loss_func(outputs, labels, num_items_in_batch=count)
        outputs["logits"] = logits
        return (loss, outputs) if return_outputs else loss
    logits = outputs.logits[0]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # the loss of bf16/fp16 logits is computed in float32
    loss = F.cross_entropy(logits, targets[0], ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss / max(int(num_loss_tokens), 1)
    return (loss, outputs) if return_outputs else loss


def forward_micro_batch(model, batch: dict, num_loss_tokens: int, mesh: DynamicMesh, backend: str, device,
                        loss_fn=None, context=contextlib.nullcontext, offload: ActivationOffloader | None = None):
    """Move one packed micro-batch to ``device``, run its forward through the "hdp" attention and
    return ``(loss, batch)``; refuse a model whose forward never called the "hdp" attention.

    ``offload``: an :class:`~hf_hdp.trainer.offload.ActivationOffloader`; the forward then sends the
    saved activations of the micro-batch's first decoder layers to host memory, and the backward that
    follows brings them back (None: no offloading)."""
    if not isinstance(mesh, DynamicMesh):
        raise RuntimeError(
            f"HDP micro-batches need the dynamic mesh (hf_hdp.DynamicMesh) for their ring P2P and the step's one "
            f"gradient reduction, got {type(mesh).__name__}. In a custom loop build hf_hdp.HDPAccelerator(...) "
            "(it makes the mesh; a plain accelerate.Accelerator has none) and run each step with "
            "accelerator.hdp_backward(model, step)."
        )
    refuse_wrapped(model)
    loss_fn = loss_fn or (lambda m, b, num_items_in_batch: hdp_loss(m, b, num_items_in_batch))
    batch = move_to(batch, device)
    meta = batch["hdp_metadata"]
    meta.bind(mesh, backend)
    offloading = offload.offloading(model, meta, device) if offload is not None else contextlib.nullcontext()
    with context(), offloading:
        loss = loss_fn(model, batch, num_items_in_batch=num_loss_tokens)
    if meta.attention_calls == 0:
        raise RuntimeError(
            f"{type(model).__name__} ran a forward without calling the 'hdp' attention, so its attention "
            "ignored the packing; refusing to train wrongly. Does the model honour config._attn_implementation?"
        )
    return loss, batch


def run_micro_batches(model, micro_batches, num_loss_tokens: int, mesh: DynamicMesh, backend: str,
                      device, loss_fn=None, backward=None, context=contextlib.nullcontext,
                      offload: ActivationOffloader | None = None, last_backward=None) -> float:
    """Forward and backward of this rank's micro-batches in slot order; returns the sum of their losses.

    Gradients accumulate locally; the caller reduces them once (:meth:`DynamicMesh.reduce_gradients`).
    ``offload``: activation offloading of every micro-batch (see :func:`forward_micro_batch`); its
    :class:`~hf_hdp.trainer.offload.OffloadStats` count the bytes moved. ``last_backward``: a context
    manager factory entered around the last micro-batch's backward (the reduction's
    :meth:`~hf_hdp.reduction.GradientReduction.watch`, which starts buckets as their gradients are final).
    """
    backward = backward or (lambda loss: loss.backward())
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        loss, _ = forward_micro_batch(model, batch, num_loss_tokens, mesh, backend, device, loss_fn, context,
                                      offload=offload)
        last = last_backward is not None and i == len(micro_batches) - 1
        with last_backward() if last else contextlib.nullcontext():
            backward(loss)
        total += loss.detach().double()
    return float(total)
