"""The ``TrainingArguments`` an :class:`~hf_hdp.config.HDPConfig` contradicts, or that HDP would silently ignore:
one function per setting, each taking the HDPConfig and the arguments and returning the error (naming both
settings and the fix) or None.
:meth:`HDPConfig.check_training_args <hf_hdp.config.HDPConfig.check_training_args>` runs
:data:`TRAINING_ARGS_CHECKS` in order."""

from __future__ import annotations


def _batch_settings(config, args) -> str | None:
    accum = getattr(args, "gradient_accumulation_steps", 1) or 1
    if config.global_batch_size is not None and accum > 1:
        return (
            f"HDPConfig.global_batch_size={config.global_batch_size} and "
            f"TrainingArguments.gradient_accumulation_steps={accum} both set the "
            "batch; HDP accumulates micro-batches itself. Set gradient_accumulation_steps=1 or leave "
            "global_batch_size unset."
        )
    if getattr(args, "auto_find_batch_size", False):
        return (
            "TrainingArguments.auto_find_batch_size=True contradicts HDP: it lowers per_device_train_batch_size "
            "after an out-of-memory error, which under HDP changes the global batch (the training itself) but "
            "not a rank's memory. Set auto_find_batch_size=False and bound memory with "
            "HDPConfig.tokens_per_rank (hf_hdp.planning.tokens_per_rank_for_memory estimates it)."
        )
    return None


def _sampling(config, args) -> str | None:
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy not in (None, "random"):
        return (
            f"TrainingArguments.train_sampling_strategy={strategy!r} contradicts HDP: HDPTrainer draws every "
            "global batch in a seeded random order (seed and epoch only) and its planner balances the "
            "sample lengths over ranks itself, so this setting would be ignored. Set "
            "train_sampling_strategy='random' (the default)."
        )
    if getattr(args, "group_by_length", False):  # older transformers
        return (
            "TrainingArguments.group_by_length=True contradicts HDP: its planner balances the sample lengths "
            "over ranks itself, and the global batch is drawn in a seeded random order. Set group_by_length=False."
        )
    return None


def _loss(config, args) -> str | None:
    smoothing = getattr(args, "label_smoothing_factor", 0.0) or 0.0
    if smoothing > 0:
        return (
            f"TrainingArguments.label_smoothing_factor={smoothing} would be ignored: HDPTrainer computes its "
            "own token-level cross-entropy over the global batch, without label smoothing. Set "
            "label_smoothing_factor=0."
        )
    if getattr(args, "use_liger_kernel", False):
        return (
            "TrainingArguments.use_liger_kernel=True is not supported by HDPTrainer: Liger's fused linear "
            "cross-entropy replaces the model's forward and divides by its own batch's label count, while "
            "HDP calls the model without labels and computes a chunked cross-entropy over the GLOBAL batch's "
            "label count itself (HDPConfig.loss_chunk_tokens: the full logits never exist either); Liger's "
            "other kernels need CUDA and triton and have not been verified under HDP's packed, split "
            "sequences. Set use_liger_kernel=False."
        )
    if getattr(args, "average_tokens_across_devices", True) is False and getattr(args, "world_size", 1) > 1:
        return (
            "TrainingArguments.average_tokens_across_devices=False makes stock Trainer divide each device's loss "
            "by that device's own label count; HDP places samples by cost, not by device, and always divides by "
            "the label count of the whole global batch (what one device running the batch computes). Set "
            "average_tokens_across_devices=True (the default)."
        )
    return None


def _parallelism(config, args) -> str | None:
    if getattr(args, "deepspeed", None):
        return (
            "TrainingArguments.deepspeed is set, but HDPTrainer shards the model states itself: "
            "HDPConfig(zero_stage=1 or 2) for ZeRO stages 1 and 2, TrainingArguments(fsdp='full_shard') for "
            "FSDP2 with sharded weights (hf_hdp.engine.fsdp). DeepSpeed's engine reduces gradients per "
            "micro-batch, which deadlocks when ranks run different numbers of micro-batches. Unset deepspeed."
        )
    if getattr(args, "fsdp", None):
        return (
            "TrainingArguments.fsdp is set: HDPTrainer applies FSDP2 itself (hf_hdp.engine.fsdp), in its own "
            "step; a custom loop must use HDPConfig(zero_stage=1 or 2) instead, or pass the arguments to "
            "HDPTrainer."
        )
    pc = getattr(args, "parallelism_config", None)
    axes = ("cp_size", "tp_size", "sp_size", "dp_shard_size")
    sizes = {} if pc is None else {k: getattr(pc, k, 1) or 1 for k in axes}
    used = {k: v for k, v in sizes.items() if v > 1}
    if used:
        return (
            f"TrainingArguments.parallelism_config sets {used}, but HDP is itself the data and context "
            "parallelism: every rank holds the whole model and long samples are split over as many ranks "
            "as they need, per step. Drop parallelism_config (HDP needs no cp_size)."
        )
    return None


#: run in this order by HDPConfig.check_training_args; each returns the error for the first contradiction it finds
TRAINING_ARGS_CHECKS = (_batch_settings, _sampling, _loss, _parallelism)
