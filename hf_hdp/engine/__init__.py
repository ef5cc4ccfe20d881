"""The one engine behind every front door (HDPTrainer, HDPAccelerator, HDPSFTTrainer).

:mod:`.step` runs one rank's part of an optimizer step (:class:`~.step.StepEngine`: the plan check, the
skip of a batch without labels, the micro-batches, the loss over the global label count, the gradient
reduction and the label recount); :mod:`.setup` prepares a model and plans its steps; :mod:`.loss` is the
chunked LM head and loss; :mod:`.zero` and :mod:`.fsdp` shard the optimizer and the model;
:mod:`.offload` moves activations to host memory.
"""

from .setup import enable_hdp_attention, hdp_cost_model, hdp_step_loader, refuse_wrapped
from .step import StepEngine, StepResult, forward_micro_batch, hdp_loss, run_micro_batches

__all__ = [
    "StepEngine",
    "StepResult",
    "enable_hdp_attention",
    "forward_micro_batch",
    "hdp_cost_model",
    "hdp_loss",
    "hdp_step_loader",
    "refuse_wrapped",
    "run_micro_batches",
]
