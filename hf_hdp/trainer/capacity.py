"""``HDPConfig(tokens_per_rank="auto")``: HDPTrainer's capacity ``C`` from the memory of one rank.

HDPTrainer resolves it once, when it is built, before it measures the dataset against ``C``
(:func:`resolve_tokens_per_rank`), into a copy of the config; the user's ``HDPConfig`` keeps
``"auto"``. ``C`` is the largest token count whose estimated peak
(:func:`~hf_hdp.planning.cost.memory_breakdown`) fits the budget less a 10% reserve
(:data:`RESERVE_FRACTION`), from what the trainer knows:

- the budget: ``HDPConfig.memory_budget_gb``, or on CUDA the device's free memory plus what this
  process's caching allocator already holds (Trainer has put the model's weights there, and the
  estimate counts them), the smallest over the ranks, so that every rank plans with the same ``C``.
  On the CPU there is no device memory to measure: ``memory_budget_gb`` must be given;
- the model: :meth:`~hf_hdp.planning.cost.ModelSpec.from_config`, its exact parameter counts (all,
  and trainable: a PEFT model's gradients and optimizer states are its adapters');
- bytes per weight and gradient: the parameters' dtypes; per optimizer state, ``TrainingArguments.optim``
  (:func:`optimizer_state_bytes`); activations in bf16/fp16 under ``bf16``/``fp16`` autocast, else in
  the model dtype;
- sharding: ``HDPConfig.zero_stage`` and the FSDP mode of ``TrainingArguments.fsdp``
  (:func:`~hf_hdp.engine.fsdp.fsdp_mode`, given by HDPTrainer) as
  :func:`~hf_hdp.planning.sharding.resolve_sharding` resolves them;
- ``TrainingArguments.activation_checkpointing`` / ``gradient_checkpointing`` (or a model with
  checkpointing on; every layer is counted as recomputed, ``every_n_layers`` is not modelled),
  ``HDPConfig.offload_ratio`` (a number; ``"auto"`` promises no saving and counts as 0) and
  ``HDPConfig.loss_chunk_tokens`` (when HDP's chunked loss applies to the model: no
  ``compute_loss_func``, a head :func:`~hf_hdp.engine.loss.chunked_head` accepts).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ..engine.loss import chunked_head
from ..engine.offload import run_recomputes_layers
from ..models import hdp_base_model
from ..planning.cost import MemoryBreakdown, ModelSpec, memory_breakdown, tokens_per_rank_for_memory
from ..planning.cost.memory import fmt_gb
from ..planning.sharding import resolve_sharding

logger = logging.getLogger(__name__)

RESERVE_FRACTION = 0.1


@dataclass(frozen=True)
class Capacity:
    """The ``C`` that ``tokens_per_rank="auto"`` chose, the budget it fits and the estimate at that ``C``."""

    tokens_per_rank: int
    budget_bytes: float
    source: str  # where the budget came from
    breakdown: MemoryBreakdown
    settings: dict  # the memory_breakdown inputs

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return (
            f"tokens_per_rank='auto' -> C = {self.tokens_per_rank:,} tokens for {fmt_gb(self.budget_bytes)} "
            f"per rank ({self.source}; {RESERVE_FRACTION:.0%} kept back). Estimated peak: "
            f"{self.breakdown.describe()} [{settings}]"
        )


def optimizer_state_bytes(optim, param_bytes: float, optim_args: str | None = None) -> float:
    """Bytes of optimizer state per trainable parameter for a ``TrainingArguments.optim`` name.

    AdamW and the other Adam variants keep two moments in the parameter dtype (``2 · param_bytes``);
    8-bit optimizers one byte per moment; Lion, Adagrad and RMSprop one state; SGD none unless
    ``optim_args`` sets a momentum; Adafactor factors its second moment (rows + columns: counted as
    0); AdEMAMix three. Any other name (and an optimizer passed as ``optimizers=``) is counted as Adam.
    """
    name = str(getattr(optim, "value", optim)).lower()
    if "8bit" in name:
        return 1.0 if "lion" in name else 2.0
    if name.startswith("sgd"):
        return float(param_bytes) if optim_args and "momentum" in optim_args else 0.0
    if name.startswith(("lion", "adagrad", "rmsprop")):
        return float(param_bytes)
    if name.startswith("adafactor"):
        return 0.0
    if name.startswith("ademamix"):
        return 3.0 * param_bytes
    return 2.0 * param_bytes


def memory_budget_bytes(config, device: torch.device, world_size: int) -> tuple[float, str]:
    """``(bytes, where they come from)``: ``memory_budget_gb``, or CUDA's free memory (smallest over the ranks)."""
    if config.memory_budget_gb is not None:
        return config.memory_budget_gb * 1e9, "HDPConfig.memory_budget_gb"
    if device.type != "cuda":
        raise ValueError(
            f"HDPConfig(tokens_per_rank='auto') sizes C from a rank's device memory, but this trainer runs on "
            f"{device.type}, whose free memory says nothing about what a rank may use. Set "
            "HDPConfig(memory_budget_gb=...) (the memory one rank may use, in GB), or an integer tokens_per_rank."
        )
    free, _ = torch.cuda.mem_get_info(device)
    budget = torch.tensor([float(free + torch.cuda.memory_reserved(device))], dtype=torch.float64, device=device)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(budget, op=torch.distributed.ReduceOp.MIN)
    source = "CUDA free memory" + (f", the smallest of {world_size} ranks" if world_size > 1 else "")
    return float(budget.item()), source


def resolve_tokens_per_rank(config, model, args, world_size: int, *, fsdp: str | None = None, loss_func=None):
    """``(config with an integer tokens_per_rank, Capacity)`` for a config whose ``tokens_per_rank`` is "auto".

    ``fsdp``: the run's FSDP mode (``"shard_grad_op"``, ``"full_shard"`` or None), as
    :func:`~hf_hdp.engine.fsdp.fsdp_mode` read it from ``TrainingArguments`` (HDPTrainer clears
    ``args.fsdp`` for Trainer afterwards, so it is passed here). ``loss_func``: the trainer's
    ``compute_loss_func`` (with one, the full logits are counted). The returned config is a
    ``dataclasses.replace`` copy (``memory_budget_gb`` cleared: it was used);
    ``config`` itself is not changed. A budget that holds no token is refused naming the model states'
    size and what would shrink them (:func:`~hf_hdp.planning.cost.tokens_per_rank_for_memory`).
    """
    base = hdp_base_model(model)
    device = torch.device(args.device)
    budget, source = memory_budget_bytes(config, device, world_size)
    mixed = bool(args.bf16 or args.fp16)
    try:
        spec = ModelSpec.from_config(
            base.config, name=type(base).__name__, bytes_per_value=2 if mixed else base.dtype.itemsize
        )
    except (AttributeError, TypeError) as err:
        raise ValueError(
            f"HDPConfig(tokens_per_rank='auto'): {type(base).__name__}'s config lacks the shape fields the memory "
            f"estimate needs ({err}). Set an integer tokens_per_rank."
        ) from None
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    n_trainable = sum(p.numel() for p in trainable)
    weight_bytes = sum(p.numel() * p.element_size() for p in params) / max(n_params, 1)
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable) / max(n_trainable, 1)
    zero_stage, fsdp = resolve_sharding(
        config.zero_stage, fsdp, world_size, zero_name="HDPConfig.zero_stage", fsdp_name="TrainingArguments.fsdp"
    )
    chunk = config.loss_chunk_tokens if loss_func is None and chunked_head(model) is not None else None
    settings = dict(
        world_size=world_size,
        zero_stage=zero_stage,
        fsdp=fsdp,
        checkpointing=run_recomputes_layers(args, model),
        offload_ratio=0.0 if config.offload_ratio == "auto" else float(config.offload_ratio),
        loss_chunk_tokens=chunk,
        weight_bytes=weight_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_state_bytes(args.optim, grad_bytes, getattr(args, "optim_args", None)),
        params=n_params,
        trainable_params=n_trainable,
    )
    try:
        c = tokens_per_rank_for_memory(spec, budget, reserve_fraction=RESERVE_FRACTION, **settings)
    except ValueError as err:
        raise ValueError(
            f"HDPConfig(tokens_per_rank='auto') with {fmt_gb(budget)} per rank ({source}): {err}"
        ) from None
    breakdown = memory_breakdown(spec, c, reserve=budget * RESERVE_FRACTION, **settings)
    capacity = Capacity(c, budget, source, breakdown, settings)
    logger.info("hf_hdp: %s", capacity.describe())
    return dataclasses.replace(config, tokens_per_rank=c, memory_budget_gb=None), capacity
