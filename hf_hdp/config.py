"""HDPConfig: every HDP setting in one validated dataclass.

It parses with ``HfArgumentParser`` beside ``TrainingArguments``::

    parser = HfArgumentParser((TrainingArguments, HDPConfig))
    training_args, hdp_config = parser.parse_args_into_dataclasses()   # --tokens_per_rank 8192 ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .planning import HARDWARE_PRESETS, PLANNERS
from .planning.cost.recurrent import MODES as STATE_SPLITS
from .planning.splits import HEAD_PARALLEL, SPLITS
from .training_checks import TRAINING_ARGS_CHECKS

BACKEND_CHOICES = ("auto", "flash_attn", "torch_varlen", "cpu_flash", "reference")
LONG_SAMPLE_POLICIES = ("error", "truncate", "drop")
FUSED_BACKENDS = ("flash_attn", "torch_varlen")
AUTO = "auto"

# HfArgumentParser reads a field typed ``int | str`` as ``int`` (it drops ``str`` from a Union), so
# ``--tokens_per_rank auto`` would fail. The fields that also take "auto" are typed by these aliases of
# ``str``: the parser hands their command-line text as it is, and ``__post_init__`` turns "8192" into
# 8192 and "0.5" into 0.5 and keeps "auto". Python callers pass an int / a float (or "auto") as usual.
IntOrAuto = str
FloatOrAuto = str


@dataclass
class HDPConfig:
    """Hybrid Data Parallelism settings (ByteScale, arXiv 2502.21231)."""

    tokens_per_rank: IntOrAuto = field(
        default=8192,
        metadata={
            "help": "Capacity C: the most tokens one rank holds in one micro-batch. A sample of s tokens is split "
            "over ceil(s / C) ranks; samples longer than world_size * C are refused (see long_sample_policy). "
            "'auto': the largest C whose estimated peak memory (hf_hdp.planning.memory_breakdown: model states "
            "for the ZeRO stage / FSDP mode, activations with checkpointing and offload_ratio, the chunked loss) "
            "fits memory_budget_gb, or on CUDA the device's free memory, less a 10 percent reserve; HDPTrainer "
            "resolves it once, when it is built, and logs the C and the breakdown."
        },
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per optimizer step, independent of the world size. Default: what Trainer would use, "
            "per_device_train_batch_size * gradient_accumulation_steps * world_size."
        },
    )
    planner: Literal["balanced", "naive", "static"] = field(
        default="balanced",
        metadata={
            "help": "How samples are placed on ranks: 'balanced' HDP (ByteScale's balance scheduler, the default), "
            "'naive' HDP, or the 'static' DP x CP mesh baseline."
        },
    )
    attention_split: Literal["auto", "ring", "ulysses", "hybrid"] = field(
        default="auto",
        metadata={
            "help": "How the attention of a sample split over several ranks runs: 'auto' (the balanced planner picks, "
            "per sample, whichever of ring, Ulysses and hybrid its cost model says ends the step earliest, and may "
            "give the longest samples wider groups), 'ring' (zigzag ring attention, groups of ceil(length / "
            "tokens_per_rank) ranks), 'ulysses' (head-parallel all-to-alls; a sample whose group size does not divide "
            "the heads gets the next size that does, or a ring) or 'hybrid' (Ulysses inside nodes x ring across "
            "them). The naive and static planners place rings: with them only 'auto' (meaning rings) and 'ring' apply."
        },
    )
    state_split: Literal["auto", "heads", "scan"] = field(
        default="auto",
        metadata={
            "help": "How the state-carrying layers (Gated DeltaNet in Qwen3.5 and Qwen3-Next) of a sample split over "
            "several ranks run: 'heads' (all-to-all to head shards, the whole recurrence per head shard, all-to-all "
            "back; needs the group size to divide the value heads, else the scan runs), 'scan' (each member from a "
            "zero state, one exchange of chunk transitions and states, an exact correction) or 'auto' (per sample, "
            "whichever hf_hdp.planning.cost.recurrent prices cheaper). Never a serial chain over the members."
        },
    )
    ranks_per_node: int | None = field(
        default=None,
        metadata={
            "help": "Ranks per node, where the fast links end: Ulysses sub-groups stay inside a node and the cost "
            "model prices links by it. Default: the launcher's LOCAL_WORLD_SIZE (torchrun, accelerate), else the "
            "hardware preset's."
        },
    )
    hardware: str = field(
        default="auto",
        metadata={
            "help": "Hardware preset of the cost model the balanced planner and the logged estimates use: "
            "'auto' (h100 on CUDA, cpu otherwise), or a name from hf_hdp.planning.HARDWARE_PRESETS."
        },
    )
    attention_backend: Literal["auto", "flash_attn", "torch_varlen", "cpu_flash", "reference"] = field(
        default="auto",
        metadata={
            "help": "Attention kernels: 'auto' picks flash_attn (CUDA, package installed), then torch_varlen (CUDA); "
            "on the CPU cpu_flash (PyTorch's fused CPU kernel, float32/bf16/fp16), or the PyTorch 'reference' "
            "for float64 (slow, exact, any device)."
        },
    )
    length_column: str = field(
        default="length",
        metadata={
            "help": "A dataset column holding each sample's token count. HDP measures every sample itself (its "
            "hdp_* columns, cached by datasets); when this column is present it is checked against input_ids "
            "and a disagreement is refused naming the row."
        },
    )
    check_plan_hash: bool = field(
        default=True,
        metadata={"help": "All-gather a fingerprint of the step plan before any P2P; stop if ranks disagree."},
    )
    p2p_timeout_s: float | None = field(
        default=600.0,
        metadata={
            "help": "Seconds any HDP wait may take before the step fails with an error naming the rank, the peer or "
            "collective and the step: ring P2P, the plan check, the gradient collective and evaluation's sum. "
            "None: the process group's own timeout (TrainingArguments.ddp_timeout). On NCCL, ring P2P waits are "
            "bounded by the process group's timeout (see hf_hdp.distributed.mesh.DynamicMesh)."
        },
    )
    zero_stage: int | None = field(
        default=None,
        metadata={
            "help": "ZeRO sharding over all ranks (hf_hdp.engine.zero): 0 replicates the optimizer states; 1 shards "
            "them (each rank keeps and updates 1/world of them, then the updated weights are all-gathered); 2 also "
            "shards the reduced gradients (a reduce-scatter: each rank keeps its shard's gradients only). Weights "
            "stay replicated. None (the default): 1 on several ranks, 0 on one."
        },
    )
    length_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes for computing the length column with datasets.map."},
    )
    long_sample_policy: Literal["error", "truncate", "drop"] = field(
        default="error",
        metadata={
            "help": "What to do with samples longer than world_size * tokens_per_rank, which no plan can hold: "
            "'error' (the default) refuses them before training; 'truncate' keeps their first world_size * "
            "tokens_per_rank tokens (input_ids and labels together); 'drop' removes them from the dataset. Both "
            "opt-in policies log how many samples they changed, which rows and how many tokens were removed."
        },
    )
    overlap_grad_reduction: bool = field(
        default=True,
        metadata={
            "help": "Start the gradient buckets during the last micro-batch's backward, as their gradients are final "
            "(hf_hdp.distributed.reduction), so the reduction overlaps the rest of that backward. False: all buckets "
            "after it."
        },
    )
    loss_chunk_tokens: int | None = field(
        default=1024,
        metadata={
            "help": "Tokens per chunk of the LM head and loss; None computes the full logits. The chunked loss never "
            "holds the [tokens, vocab] float32 logits (10 GB at 16K tokens and a 152K vocabulary), only "
            "loss_chunk_tokens rows of them; models whose head it cannot reproduce exactly compute the full logits."
        },
    )
    memory_budget_gb: float | None = field(
        default=None,
        metadata={
            "help": "With tokens_per_rank='auto': the memory of one rank's device, in GB (1e9 bytes), that C is "
            "sized for (10 percent of it is kept back). None: the device's free memory on CUDA (the smallest over the "
            "ranks); on the CPU it must be given."
        },
    )
    offload_ratio: FloatOrAuto = field(
        default=0.0,
        metadata={
            "help": "Selective activation offloading (ByteScale; hf_hdp.engine.offload): a number r in [0, 1] "
            "moves the saved activations of the first ceil(r * num_layers) decoder layers of every training "
            "micro-batch to host memory during forward and brings them back for backward (0, the default: off). "
            "'auto': per micro-batch, the largest fraction whose copy hides behind the micro-batch's attention "
            "compute under the trainer's cost model (whole layers, rounded down). Pieces of long sequences have "
            "the most attention per token, so they offload the most."
        },
    )
    async_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Write each checkpoint's sharded part (optimizer state; FSDP weights) in a background thread "
            "(torch.distributed.checkpoint's async_save) while training continues; the next save, "
            "load_best_model_at_end and the end of training wait for it. Costs a host copy of this rank's shards "
            "while writing (hf_hdp.trainer.saving)."
        },
    )
    log_keys: str = field(  # a list of names is accepted too (the command line gives a comma-separated string)
        default="default",
        metadata={
            "help": "Which hdp/* figures each training log gets (hf_hdp.trainer.stats): 'default' (hdp/tokens_per_s, "
            "hdp/mfu_est, hdp/imbalance_est, hdp/p2p_bytes, and hdp/offloaded_bytes with offload_ratio), 'all' (also "
            "hdp/p2p_bytes_est, hdp/step_time_est_s, hdp/micro_batches_max/min, hdp/max_group_size, hdp/samples_k{k}), "
            "or a comma-separated list (or a list) of names, e.g. 'p2p_bytes,p2p_bytes_est,samples_k'. Every figure is "
            "the mean over the logging window's steps, measured and estimated alike."
        },
    )

    def __post_init__(self):
        self.tokens_per_rank = _int_or_auto(self.tokens_per_rank)
        self.offload_ratio = _offload_ratio(self.offload_ratio)
        self.memory_budget_gb = _memory_budget(self.memory_budget_gb, self.tokens_per_rank)
        # "auto" is resolved by HDPTrainer when it is built (hf_hdp.trainer.capacity)
        if self.tokens_per_rank != AUTO and self.tokens_per_rank < 1:
            raise ValueError(
                f"HDPConfig.tokens_per_rank must be at least 1, got {self.tokens_per_rank}. It is the number of tokens "
                "one rank can hold in one micro-batch; typical values are 4096-32768 on a GPU."
            )
        check_global_batch_size(self.global_batch_size)
        self._check_choices()
        self._check_numbers()
        if not isinstance(self.async_checkpoint, bool):
            raise ValueError(f"HDPConfig.async_checkpoint must be True or False, got {self.async_checkpoint!r}")
        if not (
            isinstance(self.log_keys, str)
            or (isinstance(self.log_keys, (list, tuple)) and all(isinstance(k, str) for k in self.log_keys))
        ):
            raise ValueError(
                f"HDPConfig.log_keys must be 'default', 'all', a comma-separated string or a list of names, got "
                f"{self.log_keys!r} (hf_hdp.trainer.stats.ALL_LOG_KEYS lists the names)."
            )

    def _check_choices(self) -> None:
        """The fields that name one of a set of choices."""
        if self.planner not in PLANNERS:
            raise ValueError(f"HDPConfig.planner must be one of {tuple(PLANNERS)}, got {self.planner!r}")
        if self.attention_split not in SPLITS:
            raise ValueError(f"HDPConfig.attention_split must be one of {SPLITS}, got {self.attention_split!r}")
        if self.state_split not in STATE_SPLITS:
            raise ValueError(f"HDPConfig.state_split must be one of {STATE_SPLITS}, got {self.state_split!r}")
        if self.attention_split in HEAD_PARALLEL and self.planner != "balanced":
            raise ValueError(
                f"HDPConfig.attention_split={self.attention_split!r} needs planner='balanced': the {self.planner!r} "
                "planner places ring pieces only. Use planner='balanced', or attention_split='ring'."
            )
        if self.attention_backend not in BACKEND_CHOICES:
            raise ValueError(
                f"HDPConfig.attention_backend must be one of {BACKEND_CHOICES}, got {self.attention_backend!r}"
            )
        if self.hardware != "auto" and self.hardware not in HARDWARE_PRESETS:
            raise ValueError(
                f"HDPConfig.hardware must be 'auto' or one of {tuple(HARDWARE_PRESETS)}, got {self.hardware!r}"
            )
        if not self.length_column:
            raise ValueError("HDPConfig.length_column must name a column")
        if self.long_sample_policy not in LONG_SAMPLE_POLICIES:
            raise ValueError(
                f"HDPConfig.long_sample_policy must be one of {LONG_SAMPLE_POLICIES}, got {self.long_sample_policy!r}: "
                "'error' refuses samples longer than world_size * tokens_per_rank, 'truncate' cuts them to that "
                "length, 'drop' removes them."
            )
        if not isinstance(self.overlap_grad_reduction, bool):
            raise ValueError(
                f"HDPConfig.overlap_grad_reduction must be True or False, got {self.overlap_grad_reduction!r}"
            )

    def _check_numbers(self) -> None:
        """The numeric fields other than tokens_per_rank, offload_ratio, memory_budget_gb and global_batch_size."""
        if not _positive_int_or_none(self.ranks_per_node):
            raise ValueError(
                f"HDPConfig.ranks_per_node must be a positive integer or None (the launcher's LOCAL_WORLD_SIZE), got "
                f"{self.ranks_per_node!r}"
            )
        if self.p2p_timeout_s is not None and (
            isinstance(self.p2p_timeout_s, bool)
            or not isinstance(self.p2p_timeout_s, (int, float))
            or not 0 < self.p2p_timeout_s < float("inf")
        ):
            raise ValueError(
                "HDPConfig.p2p_timeout_s must be a positive number of seconds or None (the process group's own "
                f"timeout), got {self.p2p_timeout_s!r}. It bounds every HDP wait; minutes (the default 600) suit "
                "most runs."
            )
        stage = self.zero_stage
        if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2)):
            raise ValueError(
                f"HDPConfig.zero_stage must be 0, 1, 2 or None, got {self.zero_stage!r}: 0 replicates the optimizer "
                "states, 1 shards them over the ranks, 2 also shards the gradients; None picks 1 on several ranks and "
                "0 on one. To shard the weights too, use TrainingArguments(fsdp='full_shard') (FSDP2, "
                "hf_hdp.engine.fsdp)."
            )
        if not _positive_int_or_none(self.loss_chunk_tokens):
            raise ValueError(
                f"HDPConfig.loss_chunk_tokens must be a positive integer or None (compute the full logits), got "
                f"{self.loss_chunk_tokens!r}"
            )

    def check_training_args(self, args) -> None:
        """Refuse ``TrainingArguments`` that this config contradicts, or that HDP would silently ignore.

        Checked (each error names both settings and the fix; one function per setting, in
        :data:`TRAINING_ARGS_CHECKS`):

        - ``global_batch_size`` with ``gradient_accumulation_steps > 1``: both set the batch;
        - ``train_sampling_strategy`` other than ``"random"``: HDP draws each global batch in its own
          seeded random order and balances lengths itself, so 'sequential', 'group_by_length' and
          'batch_rebalance' would be ignored;
        - ``auto_find_batch_size``: it shrinks ``per_device_train_batch_size`` on OOM, which under HDP
          changes the global batch (the training itself), not the memory; ``tokens_per_rank`` bounds memory;
        - ``label_smoothing_factor > 0``: HDP's token-level loss does not smooth labels;
        - ``use_liger_kernel``: Liger's fused loss would replace HDP's global-batch loss (and its kernels
          are unverified under packed, split sequences);
        - ``deepspeed``: HDP shards the model states itself (``zero_stage``, or FSDP2 through
          HDPTrainer); ``fsdp`` reaching this check (HDPTrainer reads and clears it first,
          :mod:`hf_hdp.engine.fsdp`) is refused for the same reason;
        - a ``parallelism_config`` with context, tensor, sequence or sharded data parallelism: HDP is
          the data and context parallelism;
        - ``average_tokens_across_devices=False`` on several ranks: HDP's loss is always over the
          global batch's label count.

        ``dataloader_drop_last`` with a global batch larger than the dataset (no step at all) is refused
        by :class:`~hf_hdp.trainer.data.GlobalBatchSampler`, once the dataset size is known.
        """
        for check in TRAINING_ARGS_CHECKS:
            problem = check(self, args)
            if problem:
                raise ValueError(problem)

    def check_attention_backend(
        self, device, dtype=None, mixed_precision: bool = False, head_dim: int | None = None
    ) -> str:
        """The attention backend this config runs with on ``device``, or a ``ValueError`` saying why it cannot.

        ``dtype`` is the model's parameter dtype and ``mixed_precision`` whether bf16/fp16 autocast is on
        (TrainingArguments ``bf16``/``fp16``): the fused CUDA kernels (``flash_attn``, ``torch_varlen``)
        need bf16/fp16 activations and a head dimension that is a multiple of 8, at most 256. Checked when
        HDPTrainer is built, so a run never starts with kernels that fail at the first forward.
        """
        import torch

        from .attention.backends import backend_unavailable_reason, get_backend

        device = torch.device(device)
        name = self.attention_backend
        if name == "auto":
            name = get_backend("auto", device, dtype).name
        else:
            reason = backend_unavailable_reason(name, device, None if mixed_precision else dtype)
            if reason is not None:
                raise ValueError(
                    f"HDPConfig.attention_backend={name!r} cannot run on this trainer's device ({device}): {reason}."
                )
        if name in FUSED_BACKENDS:
            low = (torch.float16, torch.bfloat16)
            if dtype is not None and dtype not in low and not mixed_precision:
                picked = " (picked by attention_backend=auto)" if self.attention_backend == "auto" else ""
                raise ValueError(
                    f"the {name!r} attention backend{picked} "
                    f"runs fused kernels that need bfloat16/float16 activations, but the model is {dtype} and "
                    "neither TrainingArguments.bf16 nor fp16 is set. Set bf16=True (or load the model in bfloat16), "
                    "or use HDPConfig(attention_backend='reference') for float32/float64 (slow)."
                )
            if head_dim is not None and (head_dim % 8 or head_dim > 256):
                raise ValueError(
                    f"the {name!r} attention backend needs a head dimension that is a multiple of 8 and at most 256, "
                    f"the model's is {head_dim}. Use HDPConfig(attention_backend='reference')."
                )
        return name

    def to_dict(self) -> dict:
        return asdict(self)


def _int_or_auto(value):
    """``tokens_per_rank`` as given: an int, "auto", or a command line's text of either."""
    if isinstance(value, str):
        text = value.strip()
        if text == AUTO:
            return AUTO
        if text.lstrip("+-").isdigit():
            return int(text)
        raise ValueError(
            f"HDPConfig.tokens_per_rank must be an integer (tokens per rank, e.g. 8192) or 'auto' (sized from the "
            f"memory: see memory_budget_gb), got {value!r}"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"HDPConfig.tokens_per_rank must be an integer or 'auto', got {value!r}")
    return value


def _offload_ratio(value):
    """``offload_ratio`` as given: a number in [0, 1] (as a float), "auto", or a command line's text of either."""
    given = value
    if isinstance(value, str):
        text = value.strip()
        if text == AUTO:
            return AUTO
        try:
            value = float(text)
        except ValueError:
            value = given
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"HDPConfig.offload_ratio must be a number in [0, 1] (the fraction of the decoder layers whose saved "
            f"activations go to host memory; 0 = off) or 'auto' (per micro-batch, as much as its attention "
            f"compute hides), got {given!r}"
        )
    return float(value)


def check_global_batch_size(value, where: str = "HDPConfig.global_batch_size", *, fix: str | None = None):
    """``value`` if it is a global batch (samples per optimizer step, whatever the world size): a positive integer.

    ``None`` passes (derive the batch from TrainingArguments) unless ``fix`` is given: then the caller needs a
    number and the error says ``fix``. Raises ``ValueError`` naming ``where``. HDPConfig and
    HDPAccelerator.hdp_steps both check their batch here.
    """
    if value is None and fix is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        if fix is None:
            raise ValueError(
                f"{where} must be a positive integer or None (derive it from TrainingArguments), got {value!r}"
            )
        raise ValueError(
            f"{where} needs the global batch (samples per optimizer step, any world size) as a positive integer: "
            f"{fix}; got {value!r}."
        )
    return value


def _positive_int_or_none(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _memory_budget(value, tokens_per_rank):
    """``memory_budget_gb`` as given: ``None``, or a positive number of GB (a command line's text of one), used only
    with ``tokens_per_rank='auto'``."""
    if value is None:
        return None
    budget = value
    if isinstance(budget, str):
        try:
            budget = float(budget)
        except ValueError:
            budget = value
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
        raise ValueError(
            f"HDPConfig.memory_budget_gb must be a positive number of GB (1e9 bytes) or None, got {value!r}"
        )
    if tokens_per_rank != AUTO:
        raise ValueError(
            f"HDPConfig.memory_budget_gb={value!r} is used only to size tokens_per_rank='auto', but "
            f"tokens_per_rank={tokens_per_rank}. Set tokens_per_rank='auto' or leave memory_budget_gb unset."
        )
    return float(budget)
