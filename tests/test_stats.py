"""HDP's logged figures (hf_hdp.trainer.stats): one aggregation per window, a short default set.

With ``logging_steps > 1`` a log covers a window of steps. Every per-step figure, measured or
estimated, is the mean over that window's steps (``hdp/p2p_bytes`` and ``hdp/p2p_bytes_est`` alike),
so a measured figure and its estimate stay comparable; the per-step values are kept in
``hdp_history``. ``HDPConfig.log_keys`` chooses the figures: a short default set, ``"all"``, or names.
"""

from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from hf_hdp.planning import CostModel, plan_metrics, plan_naive
from hf_hdp.trainer.stats import ALL_LOG_KEYS, DEFAULT_LOG_KEYS, HDPStats, resolve_log_keys
from tests.dist_utils import run_distributed
from tests.models import save_tiny_model

WORLD, C = 2, 32
# three steps of 4 samples: 2, 1 and 0 samples longer than C (split over both ranks), so the P2P bytes differ per step
STEP_LENGTHS = [[40, 5, 60, 12], [9, 33, 3, 16], [7, 2, 21, 6]]


def _step(i, lengths, world=WORLD):
    plan = plan_naive(lengths, world, C)
    return SimpleNamespace(
        plan=plan,
        epoch=0,
        step=i,
        rows=list(range(4 * i, 4 * i + 4)),
        fingerprint=plan.fingerprint(),
        num_tokens=sum(lengths),
        micro_batches=[None] * 2,
    )


def _record_window(log_keys, measured=(1000, 0, 7)):
    cost = CostModel.default()
    stats = HDPStats(WORLD, log_keys)
    for i, (lengths, sent) in enumerate(zip(STEP_LENGTHS, measured)):
        stats.record(_step(i, lengths), i + 1, 0.0, sent, float(sent), cost)
    return stats, stats.window_logs(num_params=1000, peak_flops=1e12), cost


def test_a_window_of_three_steps_aggregates_measured_and_estimated_alike():
    stats, logs, cost = _record_window("all")
    history = list(stats.history)
    assert len(history) == 3
    estimates = [plan_metrics(_step(i, lengths).plan, cost) for i, lengths in enumerate(STEP_LENGTHS)]
    assert [h["p2p_bytes_est"] for h in history] == [m.p2p_bytes for m in estimates]
    assert len({h["p2p_bytes_est"] for h in history}) > 1  # the steps differ: a last-step value would be wrong

    def mean(key):
        return sum(h[key] for h in history) / 3

    assert logs["hdp/p2p_bytes"] == round(mean("p2p_bytes")) == round(1007 / 3)
    assert logs["hdp/p2p_bytes_est"] == round(mean("p2p_bytes_est"))
    assert logs["hdp/imbalance_est"] == round(mean("imbalance_est"), 4)
    assert logs["hdp/step_time_est_s"] == round(mean("step_time_est_s"), 6)
    per_rank = [n for m in estimates for n in m.micro_batches_per_rank]
    assert (logs["hdp/micro_batches_max"], logs["hdp/micro_batches_min"]) == (max(per_rank), min(per_rank))
    # group sizes: samples of the whole window, summed
    sizes = sum((Counter(m.group_sizes) for m in estimates), start=Counter())
    assert {k: v for k, v in logs.items() if k.startswith("hdp/samples_k")} == {
        f"hdp/samples_k{k}": n for k, n in sizes.items()
    }
    assert sum(sizes.values()) == 12 and logs["hdp/max_group_size"] == 2
    assert stats.window_logs(1000, 1e12) == {}  # the next window starts empty


def test_default_set_is_the_documented_keys_and_all_gives_every_figure():
    _, default, _ = _record_window("default")
    assert set(default) == set(DEFAULT_LOG_KEYS) - {"hdp/offloaded_bytes"}  # no offloading here
    assert set(default) == {"hdp/tokens_per_s", "hdp/mfu_est", "hdp/imbalance_est", "hdp/p2p_bytes"}
    _, every, _ = _record_window("all")
    named = {k for k in every if not k.startswith("hdp/samples_k")} | {"hdp/samples_k"}
    assert named == set(ALL_LOG_KEYS) - {"hdp/offloaded_bytes"}
    assert {"hdp/samples_k1", "hdp/samples_k2"} <= set(every)
    _, chosen, _ = _record_window("p2p_bytes, hdp/p2p_bytes_est,samples_k")
    assert set(chosen) == {"hdp/p2p_bytes", "hdp/p2p_bytes_est", "hdp/samples_k1", "hdp/samples_k2"}
    assert resolve_log_keys(["imbalance_est"]) == {"hdp/imbalance_est"}


@pytest.mark.parametrize("bad", ["p2p_byte", "", ["tokens_per_s", "loss"]])
def test_unknown_log_keys_are_refused_with_the_names(bad):
    with pytest.raises(ValueError, match=r"HDPConfig.log_keys=.*Use 'default', 'all'.*p2p_bytes_est"):
        HDPStats(WORLD, bad)


def test_hdp_config_refuses_a_log_keys_value_that_is_not_names():
    from hf_hdp import HDPConfig

    assert HDPConfig(log_keys=["p2p_bytes", "p2p_bytes_est"]).log_keys == ["p2p_bytes", "p2p_bytes_est"]
    for bad in (3, ["p2p_bytes", 2], None):
        with pytest.raises(ValueError, match=r"HDPConfig.log_keys must be .*ALL_LOG_KEYS"):
            HDPConfig(log_keys=bad)


# --------------------------------------------------------------------------- through HDPTrainer
def _worker(rank, world_size, model_path, out_dir):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from tests.models import VOCAB, load_model

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for lengths in STEP_LENGTHS for n in lengths
    ]
    results = {}
    for log_keys, steps, logging_steps in (("all", 3, 3), ("default", 1, 1)):
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, log_keys),
            use_cpu=True,
            report_to=[],
            max_steps=steps,
            logging_steps=logging_steps,
            save_strategy="no",
            disable_tqdm=True,
            learning_rate=1e-3,
            seed=0,
        )
        config = HDPConfig(tokens_per_rank=C, global_batch_size=4, planner="naive", log_keys=log_keys)
        trainer = HDPTrainer(
            load_model(model_path, dtype=torch.float32), args, train_dataset=Dataset.from_list(rows), hdp_config=config
        )
        trainer.train()
        logs = [{k: v for k, v in e.items() if k.startswith("hdp/")} for e in trainer.state.log_history if "loss" in e]
        results[log_keys] = (logs, list(trainer.hdp_history))
    return results


def test_trainer_logs_a_window_of_three_steps_as_the_mean_of_its_steps(tmp_path):
    model = save_tiny_model("llama", str(tmp_path / "model"))
    results = run_distributed(_worker, WORLD, model, str(tmp_path / "out"))
    for rank in range(WORLD):
        (logs, history), (default_logs, _) = results[rank]["all"], results[rank]["default"]
        assert len(logs) == 1 and len(history) == 3, (logs, history)
        (log,) = logs
        # the measured bytes are the planner's, step by step, and they differ between steps
        assert [h["p2p_bytes"] for h in history] == [h["p2p_bytes_est"] for h in history]
        assert len({h["p2p_bytes"] for h in history}) > 1 and max(h["p2p_bytes"] for h in history) > 0

        def mean(key, history=history):
            return sum(h[key] for h in history) / len(history)

        assert log["hdp/p2p_bytes"] == log["hdp/p2p_bytes_est"] == round(mean("p2p_bytes"))
        assert log["hdp/imbalance_est"] == round(mean("imbalance_est"), 4)
        assert log["hdp/step_time_est_s"] == round(mean("step_time_est_s"), 6)
        assert sum(v for k, v in log.items() if k.startswith("hdp/samples_k")) == 12
        assert set(default_logs[0]) <= set(DEFAULT_LOG_KEYS)
        assert {"hdp/tokens_per_s", "hdp/imbalance_est", "hdp/p2p_bytes"} <= set(default_logs[0])
