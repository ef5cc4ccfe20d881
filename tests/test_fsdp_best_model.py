"""``load_best_model_at_end`` under FSDP2 (:meth:`hf_hdp.HDPTrainer._load_best_model`), on 2 gloo ranks.

With ``greater_is_better=True`` on the eval loss, the best checkpoint is the first (the loss falls as it
trains), so the weights at the end must be that checkpoint's, not the last step's: both checkpoint kinds,
sharded weights (the default) and ``FULL_STATE_DICT`` safetensors.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.models import save_tiny_model
from tests.test_zero import GLOBAL_BATCH, _close, _rows


def _worker(rank, world, model_path, base):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from hf_hdp.engine.export import consolidate
    from hf_hdp.engine.fsdp import full_model_state
    from tests.models import load_model

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    out = {}
    for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        out_dir = os.path.join(base, kind)
        args = TrainingArguments(
            output_dir=out_dir,
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            seed=0,
            max_steps=3,
            learning_rate=3e-2,
            fsdp="full_shard",
            fsdp_config={} if kind == "SHARDED_STATE_DICT" else {"state_dict_type": kind},  # sharded: the default
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=True,
        )
        trainer = HDPTrainer(
            load_model(model_path),
            args,
            train_dataset=Dataset.from_list(_rows()),
            eval_dataset=Dataset.from_list(_rows()[:6]),
            hdp_config=HDPConfig(planner="naive", tokens_per_rank=24, global_batch_size=GLOBAL_BATCH),
        )
        trainer.train()
        weights = full_model_state(trainer.model)
        checkpoints = {}
        if rank == 0:
            for step in (1, 3):
                folder = os.path.join(out_dir, f"checkpoint-{step}")
                if kind == "SHARDED_STATE_DICT":
                    folder = consolidate(folder, os.path.join(base, f"{kind}-{step}"))
                from transformers import AutoModelForCausalLM

                checkpoints[step] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).state_dict()
        out[kind] = {"best": trainer.state.best_model_checkpoint, "weights": weights, "checkpoints": checkpoints}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("best")
    model = save_tiny_model("llama", str(base / "model"))
    return base, run_distributed(_worker, 2, model, str(base), timeout=900)


@pytest.mark.parametrize("kind", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_the_best_checkpoints_weights_are_loaded_at_the_end(runs, kind):
    base, results = runs
    assert results[0][kind]["best"] == os.path.join(str(base), kind, "checkpoint-1")
    first, last = results[0][kind]["checkpoints"][1], results[0][kind]["checkpoints"][3]
    assert any(not torch.allclose(first[k], last[k]) for k in first)
    for r in range(2):
        _close(results[r][kind]["weights"], first, f"rank {r} {kind}")
