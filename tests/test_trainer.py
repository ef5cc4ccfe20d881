"""HDPTrainer end to end: world-size invariance under torchrun, and the errors bad input gets."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import BloomConfig, BloomForCausalLM, TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.collators import HDPDataError
from hf_hdp.models import UnsupportedModelError
from tests.dist_utils import run_train_steps
from tests.models import load_model, save_tiny_model


def _run(nproc: int, model: str, out: str, *extra: str) -> dict:
    return run_train_steps(nproc, model, out, *extra)


def test_three_steps_on_4_ranks_equal_1_rank(tmp_path):
    """Mistral with a 4-token sliding window (the samples are many windows long and split over 3 and 4 ranks):
    4 ranks train the weights of one, and the P2P bytes (the windowed layers send only the rows a window
    reaches) equal the plan's estimate. (tests/test_model_families.py shows the window is the model's own,
    against a dense reference, for every sliding family.)"""
    from transformers import AutoConfig

    model = save_tiny_model("mistral", str(tmp_path / "model"))  # from_pretrained round trip
    config = AutoConfig.from_pretrained(model)
    config.sliding_window = 4
    config.save_pretrained(model)
    one = _run(1, model, str(tmp_path / "one"), "--tokens_per_rank", "64")
    four = _run(4, model, str(tmp_path / "four"), "--tokens_per_rank", "16")
    initial = load_model(model).state_dict()
    assert any(not torch.equal(initial[k], one["weights"][k]) for k in initial), "training changed nothing"
    for k, w in one["weights"].items():
        torch.testing.assert_close(four["weights"][k], w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    losses = lambda log: [e["loss"] for e in log["log_history"] if "loss" in e]
    assert len(losses(one)) == 3
    assert losses(four) == pytest.approx(losses(one), rel=1e-6)
    # on 4 ranks long samples really were split, into groups of 3 and 4 ranks (C = 16)
    sizes = {int(k) for k in four["hdp"]["group_sizes"]}
    assert sizes >= {1, 3} and max(sizes) > 1, four["hdp"]
    assert four["hdp"]["p2p_bytes_this_rank"] > 0
    assert set(one["hdp"]["group_sizes"]) == {"1"}
    # HDP's figures reach the Trainer's logs; the P2P bytes counted in the mesh equal the plan's estimate, per step
    steps = [e for e in four["log_history"] if "loss" in e]
    assert all(s["p2p_bytes"] == s["p2p_bytes_est"] for s in four["steps"])
    assert any(e["hdp/p2p_bytes"] > 0 for e in steps)
    assert all(e["hdp/imbalance_est"] >= 1.0 and e["hdp/tokens_per_s"] > 0 for e in steps)


# ------------------------------------------------------------------ bad input
def _args(tmp_path, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m") / "llama"))


def _trainer(tiny, tmp_path, rows, **cfg):
    return HDPTrainer(
        load_model(tiny, dtype=torch.float32),
        _args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        hdp_config=HDPConfig(**cfg),
    )


def test_sample_longer_than_world_capacity_is_refused(tiny, tmp_path):
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": list(range(40))}]
    with pytest.raises(HDPDataError, match=r"sample 1 has 40 tokens.*1 x 32 = 32.*tokens_per_rank to at least 40"):
        _trainer(tiny, tmp_path, rows, tokens_per_rank=32)


def test_empty_sample_is_refused(tiny, tmp_path):
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}, {"input_ids": []}]
    with pytest.raises(HDPDataError, match=r"sample 2 is empty"):
        _trainer(tiny, tmp_path, rows, tokens_per_rank=32)


def test_labels_of_another_length_are_refused(tiny, tmp_path):
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [-100, 5]}]
    with pytest.raises(HDPDataError, match=r"sample 1: `labels` has 2 entries but `input_ids` has 3"):
        _trainer(tiny, tmp_path, rows, tokens_per_rank=32)


def test_missing_input_ids_column_is_refused(tiny, tmp_path):
    with pytest.raises(HDPDataError, match=r"no `input_ids` column.*\['text'\]"):
        _trainer(tiny, tmp_path, [{"text": "hello"}], tokens_per_rank=32)


def test_out_of_vocabulary_token_is_refused_before_training(tiny, tmp_path):
    # refused when the trainer is built (the id-range columns measure_dataset adds), before any step
    with pytest.raises(HDPDataError, match=r"sample 1: token id 999 is outside the model's vocabulary \[0, 128\)"):
        _trainer(
            tiny,
            tmp_path,
            [{"input_ids": [1, 2, 3]}, {"input_ids": [5, 999, 2]}],
            tokens_per_rank=32,
            global_batch_size=2,
        )


def test_model_without_attention_interface_is_refused(tmp_path):
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match=r"BloomForCausalLM does not route its attention through"):
        HDPTrainer(model, _args(tmp_path), train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]))


def test_model_that_ignores_hdp_attention_is_stopped_at_the_first_step(tiny, tmp_path):
    model = load_model(tiny, dtype=torch.float32)
    trainer = HDPTrainer(
        model,
        _args(tmp_path),
        train_dataset=Dataset.from_list([{"input_ids": [1, 2, 3]}] * 2),
        hdp_config=HDPConfig(tokens_per_rank=8, global_batch_size=2),
    )
    model.set_attn_implementation("sdpa")  # as if the model bypassed the interface
    with pytest.raises(RuntimeError, match=r"without calling the 'hdp' attention"):
        trainer.train()


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="tokens_per_rank must be at least 1"):
        HDPConfig(tokens_per_rank=0)
    with pytest.raises(ValueError, match="planner must be one of"):
        HDPConfig(planner="magic")
    with pytest.raises(ValueError, match="attention_split must be one of"):
        HDPConfig(attention_split="heads")
    with pytest.raises(ValueError, match=r"attention_split='ulysses' needs planner='balanced'.*attention_split='ring'"):
        HDPConfig(attention_split="ulysses", planner="naive")
    with pytest.raises(ValueError, match="ranks_per_node must be a positive integer"):
        HDPConfig(ranks_per_node=0)


def test_liger_kernels_are_refused_with_the_reason(tmp_path):
    with pytest.raises(
        ValueError, match=r"use_liger_kernel=True is not supported.*GLOBAL batch.*use_liger_kernel=False"
    ):
        HDPConfig().check_training_args(_args(tmp_path, use_liger_kernel=True))


def test_ranks_per_node_comes_from_the_config_or_the_launcher(monkeypatch):
    from hf_hdp.distributed.launch import launcher_ranks_per_node

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launcher_ranks_per_node(None) == 2
    assert launcher_ranks_per_node(4) == 4  # the config wins
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launcher_ranks_per_node(None) is None  # the hardware preset's


def test_the_trainer_plans_with_the_configured_split_and_nodes(tiny, tmp_path):
    trainer = HDPTrainer(
        load_model(tiny),
        _args(tmp_path),
        train_dataset=Dataset.from_list([{"input_ids": [1, 2]}] * 4),
        hdp_config=HDPConfig(tokens_per_rank=64, attention_split="hybrid", ranks_per_node=3),
    )
    assert (
        trainer.cost_model.ranks_per_node == 3
        and trainer.cost_model.num_heads == trainer.model.config.num_attention_heads
    )
    steps = trainer.get_train_dataloader().dataset
    assert steps.num_heads == trainer.model.config.num_attention_heads
    assert steps.planner.keywords["attention_split"] == "hybrid"


def test_global_batch_and_gradient_accumulation_cannot_both_be_set(tiny, tmp_path):
    with pytest.raises(ValueError, match="both set the batch"):
        HDPTrainer(
            load_model(tiny),
            _args(tmp_path, gradient_accumulation_steps=2),
            train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]),
            hdp_config=HDPConfig(global_batch_size=4),
        )


def test_plain_swap_without_hdp_config_uses_trainers_batch(tiny, tmp_path):
    args = _args(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2)
    trainer = HDPTrainer(load_model(tiny), args, train_dataset=Dataset.from_list([{"input_ids": [1, 2, 3]}] * 12))
    assert trainer.global_batch_size == 6
    assert trainer.args.gradient_accumulation_steps == 1
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))


def test_hf_argument_parser_reads_hdp_config():
    from transformers import HfArgumentParser

    args, cfg = HfArgumentParser((TrainingArguments, HDPConfig)).parse_args_into_dataclasses(
        ["--output_dir", "x", "--tokens_per_rank", "8192", "--global_batch_size", "64", "--planner", "static"]
    )
    assert (cfg.tokens_per_rank, cfg.global_batch_size, cfg.planner) == (8192, 64, "static")
