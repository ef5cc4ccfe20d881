"""hf_hdp: ByteScale's Hybrid Data Parallelism for transformers + accelerate.

    from hf_hdp import HDPTrainer, HDPConfig
    trainer = HDPTrainer(model=model, args=training_args, train_dataset=ds,
                         hdp_config=HDPConfig(tokens_per_rank=8192, global_batch_size=64))
    trainer.train()

Names are imported on first use, so the pure planner (``hf_hdp.planning``) loads without torch.
Importing ``hf_hdp.attention`` (HDPTrainer does) registers the ``"hdp"`` attention with
transformers' ``AttentionInterface``.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "HDPTrainer": "hf_hdp.trainer",
    "HDPStep": "hf_hdp.data.loader",
    "StepEngine": "hf_hdp.engine",
    "run_micro_batches": "hf_hdp.engine",
    "HDPConfig": "hf_hdp.config",
    "HDPTrainingArguments": "hf_hdp.training_args",
    "HDPCollator": "hf_hdp.collators",
    "HDPDataError": "hf_hdp.collators",
    "DynamicMesh": "hf_hdp.distributed",
    "HDPAccelerator": "hf_hdp.accelerator",
    "HDPSFTTrainer": "hf_hdp.integrations.trl",
    "HDPGRPOTrainer": "hf_hdp.integrations.trl",
    "HDPRLOOTrainer": "hf_hdp.integrations.trl",
    "PlanMismatchError": "hf_hdp.distributed",
    "HDPCommError": "hf_hdp.distributed",
    "P2PTimeoutError": "hf_hdp.distributed",
    "CollectiveTimeoutError": "hf_hdp.distributed",
    "PeerCrashedError": "hf_hdp.distributed",
    "StepPlan": "hf_hdp.planning",
    "PLANNERS": "hf_hdp.planning",
    "make_plan": "hf_hdp.planning",
    "HDP_ATTENTION": "hf_hdp.attention",
    "hdp_attention_forward": "hf_hdp.attention",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_hdp' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
