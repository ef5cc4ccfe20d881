"""HDPTrainer: the drop-in ``Trainer`` front door over the step engine (:mod:`hf_hdp.engine`)."""

from .trainer import HDPTrainer

__all__ = ["HDPTrainer"]
