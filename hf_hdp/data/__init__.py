"""HDP's data room: measuring and checking a dataset (:mod:`.checks`) and the loader of one rank's planned
steps (:mod:`.loader`). Rows become documents and documents become packed micro-batches in
:mod:`hf_hdp.collators`."""

from .checks import MeasuredDataset, measure_dataset, prepare_dataset, require_map_style
from .loader import GlobalBatchSampler, HDPDataLoader, HDPStep, HDPStepDataset

__all__ = [
    "GlobalBatchSampler",
    "HDPDataLoader",
    "HDPStep",
    "HDPStepDataset",
    "MeasuredDataset",
    "measure_dataset",
    "prepare_dataset",
    "require_map_style",
]
