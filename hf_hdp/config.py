"""HDPConfig: every HDP setting in one validated dataclass.

It parses with ``HfArgumentParser`` beside ``TrainingArguments``::

    parser = HfArgumentParser((TrainingArguments, HDPConfig))
    training_args, hdp_config = parser.parse_args_into_dataclasses()   # --tokens_per_rank 8192 ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .planning import HARDWARE_PRESETS, PLANNERS

BACKEND_CHOICES = ("auto", "flash_attn", "torch_varlen", "reference")


@dataclass
class HDPConfig:
    """Hybrid Data Parallelism settings (ByteScale, arXiv 2502.21231)."""

    tokens_per_rank: int = field(
        default=8192,
        metadata={
            "help": "Capacity C: the most tokens one rank holds in one micro-batch. A sample of s tokens is split "
            "over ceil(s / C) ranks; samples longer than world_size * C are refused."
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
    hardware: str = field(
        default="auto",
        metadata={
            "help": "Hardware preset of the cost model the balanced planner and the logged estimates use: "
            "'auto' (h100 on CUDA, cpu otherwise), or a name from hf_hdp.planning.HARDWARE_PRESETS."
        },
    )
    attention_backend: Literal["auto", "flash_attn", "torch_varlen", "reference"] = field(
        default="auto",
        metadata={
            "help": "Attention kernels: 'auto' picks flash_attn (CUDA, package installed), then torch_varlen (CUDA), "
            "then the PyTorch 'reference' (CPU)."
        },
    )
    length_column: str = field(
        default="length",
        metadata={"help": "Dataset column holding each sample's token count; computed with datasets.map if absent."},
    )
    check_plan_hash: bool = field(
        default=True,
        metadata={"help": "All-gather a fingerprint of the step plan before any P2P; stop if ranks disagree."},
    )
    p2p_timeout_s: float | None = field(
        default=None,
        metadata={"help": "Seconds a ring partner may take before the step fails (gloo); None: the process group's timeout."},
    )
    length_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes for computing the length column with datasets.map."},
    )

    def __post_init__(self):
        if isinstance(self.tokens_per_rank, bool) or not isinstance(self.tokens_per_rank, int):
            raise ValueError(f"HDPConfig.tokens_per_rank must be an integer, got {self.tokens_per_rank!r}")
        if self.tokens_per_rank < 1:
            raise ValueError(
                f"HDPConfig.tokens_per_rank must be at least 1, got {self.tokens_per_rank}. It is the number of tokens one "
                "rank can hold in one micro-batch; typical values are 4096-32768 on a GPU."
            )
        if self.global_batch_size is not None and (
            isinstance(self.global_batch_size, bool) or not isinstance(self.global_batch_size, int) or self.global_batch_size < 1
        ):
            raise ValueError(
                f"HDPConfig.global_batch_size must be a positive integer or None (derive it from TrainingArguments), "
                f"got {self.global_batch_size!r}"
            )
        if self.planner not in PLANNERS:
            raise ValueError(f"HDPConfig.planner must be one of {tuple(PLANNERS)}, got {self.planner!r}")
        if self.attention_backend not in BACKEND_CHOICES:
            raise ValueError(
                f"HDPConfig.attention_backend must be one of {BACKEND_CHOICES}, got {self.attention_backend!r}"
            )
        if self.p2p_timeout_s is not None and self.p2p_timeout_s <= 0:
            raise ValueError(f"HDPConfig.p2p_timeout_s must be positive or None, got {self.p2p_timeout_s}")
        if self.hardware != "auto" and self.hardware not in HARDWARE_PRESETS:
            raise ValueError(
                f"HDPConfig.hardware must be 'auto' or one of {tuple(HARDWARE_PRESETS)}, got {self.hardware!r}"
            )
        if not self.length_column:
            raise ValueError("HDPConfig.length_column must name a column")

    @property
    def explicit_global_batch(self) -> bool:
        return self.global_batch_size is not None

    def to_dict(self) -> dict:
        return asdict(self)
