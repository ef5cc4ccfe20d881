"""HDPTrainer and its step-level data loading."""

from ..data.loader import GlobalBatchSampler, HDPDataLoader, HDPStep, HDPStepDataset
from ..models import UnsupportedModelError
from .step import forward_micro_batch, hdp_loss, run_micro_batches
from .trainer import HDPTrainer, enable_hdp_attention

__all__ = [
    "HDPTrainer",
    "UnsupportedModelError",
    "enable_hdp_attention",
    "GlobalBatchSampler",
    "HDPDataLoader",
    "HDPStep",
    "HDPStepDataset",
    "forward_micro_batch",
    "hdp_loss",
    "run_micro_batches",
]
