"""Length-aware collation: padding-free packing of HDP micro-batches."""

from .hdp_collator import IGNORE_INDEX, HDPCollator, HDPDataError, check_sample, count_loss_tokens, shifted_targets

__all__ = ["HDPCollator", "HDPDataError", "IGNORE_INDEX", "check_sample", "count_loss_tokens", "shifted_targets"]
