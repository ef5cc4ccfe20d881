"""Length-aware collation: padding-free packing of HDP micro-batches (the code lives in :mod:`hf_hdp.data`)."""

from ..data.collator import HDPCollator
from ..data.documents import IGNORE_INDEX, HDPDataError, check_sample, count_loss_tokens, shifted_targets

__all__ = ["HDPCollator", "HDPDataError", "IGNORE_INDEX", "check_sample", "count_loss_tokens", "shifted_targets"]
