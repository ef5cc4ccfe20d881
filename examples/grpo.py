"""GRPO with TRL's GRPOTrainer and Hybrid Data Parallelism, offline on a tiny local model.

A character-level tokenizer and a tiny Llama are built locally (no download). Prompts ask for a
"reasoning trace"; the reward prefers completions whose length is close to a per-prompt target, so the
policy learns a long-tailed length mix: most answers short, a few long. TRL generates with
transformers' ``generate`` and scores the rollouts; HDP plans each step over the rollouts of all
ranks and splits the long ones over ``ceil(length / tokens_per_rank)`` ranks::

    torchrun --nproc_per_node 4 examples/grpo.py
    torchrun --nproc_per_node 4 examples/grpo.py --loss_type dapo --beta 0.04 --num_iterations 2
    python examples/grpo.py --stock        # TRL's own GRPOTrainer, for comparison (one process)

For a real model: ``--model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --tokens_per_rank 8192``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from hf_hdp import HDPConfig
from hf_hdp.integrations.rl import HDPGRPOTrainer

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:"


def build_tiny_model(path: str) -> str:
    """A character-level tokenizer and a tiny Llama, saved with save_pretrained."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS) + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]", padding_side="left"
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
        max_position_embeddings=4096,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def prompts(n: int) -> Dataset:
    """``n`` prompts; one in eight asks for a long trace (the long tail)."""
    return Dataset.from_list(
        [
            {"prompt": f"task {i}: think {'long' if i % 8 == 0 else 'brief'}ly.", "target": 400 if i % 8 == 0 else 20}
            for i in range(n)
        ]
    )


def length_reward(completions, target, **kwargs):
    """Closer to the prompt's target length is better."""
    return [-abs(len(c) - t) / t for c, t in zip(completions, target)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--tokens_per_rank", type=int, default=256)
    parser.add_argument(
        "--zero_stage",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="ZeRO stage of the optimizer (default: 1 on several ranks, 0 on one)",
    )
    parser.add_argument("--loss_type", default="dapo")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--num_iterations", type=int, default=1)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=512)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--stock", action="store_true", help="run TRL's own GRPOTrainer instead")
    args = parser.parse_args()

    path = args.model_name_or_path
    if path is None:
        # a folder per rank: the ranks build at once, before any process group exists (one seed: one model)
        path = build_tiny_model(os.path.join(tempfile.gettempdir(), f"hf_hdp_grpo_tiny_{os.environ.get('RANK', '0')}"))
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    config = GRPOConfig(
        output_dir=args.output_dir or os.path.join(tempfile.gettempdir(), "hf_hdp_grpo_out"),
        per_device_train_batch_size=args.per_device_train_batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        loss_type=args.loss_type,
        beta=args.beta,
        num_iterations=args.num_iterations,
        max_steps=args.max_steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        temperature=1.0,
        seed=0,
    )
    common = dict(reward_funcs=length_reward, args=config, train_dataset=prompts(64), processing_class=tokenizer)
    if args.stock:
        trainer = GRPOTrainer(path, **common)
    else:
        trainer = HDPGRPOTrainer(
            path, **common, hdp_config=HDPConfig(tokens_per_rank=args.tokens_per_rank, zero_stage=args.zero_stage)
        )
    trainer.train()
    if not args.stock and trainer.args.process_index == 0:
        for entry in trainer.hdp_history:
            print(
                f"step {entry['step']}: {entry['micro_batches']} micro-batches, {entry['local_tokens']} tokens on "
                f"rank 0, widest rollout group {entry['max_group']} ranks"
            )


if __name__ == "__main__":
    main()
