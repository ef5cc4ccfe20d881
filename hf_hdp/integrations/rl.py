"""TRL's GRPO and RLOO with Hybrid Data Parallelism: :class:`HDPGRPOTrainer`, :class:`HDPRLOOTrainer`.

    from trl import GRPOConfig
    from hf_hdp import HDPConfig
    from hf_hdp.integrations.rl import HDPGRPOTrainer

    trainer = HDPGRPOTrainer(model, reward_funcs=reward, args=GRPOConfig(..., per_device_train_batch_size=8),
                             train_dataset=prompts, hdp_config=HDPConfig(tokens_per_rank=16384))
    trainer.train()

They *are* TRL's trainers: prompt handling, generation, reward functions, advantages, the loss
formulas of every ``loss_type`` and the logged metrics are TRL's own code. HDP takes over the passes
over rollouts, each one HDP step over the global batch of rollouts (:mod:`.rollouts`): the rollout
lengths of all ranks are gathered, the step is planned (balanced, per-sample groups; a rollout
longer than ``tokens_per_rank`` is split over several ranks and runs with ring attention), each
rollout's token ids move to the ranks of its pieces over the global group's bounded P2P, and
per-token results come back to the rollout's owner.

- **Forward-only passes** (old-policy log-probabilities for ``num_iterations > 1``, the reference
  model's for ``beta > 0``, evaluation): ``_get_per_token_logps_and_entropies`` runs the model's
  fused LM head (TRL's, with its temperature and ``cast_lm_head_to_fp32``) over HDP micro-batches
  and returns the same ``[B, completion]`` tensors as stock on each owner.
- **The policy's loss and gradient** (:meth:`training_step`), exact for every loss: TRL's loss
  depends on the weights only through the per-token log-probabilities ``l_t`` of the completion
  tokens (entropies enter only as masks and metrics). So the step (1) computes ``l`` and the
  entropies with a forward-only HDP pass, (2) runs TRL's own ``_compute_loss`` on the owner with
  ``l`` as a leaf tensor (every metric, clip ratio, KL, per-sequence importance weight, entropy
  quantile and normalisation is TRL's code on the same numbers) and takes ``g_t = dL/dl_t``,
  scaled from stock's per-rank loss to the one-process loss (see below), (3) sends each ``g_t`` to
  the rank that holds token ``t`` and runs HDP's forward and backward of ``sum_t g_t * l_t``
  through the step engine (:class:`~hf_hdp.engine.step.StepEngine`: one bucketed gradient
  reduction, the label recount). Its gradient is ``sum_t dL/dl_t * dl_t/dtheta = dL/dtheta``
  exactly, however the rollouts were cut into pieces and placed. The price is one extra
  forward-only pass per step (about a third of a step's compute).

The one-process loss: every ``loss_type`` is a sum over completion tokens of ``w_t * term_t``:

==================  ==========================================  =============================================
loss_type           stock weight on rank ``r`` (DDP averages)   HDP (one process, global batch of N rollouts)
==================  ==========================================  =============================================
grpo, sapo          ``1 / (|o_i| * B)``, averaged: ``1/(|o_i| N)``  same
luspo               ``1 / B`` per sequence sum                   same (``1 / N``)
dr_grpo             ``1 / (B * max_completion_length)``          same (``1 / (N * max_completion_length)``)
dapo, cispo, vespo  ``W / n_total``, averaged: ``1 / n_total``   same
bnpo                ``1 / n_r`` (rank r's tokens), averaged       ``1 / n_total``: the per-rank count depends on
                                                                  how the batch was cut; HDP follows one process
==================  ==========================================  =============================================

(``n`` counts completion tokens under the loss mask, tool masks included.) Sequence-level terms
(``importance_sampling_level="sequence"``, VESPO's and the off-policy mask's per-sequence sums,
``top_entropy_quantile`` over the global batch) are computed by TRL's code on whole sequences on the
owner, so they need no cross-rank sum inside a rollout. The reported ``loss`` is the one-process loss.

Positions: stock's training forward numbers a left-padded prompt from its padding; generation and
HDP number every rollout from its first real token (equal when prompts are not padded).

Model states as HDPTrainer's: the optimizer is sharded at ZeRO stage 1 or 2 (``HDPConfig.zero_stage``; unset:
1 on several ranks; checkpoints then sharded and atomic, :mod:`hf_hdp.trainer.saving`), gradient clipping takes
the whole gradient's norm, activation offloading (``offload_ratio``) applies to the loss pass, and
``tokens_per_rank="auto"`` sizes C from one rank's memory less the reference model's weights. The weights stay
replicated (the reference model's too); a global batch without a completion token steps the optimizer on zero
gradients, as stock does.

Refused at construction, each naming the option: ``use_vllm``, ``use_liger_kernel``, vision inputs,
a MoE router auxiliary loss, ``entropy_coef``/``use_adaptive_entropy`` (the bonus's gradient flows
through the entropies), ``gradient_accumulation_steps``/``steps_per_generation`` other than 1 (HDP
runs a rank's whole generation batch as one step), DeepSpeed, FSDP (a sharded model's every forward is a
collective, and generation and HDP's passes run different numbers of forwards per rank). See ``docs/rl.md``
for the full table.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

try:
    from trl import GRPOTrainer, RLOOTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("hf_hdp.integrations.rl needs TRL: pip install 'trl>=1.16'") from err

from ..accelerator import HDPAccelerator
from ..collators.collator import HDPCollator
from ..config import HDPConfig
from ..data.loader import HDPStep
from ..distributed.launch import check_distributed_setup
from ..distributed.mesh import DynamicMesh
from ..engine.offload import ActivationOffloader
from ..engine.setup import enable_hdp_attention, hdp_cost_model
from ..engine.state import has_sharded
from ..engine.step import StepEngine, forward_micro_batch
from ..engine.zero import shard_optimizer, unwrap_zero
from ..models import hdp_base_model, model_heads
from ..planning import get_planner
from ..trainer.capacity import memory_budget_bytes, resolve_tokens_per_rank
from ..trainer.saving import load_scheduler, load_sharded_checkpoint, save_checkpoint
from .rl_options import refuse_rl_args
from .rollouts import RolloutStep, beside_packed, build_rollout_step, local_rollouts, moves_to_pieces, route, to_owner

logger = logging.getLogger(__name__)


class _HDPRolloutPasses:
    """What HDP changes in a TRL RL trainer (GRPO, RLOO): the mesh, the passes over rollouts, the step."""

    _hdp_name = "HDP RL trainer"

    def _hdp_setup(self, args, hdp_config: HDPConfig | None, model) -> None:
        """Before TRL's ``__init__``: the config, the refusals, the "hdp" attention on an instance."""
        self.hdp_config = hdp_config if hdp_config is not None else HDPConfig()
        if not isinstance(self.hdp_config, HDPConfig):
            raise TypeError(
                f"{self._hdp_name}(hdp_config=...) takes an hf_hdp.HDPConfig, got {type(self.hdp_config).__name__}"
            )
        refuse_rl_args(args, self.hdp_config, self._hdp_name)
        if args is not None:
            check_distributed_setup(args)
        self._hdp_given = None  # (log-probs leaf, entropies) that _compute_loss reads during the loss pass
        self.hdp_fsdp_modules: list = []  # never sharded (FSDP is refused); the checkpoint code reads it
        self.hdp_capacity = None  # tokens_per_rank="auto": how C was sized (hf_hdp.trainer.capacity.Capacity)
        if not isinstance(model, str):
            enable_hdp_attention(model, self.hdp_config.state_split)  # a reference model copies the attention

    def _hdp_finish(self) -> None:
        """After TRL's ``__init__``: refusals of what TRL decided, the reference model, planner and engine."""
        if getattr(self, "_is_vlm", False):
            raise ValueError(
                f"{self._hdp_name}: vision-language models and image inputs cannot be honoured: HDP "
                "packs text-only rollouts. Use the stock trainer for them."
            )
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"{self._hdp_name}: the MoE router auxiliary loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}) is not computed over packed, split rollouts; set "
                "router_aux_loss_coef=0.0 in the config."
            )
        base = enable_hdp_attention(self.model, self.hdp_config.state_split)
        if getattr(self, "ref_model", None) is not None:
            enable_hdp_attention(self.ref_model, self.hdp_config.state_split)
        if self.hdp_config.tokens_per_rank == "auto":
            self.hdp_config, self.hdp_capacity = self._hdp_resolve_capacity()
        cfg = self.hdp_config
        self.hdp_collator = HDPCollator(vocab_size=base.get_input_embeddings().num_embeddings)
        self.hdp_cost_model, _ = hdp_cost_model(
            base, cfg, self.args.device, bool(self.args.bf16 or self.args.fp16), bool(self.args.gradient_checkpointing)
        )
        self.hdp_planner = get_planner(cfg.planner, self.hdp_cost_model, attention_split=cfg.attention_split)
        self.hdp_num_heads = model_heads(base.config)
        # activation offloading acts on the loss pass only: the forward-only passes save no activation
        self.hdp_offload = ActivationOffloader.from_config(cfg, cost_model=lambda: self.hdp_cost_model)
        self.hdp_engine = StepEngine(
            self.mesh,
            cfg,
            backward=self.accelerator.backward,
            autocast=self.accelerator.autocast,
            offload=self.hdp_offload,
            collator=self.hdp_collator,
        )
        self.hdp_history: list[dict] = []  # per step: the plan's figures and this rank's CPU seconds

    def _hdp_resolve_capacity(self):
        """``tokens_per_rank="auto"``: C from one rank's memory
        (:func:`~hf_hdp.trainer.capacity.resolve_tokens_per_rank`, HDPTrainer's estimate of the policy's states
        and activations), after taking the reference model's weights (``beta > 0`` without PEFT), which stay
        resident beside the policy, out of the budget. Generation's KV cache is freed before the passes over
        rollouts and is not counted."""

        budget, source = memory_budget_bytes(self.hdp_config, torch.device(self.args.device), self.mesh.world_size)
        ref = getattr(self, "ref_model", None)
        ref_bytes = 0 if ref is None else sum(p.numel() * p.element_size() for p in ref.parameters())
        if ref_bytes >= budget:
            raise ValueError(
                f"{self._hdp_name}: HDPConfig(tokens_per_rank='auto'): the reference model's weights "
                f"({ref_bytes / 1e9:.3g} GB) do not fit the budget ({budget / 1e9:.3g} GB, {source}). "
                "Raise memory_budget_gb, use PEFT (the reference is the adapters off) or set beta=0."
            )
        config = dataclasses.replace(self.hdp_config, memory_budget_gb=(budget - ref_bytes) / 1e9)
        resolved, capacity = resolve_tokens_per_rank(config, self.model, self.args, self.mesh.world_size)
        logger.info(
            "hf_hdp: %s: tokens_per_rank = %d from %s (%s), less the reference model's %.3g GB.",
            self._hdp_name,
            resolved.tokens_per_rank,
            f"{budget / 1e9:.3g} GB",
            source,
            ref_bytes / 1e9,
        )
        return resolved, capacity

    def create_optimizer(self, model=None):
        """Trainer's optimizer (class, settings, parameter groups), sharded over the ranks at ZeRO stage 1 or 2
        (``HDPConfig.zero_stage``; unset: 1 on several ranks), as HDPTrainer's (:mod:`hf_hdp.engine.zero`)."""
        built_by_trainer = self.optimizer is None
        optimizer = super().create_optimizer(model)
        self.optimizer = shard_optimizer(
            optimizer, self.mesh, self.hdp_config.zero_stage, self.args, built_by_trainer=built_by_trainer
        )
        return self.optimizer

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint (model card, then Trainer's); with a sharded (ZeRO) optimizer HDPTrainer's sharded,
        atomic checkpoint instead (:func:`hf_hdp.trainer.saving.save_checkpoint`): each rank writes the optimizer
        state of the parameters it owns."""
        if unwrap_zero(self.optimizer) is None:
            return super()._save_checkpoint(model, trial)
        if self.args.hub_model_id is None:
            model_name = os.path.basename(os.path.normpath(self.args.output_dir))
        else:
            model_name = self.args.hub_model_id.split("/")[-1]
        self.create_model_card(model_name=model_name)
        save_checkpoint(self, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A sharded checkpoint is read by each rank for the parameters it owns now (any world size); a full
        ``optimizer.pt`` (ZeRO stage 0) by Trainer."""
        if checkpoint is None or not has_sharded(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_sharded_checkpoint(self, checkpoint, weights=False)
        load_scheduler(self, checkpoint)

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's Accelerator setup, then an HDPAccelerator (no DDP wrapper) carrying the dynamic mesh."""
        super().create_accelerator_and_postprocess()
        self.mesh = DynamicMesh(device=self.args.device, p2p_timeout_s=self.hdp_config.p2p_timeout_s)
        self.accelerator = HDPAccelerator.like(self.accelerator, self.mesh)

    # ------------------------------------------------------------------ forward-only passes
    def _hdp_step_of(self, input_ids, attention_mask, logits_to_keep) -> RolloutStep:
        rollouts = local_rollouts(input_ids, attention_mask, input_ids.size(1) - logits_to_keep)
        return build_rollout_step(
            self.mesh,
            rollouts,
            self.hdp_planner,
            self.hdp_config.tokens_per_rank,
            self.hdp_collator,
            self.state.global_step + 1,
            self.hdp_num_heads,
        )

    def _hdp_forward(self, model, batch, loss_fn):
        out, _ = forward_micro_batch(
            model,
            batch,
            0,
            self.mesh,
            self.hdp_config.attention_backend,
            self.mesh.device,
            loss_fn=loss_fn,
            context=self.accelerator.autocast,
        )
        return out

    def _hdp_logps(self, model, step: RolloutStep, logits_to_keep: int, entropy: bool):
        """Per-token log-probabilities (and entropies) of this rank's rollouts, ``[B, logits_to_keep]`` each,
        computed by HDP micro-batches wherever the plan put the pieces."""
        layout = step.layout
        held: dict[int, torch.Tensor] = {}
        for batch, runs in zip(step.micro_batches, step.runs):
            out = self._hdp_forward(model, batch, _fused_outputs)
            lp = out.log_probs[0].detach().double()
            en = out.entropy[0].detach().double() if entropy and out.entropy is not None else torch.zeros_like(lp)
            values = torch.stack([lp, en], dim=-1).to(self.mesh.device)
            at = 0
            for s, a, b in runs:
                buf = held.setdefault(
                    s, torch.zeros(layout.lengths[s], 2, dtype=torch.float64, device=self.mesh.device)
                )
                buf[a:b] = values[at : at + b - a]
                at += b - a
        owned = to_owner(self.mesh, step, held, (2,), torch.float64, "rollout log-probabilities")
        mine = layout.samples_of(self.mesh.rank)
        result = torch.zeros(len(mine), logits_to_keep, 2, dtype=torch.float64)
        for s in mine:
            p, n = layout.prompt_lengths[s], layout.lengths[s]
            result[layout.local[s], : n - p] = owned[s][p - 1 : n - 1].cpu()  # input t predicts token t + 1
        dtype = torch.float64 if hdp_base_model(model).dtype == torch.float64 else torch.float32
        return result[..., 0].to(dtype), (result[..., 1].to(dtype) if entropy else None)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """TRL's per-token log-probabilities of the completions, through HDP micro-batches (forward only).

        Inside the loss pass (:meth:`training_step`) it hands TRL's loss the log-probabilities computed for
        the step, as a leaf whose gradient the step carries back through HDP."""
        if self._hdp_given is not None:
            logps, entropies = self._hdp_given
            return logps, (entropies if compute_entropy else None), None
        used = sorted(k for k, v in multimodal.items() if v is not None)
        if used:
            raise ValueError(
                f"{self._hdp_name}: multimodal inputs ({', '.join(used)}) cannot be honoured: HDP "
                "packs text-only rollouts."
            )
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{self._hdp_name}: a pass over rollouts with gradients runs only inside "
                "training_step (HDP carries the loss's gradient itself); call this under "
                "torch.no_grad()."
            )
        step = self._hdp_step_of(input_ids, attention_mask, logits_to_keep)
        logps, entropies = self._hdp_logps(model, step, logits_to_keep, compute_entropy)
        return logps.to(input_ids.device), (None if entropies is None else entropies.to(input_ids.device)), None

    # ------------------------------------------------------------------ the loss pass
    def _hdp_scale(self, inputs) -> float:
        """From stock's per-rank loss (whose gradients DDP averages over W ranks) to this rank's share of
        the one-process loss: ``1 / W``, or ``n_r / n_total`` for a loss normalised by the rank's tokens."""
        return 1.0 / self.mesh.world_size

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's generation and scoring (``_prepare_inputs``), then one HDP optimizer step's forward and
        backward over the global batch of rollouts; returns this rank's share of the loss times W (Trainer
        logs the mean over ranks: the one-process loss)."""
        started = time.perf_counter()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        loss = self._hdp_loss_step(model, inputs)
        self._step += 1
        self._current_train_step_time += time.perf_counter() - started
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss

    def _hdp_loss_step(self, model, inputs) -> torch.Tensor:
        cpu = time.process_time()
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keep = completion_ids.size(1)
        step = self._hdp_step_of(input_ids, attention_mask, keep)
        with torch.no_grad():  # 1. the log-probabilities and entropies of the current policy
            logps, entropies = self._hdp_logps(model, step, keep, entropy=True)
        leaf = logps.to(completion_ids.device).requires_grad_(True)
        self._hdp_given = (leaf, entropies.to(completion_ids.device))
        try:  # 2. TRL's own loss and metrics on the owner, and its gradient per token
            loss = self._compute_loss(model, inputs)
        finally:
            self._hdp_given = None
        scale = self._hdp_scale(inputs)
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True) if loss.requires_grad else (None,)
        grad = torch.zeros_like(leaf) if grad is None else grad.detach()
        coefs = self._hdp_coefficients(step, grad.double().cpu() * scale)
        for batch, runs in zip(step.micro_batches, step.runs):  # 3. d loss / d l_t beside each packed token
            batch["hdp_coef"] = beside_packed(runs, coefs).to(torch.float64)
        layout = step.layout
        hstep = HDPStep(
            epoch=0,
            step=self.state.global_step,
            plan=step.plan,
            fingerprint=step.plan.fingerprint(),
            rows=list(range(len(layout.lengths))),
            micro_batches=step.micro_batches,
            num_loss_tokens=layout.num_loss_tokens,
            num_tokens=sum(layout.lengths),
            local_tokens=step.local_tokens,
            global_step=step.global_step,
        )
        result = self.hdp_engine.run(model, hstep, _surrogate_loss, [self.optimizer])
        if result.skipped:  # no completion token in the global batch (all masked): stock's gradient is zero
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        self.hdp_history.append(
            {
                "step": step.global_step,
                "local_tokens": step.local_tokens,
                "micro_batches": len(step.micro_batches),
                "bytes_sent": result.bytes_sent,
                "cpu_s": time.process_time() - cpu,
                "max_group": max((len(p.group) for mb in step.plan.micro_batches for p in mb.pieces), default=1),
            }
        )
        return (loss.detach() * scale * self.mesh.world_size).float()

    def _hdp_coefficients(self, step: RolloutStep, grad: torch.Tensor) -> dict[int, torch.Tensor]:
        """``g_t`` at each rollout's input positions (input ``t`` scores token ``t + 1``), moved to the pieces."""
        layout, rank = step.layout, self.mesh.rank
        per_sample = {}
        for s in layout.samples_of(rank):
            p, n = layout.prompt_lengths[s], layout.lengths[s]
            values = torch.zeros(n, dtype=torch.float64)
            values[p - 1 : n - 1] = grad[layout.local[s], : n - p]
            per_sample[s] = values
        got = route(
            self.mesh,
            moves_to_pieces(step.plan, layout),
            per_sample,
            layout.lengths,
            (),
            torch.float64,
            "rollout loss coefficients",
            step.global_step,
        )
        return {s: buf.cpu() for (s, _), buf in got.items()}


def _fused_outputs(model, batch, num_items_in_batch=None):
    """The fused LM head's per-token outputs of a packed micro-batch (HDP's labels are already shifted)."""
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        hdp_metadata=batch["hdp_metadata"],
        shift_labels=batch["labels"],
        fused_lm_head=True,
    )


def _surrogate_loss(model, batch, num_items_in_batch=None):
    """``sum_t g_t * l_t`` of a micro-batch: its gradient is the loss's gradient through these tokens."""
    out = _fused_outputs(model, batch)
    coef = batch["hdp_coef"].to(out.log_probs.device)
    return (out.log_probs.double() * coef).sum()


class HDPGRPOTrainer(_HDPRolloutPasses, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with Hybrid Data Parallelism (module docstring: what is honoured, and why exact).

    Takes GRPOTrainer's arguments plus ``hdp_config`` (:class:`~hf_hdp.HDPConfig`)."""

    _hdp_name = "HDPGRPOTrainer"
    _tag_names = ["trl", "grpo", "hf_hdp"]

    def __init__(
        self,
        model,
        reward_funcs=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        *,
        hdp_config: HDPConfig | None = None,
    ):
        self._hdp_setup(args, hdp_config, model)
        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self._hdp_finish()

    def _hdp_scale(self, inputs) -> float:
        if self.loss_type != "bnpo":
            return 1.0 / self.mesh.world_size
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        total = float(inputs["num_items_in_batch"])  # TRL's global count of loss tokens
        return float(mask.sum()) / total if total > 0 else 0.0


class HDPRLOOTrainer(_HDPRolloutPasses, RLOOTrainer):
    """TRL's ``RLOOTrainer`` with Hybrid Data Parallelism. Its loss is a mean over the N rollouts of a
    per-sequence clipped term of the summed completion log-probabilities: stock's per-rank mean over B,
    averaged over W ranks, is the one-process mean, and HDP's step gives its exact gradient the same
    way as :class:`HDPGRPOTrainer`'s.

    Takes RLOOTrainer's arguments plus ``hdp_config`` (:class:`~hf_hdp.HDPConfig`)."""

    _hdp_name = "HDPRLOOTrainer"
    _tag_names = ["trl", "rloo", "hf_hdp"]

    def __init__(
        self,
        model,
        reward_funcs,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        hdp_config: HDPConfig | None = None,
    ):
        self._hdp_setup(args, hdp_config, model)
        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._hdp_finish()


__all__ = ["HDPGRPOTrainer", "HDPRLOOTrainer", "refuse_rl_args"]
