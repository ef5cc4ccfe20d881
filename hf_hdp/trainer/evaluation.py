"""HDP evaluation: the eval set's token-level loss, equal to what one device computes.

``trainer.evaluate()`` keeps Trainer's own ``evaluate`` (multiple eval sets, speed metrics, logging,
``on_evaluate`` callbacks, memory metrics); HDPTrainer replaces only the two pieces under it:

- ``get_eval_dataloader`` -> :func:`eval_dataloader`: the eval set planned in global batches with
  the training machinery (length column, :class:`GlobalBatchSampler` *without shuffling*, the same
  planner and ``tokens_per_rank``), one item per global batch holding only this rank's micro-batches;
- ``evaluation_loop`` -> :func:`hdp_evaluation_loop`: forward only, under ``torch.no_grad``, through
  the ``"hdp"`` attention (ring P2P for split samples, in slot order as in training), summing this
  rank's token losses and label tokens; one bounded sum of ``[loss sum, label tokens]`` over the mesh at the end.

``eval_loss`` is that sum over the count: the per-token mean over the whole eval set, which is
what one process running every sample alone gets, whatever the placement or world size. (Stock
Trainer averages per-batch means instead, which weighs tokens of short batches more.)

The global eval batch is ``per_device_eval_batch_size x world_size`` samples, Trainer's own eval
batch. Any value gives the same loss; it only sets how many samples one plan places at once.
Predictions are not gathered: packed and split samples have no per-sample logits to return, so
``compute_metrics`` is refused when the trainer is built (unless ``prediction_loss_only=True``).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.trainer_utils import EvalLoopOutput

from ..data.documents import IGNORE_INDEX
from ..data.loader import GlobalBatchSampler, HDPDataLoader
from .step import forward_micro_batch


def eval_dataloader(trainer, measured) -> HDPDataLoader:
    """The eval set as HDP steps: unshuffled global batches of ``eval_batch_size x world`` samples."""
    sampler = GlobalBatchSampler(
        len(measured), trainer.args.per_device_eval_batch_size * trainer.mesh.world_size, shuffle=False,
        drop_last=False,
    )
    return trainer.hdp_step_loader(measured, sampler)


@contextlib.contextmanager
def _eval_context(trainer):
    with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
        yield


def hdp_evaluation_loop(trainer, dataloader: HDPDataLoader, metric_key_prefix: str = "eval") -> EvalLoopOutput:
    """Forward every micro-batch of this rank, then ONE all-reduce; returns ``{prefix}_loss``.

    The loss of a micro-batch comes from ``trainer.compute_loss`` with ``num_items_in_batch=1``,
    i.e. the sum of its token losses, so a ``compute_loss`` override is honoured.
    """
    args, mesh = trainer.args, trainer.mesh
    model = trainer.model
    model.eval()
    if hasattr(trainer.optimizer, "eval") and callable(trainer.optimizer.eval):
        trainer.optimizer.eval()  # schedule-free optimizers evaluate at their averaged weights
    trainer.callback_handler.eval_dataloader = dataloader
    loss_sum = torch.zeros((), dtype=torch.float64, device=args.device)
    label_tokens = torch.zeros((), dtype=torch.float64, device=args.device)
    planned_tokens = 0
    with torch.no_grad():
        for inputs in dataloader:
            step = inputs["hdp_step"]
            if trainer.hdp_config.check_plan_hash:
                mesh.check_plan(step.fingerprint, trainer.state.global_step)
            planned_tokens += step.num_loss_tokens
            for batch in step.micro_batches:
                loss, batch = forward_micro_batch(
                    model, batch, 1, mesh, trainer.hdp_config.attention_backend, args.device,
                    loss_fn=trainer.compute_loss, context=lambda: _eval_context(trainer),
                )
                loss_sum += loss.detach().double()
                label_tokens += (batch["labels"] != IGNORE_INDEX).sum()
            trainer.control = trainer.callback_handler.on_prediction_step(args, trainer.state, trainer.control)
    total_loss, count = mesh.sum_scalars([float(loss_sum), float(label_tokens)], "evaluation loss sum",
                                         trainer.state.global_step)
    count = int(round(count))
    if count != planned_tokens:
        raise RuntimeError(
            f"HDP evaluation counted {count} label tokens over all ranks but the eval set's length columns "
            f"promise {planned_tokens}; the ranks did not evaluate the same samples."
        )
    metrics = {f"{metric_key_prefix}_loss": total_loss / count}
    return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics,
                          num_samples=dataloader.dataset.sampler.num_samples)
