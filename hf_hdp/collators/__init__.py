"""The length-aware collator: a row becomes documents (:mod:`.documents`: padding, pre-packed rows, shifted
labels) and a planned micro-batch's documents become one padding-free packed batch with its HDP attention
metadata (:mod:`.collator`)."""

from .collator import HDPCollator
from .documents import (
    IGNORE_INDEX,
    Document,
    HDPDataError,
    RowRules,
    check_sample,
    count_loss_tokens,
    row_documents,
    shifted_targets,
)

__all__ = [
    "Document",
    "HDPCollator",
    "HDPDataError",
    "IGNORE_INDEX",
    "RowRules",
    "check_sample",
    "count_loss_tokens",
    "row_documents",
    "shifted_targets",
]
