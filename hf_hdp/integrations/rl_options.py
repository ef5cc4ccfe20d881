"""The options of TRL's RL trainers (and of HDPConfig) that HDP's RL trainers cannot honour, each refused at
construction with its reason and fix (:mod:`hf_hdp.integrations.rl`)."""

from __future__ import annotations

from ..config import HDPConfig


def refuse_rl_args(args, hdp_config: HDPConfig, name: str) -> None:
    """The TRL and HDP options an HDP RL trainer cannot honour, each refused with its reason and fix."""
    if hdp_config.long_sample_policy != "error":
        raise ValueError(
            f"HDPConfig.long_sample_policy={hdp_config.long_sample_policy!r} is not supported by {name}: "
            "truncating or dropping a rollout would change TRL's loss. Leave it at 'error' and bound "
            "max_completion_length (a rollout may span all ranks: world_size * tokens_per_rank tokens)."
        )
    if hdp_config.loss_chunk_tokens not in (None, 1024):
        raise ValueError(
            f"HDPConfig.loss_chunk_tokens={hdp_config.loss_chunk_tokens} is not used by {name}: the "
            "log-probabilities come from TRL's fused LM head, which chunks the vocabulary projection "
            "itself. Leave loss_chunk_tokens at its default."
        )
    if args is None:
        return
    world = getattr(args, "world_size", 1)
    if hdp_config.global_batch_size not in (None, args.per_device_train_batch_size * world):
        raise ValueError(
            f"HDPConfig.global_batch_size={hdp_config.global_batch_size} cannot be honoured by {name}: "
            "each rank generates per_device_train_batch_size rollouts per step, so the global batch is "
            f"per_device_train_batch_size x world_size = {args.per_device_train_batch_size * world}. "
            "Leave global_batch_size unset and set per_device_train_batch_size."
        )
    checks = [
        (
            getattr(args, "use_vllm", False),
            "use_vllm=True",
            "vLLM generation is not supported (untested with HDP's passes); generate with transformers (use_vllm=False)",
        ),
        (
            getattr(args, "use_liger_kernel", False),
            "use_liger_kernel=True",
            (
                "Liger's kernels and GRPO loss replace the forward and the loss that HDP runs over packed, split rollouts; "
                "set use_liger_kernel=False"
            ),
        ),
        (
            getattr(args, "entropy_coef", 0.0) or getattr(args, "use_adaptive_entropy", False),
            "entropy_coef / use_adaptive_entropy",
            (
                "the entropy bonus differentiates the entropies, which HDP's loss pass does not carry; set entropy_coef=0.0 "
                "and use_adaptive_entropy=False"
            ),
        ),
        (
            args.gradient_accumulation_steps != 1,
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}",
            (
                "HDP runs a rank's whole generation batch as one step, whatever its lengths; set it to 1 and raise "
                "per_device_train_batch_size to the rollouts per rank and optimizer step"
            ),
        ),
        (
            getattr(args, "steps_per_generation", 1) not in (None, 1),
            f"steps_per_generation={getattr(args, 'steps_per_generation', None)}",
            (
                "each generation batch is one HDP optimizer step; set steps_per_generation=1 (and generation_batch_size "
                "unset)"
            ),
        ),
        (bool(getattr(args, "deepspeed", None)), "deepspeed", "HDP reduces the gradients itself; remove deepspeed"),
        (
            bool(getattr(args, "fsdp", None)),
            f"fsdp={getattr(args, 'fsdp', None)!r}",
            (
                "FSDP2 shards the weights, and a sharded model's every forward is a collective: TRL's generation runs a "
                "different number of decoding forwards per rank (rollouts end at different lengths) and HDP's passes run a "
                "different number of micro-batches per rank, so the per-layer weight gathers would not match up. Remove "
                "fsdp; HDPConfig(zero_stage=1 or 2) shards the optimizer states (and gradients) instead"
            ),
        ),
    ]
    for bad, option, why in checks:
        if bad:
            raise ValueError(f"{name}: {option} cannot be honoured: {why}.")
