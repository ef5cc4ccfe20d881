"""HDPGRPOTrainer's model states as HDPTrainer's: ZeRO 0/1/2, clipping, an empty step, offloading, C="auto".

Same tiny float64 Llama, fixed rollouts and one-process stock reference as tests/test_rl_grpo.py, with AdamW
(weight decay 0.1, epsilon 1e-3) and gradient clipping (max_grad_norm 0.05, below the gradients' norms: every
step clips):

- ``zero0`` / ``zero1_kl`` / ``zero2_empty``: ZeRO stage 0, 1 (with the reference model, ``beta > 0``) and 2
  give stock's logged loss, ``grad_norm`` and metrics and its weights after two steps;
- ``zero2_empty``: the first step's rollouts are all truncated and masked (``mask_truncated_completions``),
  so the global batch has no completion token: stock steps AdamW on zero gradients (weight decay, the
  step count), and so does HDP;
- ``zero1_kl`` saves a checkpoint per step (sharded optimizer state, no ``optimizer.pt``) and a second
  trainer resumed from ``checkpoint-1`` ends with the uninterrupted run's weights;
- ``offload_auto``: ``offload_ratio=0.5`` (bytes really go to the host) and ``tokens_per_rank="auto"`` from a
  memory budget less the reference model's weights (C about 40, so the longest rollout is split).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")

from tests.dist_utils import run_distributed
from tests.models import load_model
from tests.test_rl_grpo import (
    WORLD,
    G,
    build_tiny_model,
    fixed_completions,
    grpo_config,
    length_reward,
    prompts_dataset,
)

C = 40
# adam_epsilon 1e-3: Adam's update g / (|g| + eps) amplifies a gradient's error by up to lr / eps where g is
# near 0, and TRL's fused log-prob kernel runs in float32 (errors near 1e-9): at eps 1e-8 that is 1e-3 per entry
ADAMW = dict(optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.05, adam_epsilon=1e-3)
CASES = {  # name: (GRPOConfig fields, HDPConfig fields)
    "zero0": (dict(loss_type="grpo", num_iterations=2), dict(zero_stage=0, tokens_per_rank=C)),
    "zero1_kl": (
        dict(loss_type="grpo", beta=0.1, save_strategy="steps", save_steps=1),
        dict(zero_stage=1, tokens_per_rank=C),
    ),
    "zero2_empty": (dict(loss_type="dapo", mask_truncated_completions=True), dict(zero_stage=2, tokens_per_rank=C)),
    # 0.00282 GB less the reference model's 0.64 MB leaves C = 40 for AdamW at ZeRO-2 (C = 104 with the whole budget)
    "offload_auto": (
        dict(loss_type="bnpo", beta=0.05),
        dict(zero_stage=2, tokens_per_rank="auto", memory_budget_gb=0.00282, offload_ratio=0.5),
    ),
}
METRICS = ("loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean", "reward")
EMPTY_PROMPTS = range(4)  # the first step's prompts (4 prompts x G completions per step, in order)


def truncated_first_step(self, prompt_ids, *args, **kwargs):
    """``fixed_completions``, except that the first step's completions end without EOS (truncated)."""
    completions, extra = fixed_completions(self, prompt_ids, *args, **kwargs)
    eos = self.processing_class.eos_token_id
    for ids, c in zip(prompt_ids, completions):
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        if int(self.processing_class.decode(ids)[1:-1]) in EMPTY_PROMPTS:
            c[-1] = eos + 1
    return completions, extra


def history(trainer) -> list[dict]:
    return [{k: e[k] for k in METRICS if k in e} for e in trainer.state.log_history if "loss" in e]


def build(cls, model_path, out, per_device, case, hdp=None, **extra):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    fields = {**ADAMW, **CASES[case][0], **extra}
    kwargs = {} if hdp is None else {"hdp_config": hdp}
    trainer = cls(
        load_model(model_path),
        reward_funcs=length_reward,
        args=grpo_config(out, per_device, **fields),
        train_dataset=prompts_dataset(),
        processing_class=tok,
        **kwargs,
    )
    generate = truncated_first_step if case == "zero2_empty" else fixed_completions
    trainer._generate_single_turn = generate.__get__(trainer)
    return trainer


def weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _worker(rank, world_size, model_path, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    from hf_hdp import HDPConfig
    from hf_hdp.engine.zero import unwrap_zero
    from hf_hdp.integrations.rl import HDPGRPOTrainer

    results = {}
    for case, (_, hdp_fields) in CASES.items():
        trainer = build(
            HDPGRPOTrainer, model_path, os.path.join(out, case), G * WORLD // world_size, case, HDPConfig(**hdp_fields)
        )
        trainer.train()
        zero = unwrap_zero(trainer.optimizer)
        offload = trainer.hdp_offload.stats.bytes_to_host if trainer.hdp_offload is not None else 0
        results[case] = dict(
            history=history(trainer),
            weights=weights(trainer),
            steps=trainer.hdp_history,
            stage=0 if zero is None else zero.stage,
            offload=offload,
            tokens_per_rank=trainer.hdp_config.tokens_per_rank,
        )
        if case == "zero1_kl":
            checkpoint = os.path.join(out, case, "checkpoint-1")
            results[case]["files"] = sorted(os.listdir(checkpoint))
            resumed = build(
                HDPGRPOTrainer,
                model_path,
                os.path.join(out, case + "_resumed"),
                G * WORLD // world_size,
                case,
                HDPConfig(**hdp_fields),
                save_strategy="no",
            )
            resumed.train(resume_from_checkpoint=checkpoint)
            results[case]["resumed"] = weights(resumed)
    return results


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("rl_sharding") / "llama"))


@pytest.fixture(scope="module")
def hdp_runs(tiny, tmp_path_factory):
    return run_distributed(_worker, WORLD, tiny, str(tmp_path_factory.mktemp("hdp")), timeout=1200)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_rl_steps_equal_one_process(case, tiny, hdp_runs, tmp_path):
    from trl import GRPOTrainer

    stock = build(GRPOTrainer, tiny, str(tmp_path / "stock"), G * WORLD, case, save_strategy="no")
    stock.train()
    want_history, want = history(stock), weights(stock)
    assert len(want_history) == 2
    assert all(h["grad_norm"] > ADAMW["max_grad_norm"] for h in want_history if h["grad_norm"] > 0), want_history
    stage = CASES[case][1]["zero_stage"]
    for rank in range(WORLD):
        run = hdp_runs[rank][case]
        assert run["stage"] == stage
        assert len(run["history"]) == 2
        for got, expected in zip(run["history"], want_history):
            assert set(got) == set(expected), (got, expected)
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (
                    case,
                    rank,
                    key,
                    run["history"],
                )
        for k, w in want.items():
            torch.testing.assert_close(run["weights"][k], w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case} {k}: {m}")
    assert max(s["max_group"] for s in hdp_runs[0][case]["steps"]) >= 3  # the 98-token rollout ran split


def test_an_empty_global_batch_steps_adamw_on_zero_gradients(tiny, hdp_runs):
    """Step 1 of ``zero2_empty`` holds no completion token: its grad_norm is 0, yet AdamW's weight decay moved
    the weights (checked against stock above); here: HDP planned it as a batch without loss tokens."""
    run = hdp_runs[0]["zero2_empty"]
    assert run["history"][0]["grad_norm"] == 0.0 and run["history"][1]["grad_norm"] > 0
    initial = load_model(tiny).state_dict()
    assert any(not torch.equal(initial[k], w) for k, w in run["weights"].items())


def test_a_sharded_checkpoint_resumes_to_the_same_weights(hdp_runs):
    for rank in range(WORLD):
        run = hdp_runs[rank]["zero1_kl"]
        assert "hdp_sharded" in run["files"] and "optimizer.pt" not in run["files"], run["files"]
        for k, w in run["weights"].items():
            torch.testing.assert_close(run["resumed"][k], w, rtol=1e-12, atol=1e-14)


def test_offloading_moved_bytes_and_auto_capacity_left_room_for_the_reference(hdp_runs):
    assert all(hdp_runs[r]["offload_auto"]["offload"] > 0 for r in range(WORLD))
    c = hdp_runs[0]["offload_auto"]["tokens_per_rank"]
    assert isinstance(c, int) and 30 <= c <= 50, c  # 104 if the reference model's weights were not counted
