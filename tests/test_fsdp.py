"""FSDP2 under HDP (``TrainingArguments(fsdp=...)``, :mod:`hf_hdp.engine.fsdp`), on gloo CPU ranks.

Both modes, on 4 and 2 ranks, AdamW with weight decay and gradient clipping, ranks running
different numbers of micro-batches (one none) in ``shard_grad_op`` (ZeRO-2 mode), lockstep plans in
``full_shard`` (ZeRO-3 mode): the weights after 4 steps equal one process's (float64); each rank holds
only its shard of the weights and of the optimizer state; a checkpoint holds each rank's shards of both
(consolidated: equal to one process's), and resumes at another world size and in the other
mode to the uninterrupted run's weights. Lockstep plans and their metrics are tested without processes.
"""

from __future__ import annotations

import random

import pytest
import torch

from hf_hdp.planning import CostModel, lockstep, plan_balanced, plan_metrics, plan_naive
from tests.models import save_tiny_model
from tests.test_zero import FSDP_RUNS_2, FSDP_RUNS_4, STEPS, _close

RUNS_4 = FSDP_RUNS_4
RUNS_2 = FSDP_RUNS_2


@pytest.fixture(scope="module")
def trained(sharded_runs):
    """The runs of tests/test_zero.py's :func:`train_all` (shared: one launch per world for both files)."""
    return {**sharded_runs, 1: sharded_runs[1]["adamw"], "tied": sharded_runs[1]["tied"]["weights"]}


def test_both_modes_train_the_weights_of_one_process(trained):
    one = trained[1]["weights"]
    for r in range(4):
        for name in RUNS_4:
            assert trained[4][r][name]["fsdp_modules"] > 1, name  # every decoder layer and the root
            _close(trained[4][r][name]["weights"], one, f"4 ranks, rank {r}, {name}")
    for r in range(2):
        for name, mode in (("grad_op_checkpointing", "shard_grad_op"), ("full_shard_checkpointing", "full_shard")):
            assert trained[2][r][name]["fsdp_mode"] == mode
            _close(trained[2][r][name]["weights"], one, f"2 ranks, rank {r}, {name}")
        _close(trained[2][r]["full_shard_tied"]["weights"], trained["tied"], f"2 ranks, rank {r}, tied embeddings")


def test_evaluation_on_the_sharded_model_gives_one_processs_loss(trained):
    for r in range(4):
        for name in RUNS_4:
            assert trained[4][r][name]["fsdp_mode"] == name
            assert trained[4][r][name]["eval_loss"] == pytest.approx(trained[1]["eval_loss"], rel=1e-10), (r, name)


def test_ranks_ran_different_counts_in_zero2_mode_and_equal_counts_in_zero3_mode(trained):
    grad_op = list(zip(*[trained[4][r]["shard_grad_op"]["micro_batches"] for r in range(4)]))
    assert len(grad_op) == STEPS and any(0 in s for s in grad_op) and any(len(set(s)) > 1 for s in grad_op), grad_op
    full = list(zip(*[trained[4][r]["full_shard"]["micro_batches"] for r in range(4)]))
    assert all(len(set(s)) == 1 and s[0] >= 1 for s in full), full  # lockstep: one per slot on every rank


def test_each_rank_holds_only_its_shard_of_weights_and_optimizer_state(trained):
    for name in RUNS_4:
        total = trained[4][0][name]["param_numel"]
        weights = [trained[4][r][name]["local_param_numel"] for r in range(4)]
        states = [trained[4][r][name]["state_numel"] for r in range(4)]
        assert sum(weights) == total and sum(states) == 2 * total, (name, weights, states)
        assert all(w <= 1.05 * total / 4 + 64 for w in weights), (name, weights, total)  # dim-0 chunks of each
        assert all(s <= 2 * (1.05 * total / 4 + 64) for s in states), (name, states, total)


def test_a_checkpoint_holds_each_ranks_shards_and_consolidates_to_one_processs_state(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_hdp.engine.export import consolidate

    base = trained["base"]
    plain = torch.load(base / "w1" / "adamw" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    for name in RUNS_4:
        folder = base / "w4" / name / "checkpoint-2"
        assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()
        out = consolidate(str(folder), str(tmp_path / name), optimizer=True)
        saved = torch.load(f"{out}/optimizer.pt", weights_only=False)
        assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in plain["param_groups"]]
        assert sorted(saved["state"]) == sorted(plain["state"])
        for i, s in plain["state"].items():
            for k, v in s.items():
                torch.testing.assert_close(
                    torch.as_tensor(saved["state"][i][k]), torch.as_tensor(v), rtol=1e-9, atol=1e-13
                )
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
        reference = AutoModelForCausalLM.from_pretrained(base / "w1" / "adamw" / "checkpoint-2", dtype=torch.float64)
        _close(model.state_dict(), reference.state_dict(), f"{name} checkpoint weights")


def test_a_checkpoint_resumes_at_another_world_size_in_the_other_mode(trained):
    one = trained[1]["weights"]
    for r in range(2):
        run = trained[2][r]["full_shard_from4_grad_op"]
        assert len(run["micro_batches"]) == STEPS - 2
        _close(run["weights"], one, f"2 ranks, rank {r}, resumed")


def test_fsdp_settings_hdp_cannot_honour_are_refused(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from tests.models import load_model

    model = load_model(save_tiny_model("llama", str(tmp_path / "m")))
    cases = [
        (dict(fsdp="full_shard offload"), "cpu_offload"),
        (dict(fsdp="full_shard", fsdp_config={"activation_checkpointing": True}), "gradient_checkpointing=True"),
        (
            dict(fsdp="full_shard", fsdp_config={"state_dict_type": "LOCAL_STATE_DICT"}),
            r"'LOCAL_STATE_DICT'.*Set 'SHARDED_STATE_DICT' .*or 'FULL_STATE_DICT'",
        ),
        (dict(fsdp="full_shard", fsdp_config={"auto_wrap_policy": "SIZE_BASED_WRAP"}), "TRANSFORMER_BASED_WRAP"),
    ]
    for kwargs, text in cases:
        args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], **kwargs)
        with pytest.raises(ValueError, match=text):
            HDPTrainer(model, args)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], fsdp="full_shard")
    with pytest.raises(ValueError, match=r"zero_stage=1 and TrainingArguments.fsdp.*drop HDPConfig.zero_stage"):
        HDPTrainer(model, args, hdp_config=HDPConfig(zero_stage=1))
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        use_cpu=True,
        report_to=[],
        fsdp="full_shard",
        fsdp_config={"transformer_layer_cls_to_wrap": ["NoSuchLayer"]},
    )
    with pytest.raises(ValueError, match=r"names \['NoSuchLayer'\], which LlamaForCausalLM does not contain"):
        HDPTrainer(model, args)  # at construction, not when training starts
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(load_model(str(tmp_path / "m")), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"does not apply FSDP to a PEFT model"):
        HDPTrainer(
            lora, TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], fsdp="full_shard")
        )
    for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):  # honoured: each checkpoint as that kind
        args = TrainingArguments(
            output_dir=str(tmp_path / "o"),
            use_cpu=True,
            report_to=[],
            fsdp="full_shard",
            fsdp_config={"state_dict_type": kind},
            load_best_model_at_end=True,
            eval_strategy="steps",
            save_strategy="steps",
        )
        evals = Dataset.from_list([{"input_ids": [1, 2, 3, 4]}])
        HDPTrainer(model, args, eval_dataset=evals)  # load_best_model_at_end under FSDP: tests/test_fsdp_best_model.py


# ------------------------------------------------------------------ lockstep plans (no processes)
def test_lockstep_plans_hold_one_micro_batch_per_slot_on_every_rank_and_price_the_barriers():
    rng = random.Random(3)
    cost = CostModel.default()
    for _trial in range(20):
        W = rng.choice([2, 3, 4, 8])
        lengths = [rng.choice([50, 300, 2000, 9000, 30000]) for _ in range(rng.randint(1, 30))]
        lengths = [min(n, W * 8192) for n in lengths]
        free = plan_balanced(lengths, W, 8192, cost)
        plan = plan_balanced(lengths, W, 8192, cost, lockstep=True).validate()
        assert plan.is_lockstep and plan.meta["lockstep"]
        counts = {len(plan.for_rank(r)) for r in range(W)}
        assert counts == {plan.num_slots}
        real = [mb for mb in plan.micro_batches if mb.pieces]
        assert sorted(p.sample for p in plan.pieces()) == list(range(len(lengths)))
        assert len(real) >= plan.num_slots
        # every slot is a barrier: the step is at least the sum over slots of the slowest rank
        metrics = plan_metrics(plan, cost)
        slowest = sum(
            max(cost.micro_batch_breakdown(mb)[0] for mb in plan.micro_batches if mb.slot == s)
            for s in range(plan.num_slots)
        )
        assert metrics.step_time_s >= slowest * (1 - 1e-9)
        assert metrics.step_time_s >= plan_metrics(free, cost).step_time_s * (1 - 1e-9) or W == 1
        naive = lockstep(plan_naive(lengths, W, 8192))
        assert metrics.step_time_s <= plan_metrics(naive, cost).step_time_s * (1 + 1e-9)  # never worse than naive
        assert lockstep(plan).micro_batches == plan.micro_batches  # idempotent
