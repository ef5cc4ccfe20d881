"""hf_hdp: ByteScale's Hybrid Data Parallelism for transformers + accelerate.

    from hf_hdp import HDPTrainer, HDPConfig
    trainer = HDPTrainer(model=model, args=training_args, train_dataset=ds,
                         hdp_config=HDPConfig(tokens_per_rank=8192, global_batch_size=64))
    trainer.train()

Importing the package registers the ``"hdp"`` attention with transformers' ``AttentionInterface``.
"""

from .attention.interface import HDP_ATTENTION, hdp_attention_forward
from .collators import HDPCollator, HDPDataError
from .config import HDPConfig
from .mesh import DynamicMesh, HDPAccelerator, PlanMismatchError
from .planning import PLANNERS, StepPlan, make_plan
from .trainer import HDPTrainer

__version__ = "0.1.0"

__all__ = [
    "HDPTrainer",
    "HDPConfig",
    "HDPCollator",
    "HDPDataError",
    "DynamicMesh",
    "HDPAccelerator",
    "PlanMismatchError",
    "StepPlan",
    "PLANNERS",
    "make_plan",
    "HDP_ATTENTION",
    "hdp_attention_forward",
]
