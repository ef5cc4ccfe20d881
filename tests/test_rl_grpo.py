"""HDPGRPOTrainer / HDPRLOOTrainer (hf_hdp.integrations.rl) on 4 gloo ranks equal TRL's stock trainers on one process.

A character-level tokenizer and a tiny Llama in float64, saved locally. Generation is replaced by a
fixed rule (:func:`fixed_completions`): completion ``j`` of prompt ``k`` has a fixed length and fixed
tokens, whatever rank runs it, so stock and HDP train on the same rollouts. The lengths are long-tailed
(3 to 95 tokens) at ``tokens_per_rank`` 40: the long rollouts run split over 2-3 ranks. Stock runs the
16 rollouts of a step as one batch on one process; HDP runs 4 per rank on 4 ranks. Two optimizer
steps (SGD): the logged loss and metrics of each step and the final weights agree. Tolerances are
float32's: TRL's fused log-prob kernel runs in float32 even for a float64 model.
"""

from __future__ import annotations

import os

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from tests.dist_utils import run_distributed  # noqa: E402
from tests.models import load_model  # noqa: E402

WORLD = 4
G = 4  # completions per prompt
PROMPTS = 8  # two steps of 4 prompts x 4 completions
C = 40  # tokens per rank
STEPS = 2
# completion lengths (EOS included) of completion j of prompt k: a long tail, the longest split over 3 ranks
LENGTHS = [
    [3, 95, 7, 12],
    [60, 5, 9, 4],
    [22, 3, 41, 6],
    [8, 70, 15, 30],
    [5, 44, 3, 9],
    [18, 6, 81, 11],
    [4, 13, 7, 52],
    [36, 5, 10, 3],
]

CASES = {
    "grpo": dict(loss_type="grpo"),
    "grpo_kl_2it": dict(loss_type="grpo", beta=0.1, num_iterations=2),
    "bnpo_2it": dict(loss_type="bnpo", num_iterations=2),
    "dr_grpo_kl": dict(loss_type="dr_grpo", beta=0.1),
    "dapo_2it": dict(loss_type="dapo", num_iterations=2),
    "cispo_kl_2it": dict(loss_type="cispo", beta=0.05, num_iterations=2),
    "sapo_2it": dict(loss_type="sapo", num_iterations=2),
    "vespo_2it": dict(loss_type="vespo", num_iterations=2),
    "luspo_seq_2it": dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2),
    "grpo_seq_entropy_2it": dict(
        loss_type="grpo",
        importance_sampling_level="sequence",
        num_iterations=2,
        top_entropy_quantile=0.5,
        beta=0.1,
        epsilon=0.05,
    ),
    "rloo_kl_2it": dict(beta=0.05, num_iterations=2),
}
RLOO_CASES = {"rloo_kl_2it"}
ROTATED = "grpo_kl_2it"  # also run with every piece moved to the next rank: the same results
METRICS = (
    "loss",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cispo_clip_ratio",
    "vespo/phi_seq_mean",
    "reward",
)


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:"


def build_tiny_model(path: str) -> str:
    """A character-level tokenizer and a tiny Llama, saved with save_pretrained (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS) + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rl") / "llama")
    build_tiny_model(path)
    return path


def prompts_dataset() -> Dataset:
    return Dataset.from_list([{"prompt": f"q{k}:"} for k in range(PROMPTS)])  # 3 tokens each: no padding


def fixed_completions(self, prompt_ids, *args, **kwargs):
    """Stands in for ``GRPOTrainer._generate_single_turn``: completion ``j`` (its place in the prompt's
    group) of prompt ``k`` has ``LENGTHS[k][j]`` tokens drawn from a generator seeded by ``(k, j)``."""
    eos = self.processing_class.eos_token_id
    vocab = self.model.config.vocab_size
    out = []
    for i, ids in enumerate(prompt_ids):
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        k = int(self.processing_class.decode(ids)[1:-1])
        j = i % G  # every rank holds whole groups (per-device batch a multiple of G)
        g = torch.Generator().manual_seed(1000 * k + j)
        body = torch.randint(3, vocab - 1, (LENGTHS[k][j] - 1,), generator=g).tolist()
        out.append(body + [eos])
    return out if isinstance(self, trl.RLOOTrainer) else (out, None)


def length_reward(completions, **kwargs):
    return [float((len(c) * 7) % 11) / 5.0 for c in completions]


def grpo_config(out: str, per_device: int, rloo: bool = False, **kw):
    from trl import GRPOConfig, RLOOConfig

    base = dict(
        output_dir=out,
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_steps=STEPS,
        seed=0,
        per_device_train_batch_size=per_device,
        num_generations=G,
        max_completion_length=100,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_grad_norm=0.0,
        shuffle_dataset=False,
    )
    base.update(kw)
    return (RLOOConfig if rloo else GRPOConfig)(**base)


def _history(trainer) -> list[dict]:
    return [{k: e[k] for k in METRICS if k in e} for e in trainer.state.log_history if "loss" in e]


def rotate_ranks(planner, shift: int = 1):
    """``planner`` with every micro-batch and piece moved from rank ``r`` to rank ``r + shift``: each rollout
    then runs on other ranks than its owner, and its tokens and results travel."""
    import dataclasses

    from hf_hdp.planning import MicroBatch

    def plan(lengths, world, tokens_per_rank):
        p = planner(lengths, world, tokens_per_rank)

        def move(r):
            return (r + shift) % world

        mbs = [
            MicroBatch(
                move(mb.rank),
                mb.slot,
                tuple(dataclasses.replace(pc, group=tuple(move(g) for g in pc.group)) for pc in mb.pieces),
            )
            for mb in p.micro_batches
        ]
        return dataclasses.replace(p, micro_batches=tuple(sorted(mbs, key=lambda m: (m.slot, m.rank))))

    return plan


def _run(trainer_cls, model_path, out, per_device, case, hdp_config=None, rotate=False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    extra = {} if hdp_config is None else {"hdp_config": hdp_config}
    trainer = trainer_cls(
        load_model(model_path),
        reward_funcs=length_reward,
        args=grpo_config(out, per_device, case in RLOO_CASES, **CASES[case]),
        train_dataset=prompts_dataset(),
        processing_class=tok,
        **extra,
    )
    trainer._generate_single_turn = fixed_completions.__get__(trainer)
    if rotate:
        trainer.hdp_planner = rotate_ranks(trainer.hdp_planner)
    trainer.train()
    return _history(trainer), {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer


def stock_run(model_path: str, out: str, case: str):
    from trl import GRPOTrainer, RLOOTrainer

    history, weights, _ = _run(RLOOTrainer if case in RLOO_CASES else GRPOTrainer, model_path, out, G * WORLD, case)
    return history, weights


def _hdp_worker(rank, world_size, model_path, out, cases):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    from hf_hdp import HDPConfig
    from hf_hdp.integrations.rl import HDPGRPOTrainer, HDPRLOOTrainer

    results = {}
    for case in cases:
        rotate = case.endswith("+rotated")
        name = case.removesuffix("+rotated")
        cls = HDPRLOOTrainer if name in RLOO_CASES else HDPGRPOTrainer
        history, weights, trainer = _run(
            cls,
            model_path,
            os.path.join(out, case),
            G * WORLD // world_size,
            name,
            HDPConfig(tokens_per_rank=C),
            rotate=rotate,
        )
        results[case] = (history, weights, trainer.hdp_history)
    return results


@pytest.fixture(scope="module")
def hdp_runs(tiny, tmp_path_factory):
    return run_distributed(
        _hdp_worker, WORLD, tiny, str(tmp_path_factory.mktemp("hdp")), (*CASES, ROTATED + "+rotated"), timeout=1200
    )


@pytest.mark.parametrize("case", list(CASES))
def test_hdp_rl_on_4_ranks_equals_stock(case, tiny, hdp_runs, tmp_path):
    stock_history, stock_weights = stock_run(tiny, str(tmp_path / "stock"), case)
    assert len(stock_history) == STEPS
    initial = load_model(tiny).state_dict()
    assert any(not torch.equal(initial[k], stock_weights[k]) for k in initial), "training changed nothing"
    for rank in range(WORLD):
        history, weights, steps = hdp_runs[rank][case]
        assert len(history) == STEPS, history
        for got, want in zip(history, stock_history):
            assert set(got) == set(want), (got, want)
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (case, rank, key, history, stock_history)
        for k, w in stock_weights.items():
            torch.testing.assert_close(weights[k], w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case} {k}: {m}")
    # the long rollouts really ran split: a piece group of 3 ranks (95 tokens at C = 40)
    assert max(s["max_group"] for s in hdp_runs[0][case][2]) >= 3, hdp_runs[0][case][2]


def test_moved_rollouts_come_back_to_their_owner(hdp_runs):
    """Every piece placed on the next rank (no rollout runs where it was generated): the same steps."""
    history, weights, _ = hdp_runs[0][ROTATED]
    moved_history, moved_weights, _ = hdp_runs[0][ROTATED + "+rotated"]
    for got, want in zip(moved_history, history):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, moved_history, history)
    for k, w in weights.items():
        torch.testing.assert_close(moved_weights[k], w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "config, hdp, message",
    [
        (dict(use_liger_kernel=True), {}, r"use_liger_kernel=True cannot be honoured"),
        (dict(entropy_coef=0.01), {}, r"entropy_coef.*set entropy_coef=0.0"),
        (dict(gradient_accumulation_steps=2), {}, r"gradient_accumulation_steps=2.*set it to 1"),
        (dict(steps_per_generation=2), {}, r"steps_per_generation=2.*steps_per_generation=1"),
        (dict(use_vllm=True), {}, r"use_vllm=True cannot be honoured"),
        ({}, dict(tokens_per_rank="auto"), r"tokens_per_rank='auto'.*on cpu.*Set HDPConfig\(memory_budget_gb=...\)"),
        (dict(fsdp="full_shard"), {}, r"fsdp=.*cannot be honoured.*per-layer weight gathers.*zero_stage=1 or 2"),
        ({}, dict(tokens_per_rank=64, global_batch_size=64), r"global_batch_size=64 cannot be honoured.*= 4"),
        ({}, dict(tokens_per_rank=64, long_sample_policy="truncate"), r"long_sample_policy='truncate'"),
    ],
)
def test_refusals_name_the_option(tiny, tmp_path, config, hdp, message):
    from transformers import AutoTokenizer

    from hf_hdp import HDPConfig
    from hf_hdp.integrations.rl import HDPGRPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny, padding_side="left")
    with pytest.raises(ValueError, match=message):
        HDPGRPOTrainer(
            load_model(tiny),
            reward_funcs=length_reward,
            args=grpo_config(str(tmp_path), G, **config),
            train_dataset=prompts_dataset(),
            processing_class=tok,
            hdp_config=HDPConfig(**{"tokens_per_rank": C, **hdp}),
        )


def test_moe_router_aux_loss_is_refused(tmp_path):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from hf_hdp import HDPConfig
    from hf_hdp.integrations.rl import HDPGRPOTrainer

    path = build_tiny_model(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
            num_experts_per_tok=1,
            router_aux_loss_coef=0.01,
            output_router_logits=True,
        )
    )
    with pytest.raises(ValueError, match=r"router auxiliary loss.*router_aux_loss_coef=0.0"):
        HDPGRPOTrainer(
            model,
            reward_funcs=length_reward,
            args=grpo_config(str(tmp_path / "out"), G),
            train_dataset=prompts_dataset(),
            processing_class=tok,
            hdp_config=HDPConfig(tokens_per_rank=C),
        )
