"""One rank's part of an HDP step: forward (and backward) of its packed micro-batches, in slot order.

Shared by :class:`~hf_hdp.trainer.HDPTrainer`'s training step, its evaluation loop, the tests and
the benchmarks. The loss is token-level: a micro-batch's summed token losses over the label-token
count of the whole global batch, computed from labels the collator already shifted.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data.documents import IGNORE_INDEX
from ..data.loader import move_to
from ..mesh import DynamicMesh
from .loss import chunked_head
from .offload import ActivationOffloader


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
