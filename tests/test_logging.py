"""HDP's figures reach TensorBoard through the Trainer's normal reporting.

Two gloo ranks train three steps with ``report_to=["tensorboard"]`` and evaluate after each step;
long samples are split over both ranks (k = 2), so there is real P2P traffic. The test reads the
event file back with TensorBoard's ``EventAccumulator`` and checks every HDP scalar: tokens/s,
the imbalance estimate, the group sizes, the P2P bytes (measured, equal to the planner's estimate)
and the MFU estimate, beside the loss and the HDP eval loss.
"""

from __future__ import annotations

import glob
import os
import time

import pytest

from tests.dist_utils import run_distributed
from tests.models import save_tiny_model

pytest.importorskip("tensorboard")

WORLD, C, STEPS = 2, 32, 3
# 40, 60 and 33 tokens need both ranks (k = 2); the rest run whole on one
LENGTHS = [40, 5, 9, 60, 12, 3, 16, 7, 33, 2, 21, 6]


def _worker(rank, world_size, model_path, out_dir):
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from tests.models import VOCAB, load_model

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        TENSORBOARD_LOGGING_DIR=os.path.join(out_dir, "tb"),
    )
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for n in LENGTHS]
    args = TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,
        report_to=["tensorboard"],
        max_steps=STEPS,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
        seed=0,
    )
    config = HDPConfig(tokens_per_rank=C, global_batch_size=4, planner="naive", log_keys="all")  # every figure
    trainer = HDPTrainer(
        load_model(model_path, dtype=torch.float32),
        args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:6]),
        hdp_config=config,
    )
    trainer.train()
    return trainer.state.log_history


def test_hdp_figures_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = save_tiny_model("llama", str(tmp_path / "model"))
    out = str(tmp_path / "out")
    history = run_distributed(_worker, WORLD, model, out)[0]

    files = glob.glob(os.path.join(out, "tb", "events.out.tfevents.*"))
    assert len(files) == 1, files  # rank 0 alone reports
    events = EventAccumulator(files[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag):
        assert tag in tags, sorted(tags)
        return {e.step: e.value for e in events.Scalars(tag)}

    steps = set(range(1, STEPS + 1))
    assert set(series("train/loss")) == steps and set(series("eval/loss")) == steps
    assert all(v > 0 for v in series("train/hdp/tokens_per_s").values())
    assert all(v >= 1.0 for v in series("train/hdp/imbalance_est").values())
    assert all(0 < v < 1 for v in series("train/hdp/mfu_est").values())
    # group sizes: samples that ran whole on one rank, and samples split over both ranks
    k1, k2 = series("train/hdp/samples_k1"), series("train/hdp/samples_k2")
    assert sum(k1.values()) + sum(k2.values()) == STEPS * 4 and sum(k2.values()) > 0
    assert max(series("train/hdp/max_group_size").values()) == 2
    # P2P bytes: measured in the mesh, summed over ranks, equal to the planner's estimate, > 0 when split
    p2p, est = series("train/hdp/p2p_bytes"), series("train/hdp/p2p_bytes_est")
    assert p2p == pytest.approx(est) and max(p2p.values()) > 0
    assert all((p2p[s] > 0) == (k2.get(s, 0) > 0) for s in steps)
    # the same numbers as the Trainer's own log history
    logged = {e["step"]: e for e in history if "hdp/p2p_bytes" in e}
    assert {s: float(e["hdp/p2p_bytes"]) for s, e in logged.items()} == pytest.approx(p2p)


def test_tokens_per_s_window_leaves_out_setup_and_evaluation():
    from hf_hdp.trainer.callbacks import HDPWindowCallback
    from hf_hdp.trainer.stats import HDPStats

    stats = HDPStats(world_size=2)
    callback = HDPWindowCallback(stats)
    age = lambda: time.perf_counter() - stats.window["started"]
    stats.window["started"] -= 100.0  # a slow setup before the first step
    callback.on_train_begin(None, None, None)
    assert age() < 1.0
    stats.window["started"] -= 50.0  # 50 s since the last log, 30 of them evaluating
    callback.on_evaluate(None, None, None, metrics={"eval_loss": 1.0, "eval_runtime": 30.0})
    assert 19.0 < age() < 21.0
    stats.window["steps"] = 1  # a save after steps of this window ran keeps the window
    callback.on_save(None, None, None)
    assert age() > 19.0
