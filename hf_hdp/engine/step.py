"""One rank's part of an HDP optimizer step: the one engine every front door runs.

:class:`StepEngine` runs a planned step: the check that every rank holds the same plan, the skip of a
global batch without a label token, this rank's micro-batches in slot order (ranks may run different
numbers, zero included), the loss over the global batch's label count, the step's one gradient
reduction (the same bounded buckets on every rank, :mod:`hf_hdp.distributed.reduction`; FSDP2's own
reduce-scatter under :mod:`.fsdp`) and the recount of the label tokens the ranks packed. HDPTrainer,
HDPAccelerator and HDPSFTTrainer call it; they differ only in how they build the loss function and
what they log.

The loss is token-level: a micro-batch's summed token losses over the label-token count of the whole
global batch (:func:`hdp_loss`), computed from labels the collator already shifted.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..collators.collator import HDPCollator
from ..collators.documents import IGNORE_INDEX, HDPDataError
from ..config import HDPConfig
from ..data.checks import rows_text
from ..data.loader import HDPStep, move_to
from ..distributed.mesh import DynamicMesh
from .fsdp import ZERO2, begin_zero2_step, end_zero2_step, fsdp_errors
from .loss import chunked_head
from .offload import ActivationOffloader
from .setup import refuse_wrapped
from .zero import gradient_owners

logger = logging.getLogger(__name__)


def hdp_loss(
    model,
    inputs,
    num_items_in_batch: int,
    return_outputs: bool = False,
    loss_func=None,
    *,
    chunk_tokens: int | None = None,
):
    """Sum of the micro-batch's token losses divided by the global batch's label count.

    ``chunk_tokens``: compute the LM head and the loss ``chunk_tokens`` tokens at a time, never holding
    the full ``[T, vocab]`` float32 logits (:func:`~hf_hdp.engine.loss.chunked_cross_entropy`), for
    the models whose head :func:`~hf_hdp.engine.loss.chunked_head` accepts; their ``outputs.logits``
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
    if chunk_tokens is not None and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    ):
        raise ValueError(f"chunk_tokens must be a positive integer or None (full logits), got {chunk_tokens!r}")
    model_inputs = dict(
        input_ids=inputs["input_ids"],
        position_ids=inputs["position_ids"],
        hdp_metadata=inputs["hdp_metadata"],
        use_cache=False,
    )
    targets = inputs["labels"]
    head = chunked_head(model) if chunk_tokens is not None and loss_func is None else None
    if head is not None:
        loss, outputs = head(model, targets, chunk_tokens, **model_inputs)
        loss = loss / max(int(num_items_in_batch), 1)
        outputs = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )
        return (loss, outputs) if return_outputs else loss
    outputs = model(**model_inputs)
    if loss_func is not None:
        logits = outputs.logits
        outputs["logits"] = torch.cat([logits, logits.new_zeros(logits.shape[0], 1, logits.shape[2])], dim=1)
        labels = torch.cat([targets.new_full((targets.shape[0], 1), IGNORE_INDEX), targets], dim=1)
        count = torch.tensor(int(num_items_in_batch), dtype=torch.long, device=targets.device)
        loss = loss_func(outputs, labels, num_items_in_batch=count)
        outputs["logits"] = logits
        return (loss, outputs) if return_outputs else loss
    logits = outputs.logits[0]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # the loss of bf16/fp16 logits is computed in float32
    loss = F.cross_entropy(logits, targets[0], ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss / max(int(num_items_in_batch), 1)
    return (loss, outputs) if return_outputs else loss


def forward_micro_batch(
    model,
    batch: dict,
    num_loss_tokens: int,
    mesh: DynamicMesh,
    backend: str,
    device,
    loss_fn=None,
    context=contextlib.nullcontext,
    offload: ActivationOffloader | None = None,
):
    """Move one packed micro-batch to ``device``, run its forward through the "hdp" attention and
    return ``(loss, batch)``; refuse a model whose forward never called the "hdp" attention.

    ``offload``: an :class:`~hf_hdp.engine.offload.ActivationOffloader`; the forward then sends the
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
    loss_fn = loss_fn or hdp_loss
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


def run_micro_batches(
    model,
    micro_batches,
    num_loss_tokens: int,
    mesh: DynamicMesh,
    backend: str,
    device,
    loss_fn=None,
    backward=None,
    context=contextlib.nullcontext,
    offload: ActivationOffloader | None = None,
    last_backward=None,
) -> float:
    """Forward and backward of this rank's micro-batches in slot order; returns the sum of their losses.

    Gradients accumulate locally; the caller reduces them once (:meth:`DynamicMesh.reduce_gradients`).
    ``offload``: activation offloading of every micro-batch (see :func:`forward_micro_batch`); its
    :class:`~hf_hdp.engine.offload.OffloadStats` count the bytes moved. ``last_backward``: a context
    manager factory entered around the last micro-batch's backward (the reduction's
    :meth:`~hf_hdp.distributed.reduction.GradientReduction.watch`, which starts buckets as their gradients are final).
    """
    backward = backward or (lambda loss: loss.backward())
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        loss, _ = forward_micro_batch(
            model, batch, num_loss_tokens, mesh, backend, device, loss_fn, context, offload=offload
        )
        last = last_backward is not None and i == len(micro_batches) - 1
        with last_backward() if last else contextlib.nullcontext():
            backward(loss)
        total += loss.detach().double()
    return float(total)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did on this rank.

    ``loss``: the step's loss, the same float on every rank (0.0 when skipped). ``skipped``: the global
    batch had no label token, every gradient is ``None`` and the optimizer step must not run.
    ``bytes_sent`` / ``bytes_sent_all``: P2P bytes this rank / all ranks sent. ``cpu_s``: this rank's
    process CPU seconds for the step.
    """

    loss: float
    skipped: bool = False
    bytes_sent: int = 0
    bytes_sent_all: float = 0.0
    cpu_s: float = 0.0


LossFn = Callable[..., torch.Tensor]  # (model, batch, num_items_in_batch=...) -> scalar loss


class StepEngine:
    """Runs one rank's part of each optimizer step; shared by every front door.

    ``backward``: how a loss is backpropagated (accelerate's ``Accelerator.backward``: loss scaling);
    ``autocast``: a context-manager factory entered around each forward (mixed precision);
    ``offload``: an :class:`~.offload.ActivationOffloader` or None. Under FSDP2, set
    :attr:`fsdp_mode` and :attr:`fsdp_modules` (:mod:`.fsdp`) once the model is sharded: the gradient
    reduction is then FSDP's own.
    """

    def __init__(
        self,
        mesh: DynamicMesh,
        config: HDPConfig,
        *,
        backward: Callable | None = None,
        autocast: Callable = contextlib.nullcontext,
        offload: ActivationOffloader | None = None,
        collator: HDPCollator | None = None,
    ):
        self.mesh = mesh
        self.config = config
        self.backward = backward
        self.autocast = autocast
        self.offload = offload
        self.collator = collator
        self.fsdp_mode: str | None = None
        self.fsdp_modules: list = []

    def run(self, model, step: HDPStep, loss_fn: LossFn, optimizers=()) -> StepResult:
        """One optimizer step's forward and backward on this rank, and the step's one gradient reduction.

        Afterwards every rank holds the gradient one device computes on the whole global batch (at ZeRO
        stage 2 and under FSDP2 its shard of it). A global batch without a single label token (every
        label -100) has no loss: all ranks know it from the plan (the count is global), so all skip the
        forward, the backward and the reduction together and leave every gradient ``None``;
        :attr:`StepResult.skipped` tells the caller not to step the optimizer (a zero gradient would not
        do: AdamW still moves the weights through its momentum and weight decay). ``optimizers``: the
        optimizers that will step (a ZeRO optimizer says which rank owns each gradient).
        """
        with fsdp_errors(self.mesh, step.global_step) if self.fsdp_modules else contextlib.nullcontext():
            return self._run(model, step, loss_fn, optimizers)  # FSDP's collectives fail as the mesh's do

    def _run(self, model, step: HDPStep, loss_fn: LossFn, optimizers) -> StepResult:
        mesh, cfg = self.mesh, self.config
        refuse_wrapped(model)
        if cfg.check_plan_hash:
            mesh.check_plan(step.fingerprint, step.global_step)
        mesh.current_step = step.global_step
        if step.num_loss_tokens == 0:  # known from the plan on every rank: all skip together
            for p in model.parameters():
                p.grad = None
            return StepResult(loss=0.0, skipped=True)
        started, bytes_before = time.process_time(), mesh.stats.bytes_sent
        fsdp = self.fsdp_modules
        if fsdp and self.fsdp_mode == ZERO2:
            begin_zero2_step(fsdp)  # the whole weights once; no collective inside the micro-batches
        reduction = None
        if not fsdp:  # started during the last backward (hf_hdp.distributed.reduction); ZeRO 2: a reduce-scatter
            params = [p for p in model.parameters() if p.requires_grad]
            owners = None
            for opt in optimizers:
                owners = gradient_owners(opt, params) if owners is None else owners
            reduction = mesh.gradient_reduction(params, owners, num_extras=3, step=step.global_step)
        overlap = reduction.watch if reduction is not None and cfg.overlap_grad_reduction else None
        loss_sum = self._micro_batches(model, step.micro_batches, step.num_loss_tokens, loss_fn, overlap)
        if fsdp and self.fsdp_mode == ZERO2:
            end_zero2_step(fsdp)  # every rank's placeholder backward reduce-scatters the accumulated gradients
            placeholder = self.collator.placeholder(mesh.rank, step.plan.num_slots, step.global_step)
            loss_sum += self._micro_batches(model, [placeholder], step.num_loss_tokens, loss_fn, None)
        sent = mesh.stats.bytes_sent - bytes_before
        labels = float(sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in step.micro_batches))
        if fsdp:  # FSDP reduce-scattered the gradients itself; the step's sums go in one bounded all-reduce
            total, sent_all, labels_all = mesh.sum_scalars(
                [loss_sum, float(sent), labels], "step sums (loss, bytes, labels)", step.global_step
            )
            mesh.gradients_sharded = True
        else:  # the step's loss, the P2P bytes and the label tokens of all ranks ride in its last bucket
            total, sent_all, labels_all = reduction.finish([loss_sum, float(sent), labels])
        check_label_count(step, labels_all)
        return StepResult(
            loss=float(total), bytes_sent=sent, bytes_sent_all=sent_all, cpu_s=time.process_time() - started
        )

    def _micro_batches(self, model, micro_batches, num_loss_tokens: int, loss_fn: LossFn, last_backward) -> float:
        return run_micro_batches(
            model,
            micro_batches,
            num_loss_tokens,
            self.mesh,
            self.config.attention_backend,
            self.mesh.device,
            loss_fn=loss_fn,
            backward=self.backward,
            context=self.autocast,
            offload=self.offload,
            last_backward=last_backward,
        )


def check_label_count(step: HDPStep, packed: float) -> None:
    """Refuse a step whose ranks packed another label count than measuring the dataset counted."""
    if int(round(packed)) != step.num_loss_tokens:
        raise HDPDataError(
            f"global step {step.global_step} (dataset rows {rows_text(step.rows, 8)}): the ranks packed "
            f"{int(round(packed))} label tokens, but measuring the dataset counted {step.num_loss_tokens}, so "
            "the loss would be divided by the wrong count; the optimizer step was not taken. The rows gave other "
            "labels when loaded than when measured: a data collator that is random or has state (HDP runs it "
            "per sample, at measuring and at loading) must give the same output for the same sample."
        )


def guard_step(optimizer, should_skip) -> None:
    """Make ``optimizer.step()`` return at once, touching nothing, whenever ``should_skip()`` says so.

    The guard is a bound method set on the instance, the way torch's LR schedulers and accelerate's
    mixed-precision wrapper patch ``step`` (a scheduler built on the optimizer later wraps it in turn,
    which needs a bound method): the optimizer keeps its class (``isinstance`` checks,
    ``state_dict``, checkpoints are unchanged). Idempotent.

    A sharded (ZeRO) optimizer's step is a collective (its weight all-gather); every rank skips it
    together, because ``should_skip`` comes from the step plan, which every rank holds.
    """
    if getattr(optimizer, "_hdp_step_guard", False):
        return
    step = optimizer.step

    @functools.wraps(step)
    def guarded_step(self, *args, **kwargs):
        if should_skip():
            return None
        return step(*args, **kwargs)

    optimizer.step = types.MethodType(guarded_step, optimizer)
    optimizer._hdp_step_guard = True
