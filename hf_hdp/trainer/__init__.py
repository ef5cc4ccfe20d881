"""HDPTrainer and its step-level data loading."""

from .data import GlobalBatchSampler, HDPDataLoader, HDPStep, HDPStepDataset
from .trainer import HDPTrainer, UnsupportedModelError, enable_hdp_attention

__all__ = [
    "HDPTrainer",
    "UnsupportedModelError",
    "enable_hdp_attention",
    "GlobalBatchSampler",
    "HDPDataLoader",
    "HDPStep",
    "HDPStepDataset",
]
