"""HDP's data room: rows to documents (:mod:`.documents`), measuring and checks (:mod:`.checks`), the
length-aware collator (:mod:`.collator`) and the step loader (:mod:`.loader`)."""

from .checks import MeasuredDataset, measure_dataset, prepare_dataset, require_map_style
from .collator import HDPCollator
from .documents import IGNORE_INDEX, Document, HDPDataError, RowRules, count_loss_tokens, row_documents
from .loader import GlobalBatchSampler, HDPDataLoader, HDPStep, HDPStepDataset

__all__ = [
    "Document", "GlobalBatchSampler", "HDPCollator", "HDPDataError", "HDPDataLoader", "HDPStep", "HDPStepDataset",
    "IGNORE_INDEX", "MeasuredDataset", "RowRules", "count_loss_tokens", "measure_dataset", "prepare_dataset",
    "require_map_style", "row_documents",
]
