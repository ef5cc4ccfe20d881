"""Supervised fine-tuning on chat conversations with TRL's SFTTrainer and Hybrid Data Parallelism.

Everything is built locally (no download): a character-level tokenizer with a ChatML-like chat
template (``{% generation %}`` marks the assistant turns, so ``assistant_only_loss`` works), a tiny
Llama, and a chat dataset whose lengths are long-tailed: most conversations are one short exchange,
a few run for many turns. TRL's own code renders, tokenizes, masks (only assistant tokens carry
loss) and, with ``--packing``, packs them; HDP then places every conversation as its own sequence and
splits the long ones over ``ceil(length / tokens_per_rank)`` ranks::

    torchrun --nproc_per_node 2 examples/sft_chat.py
    torchrun --nproc_per_node 2 examples/sft_chat.py --packing --loss_type dft --max_steps 6

For a real model: ``--model_name_or_path Qwen/Qwen2.5-0.5B-Instruct`` (its tokenizer and chat
template are used; give ``--tokens_per_rank`` for your memory, e.g. 8192).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from trl import SFTConfig

from hf_hdp import HDPConfig
from hf_hdp.integrations.trl import HDPSFTTrainer

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:'\n"
WORDS = [
    "hello",
    "how",
    "does",
    "the",
    "ring",
    "attention",
    "split",
    "a",
    "long",
    "sample",
    "over",
    "ranks",
    "short",
    "ones",
    "stay",
    "on",
    "one",
    "rank",
    "yes",
    "no",
    "why",
    "because",
    "tokens",
    "balance",
]


def save_chat_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A fast character-level tokenizer (its offsets give TRL the assistant masks) with the chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS) + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: str) -> str:
    """A character-level tokenizer with the chat template and a tiny Llama, saved with save_pretrained."""
    fast = save_chat_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def chat_dataset(n: int, seed: int = 0) -> Dataset:
    """``n`` conversations; one in eight runs for 5-8 turns, 500-850 tokens (the long tail HDP splits over ranks)."""
    rng = random.Random(seed)

    def say(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        turns = rng.randint(5, 8) if i % 8 == 0 else rng.randint(1, 2)
        messages = []
        for _ in range(turns):
            messages.append({"role": "user", "content": say(rng.randint(3, 8)) + "?"})
            messages.append({"role": "assistant", "content": say(rng.randint(4, 12)) + "."})
        rows.append({"messages": messages})
    return Dataset.from_list(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: a tiny Llama built locally")
    p.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "hf_hdp_sft_chat"))
    p.add_argument("--num_conversations", type=int, default=64)
    p.add_argument("--tokens_per_rank", type=int, default=512)
    p.add_argument("--global_batch_size", type=int, default=16)
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--packing", action="store_true", help="TRL's BFD packing (HDP keeps the documents apart)")
    p.add_argument("--loss_type", choices=["nll", "dft"], default="nll")
    a = p.parse_args()

    path = a.model_name_or_path
    if path is None:
        path = os.path.join(a.output_dir, "tiny")
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not os.path.exists(os.path.join(path, "config.json")):
            build_tiny_model(path)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
            dist.barrier()  # the tiny model exists before any rank loads it
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=a.output_dir,
        max_steps=a.max_steps,
        learning_rate=a.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        assistant_only_loss=True,
        packing=a.packing,
        max_length=4 * a.tokens_per_rank if a.packing else None,
        loss_type=a.loss_type,
        disable_tqdm=True,
    )
    trainer = HDPSFTTrainer(
        model,
        args,
        processing_class=tokenizer,
        train_dataset=chat_dataset(a.num_conversations),
        hdp_config=HDPConfig(tokens_per_rank=a.tokens_per_rank, global_batch_size=a.global_batch_size),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [e for e in trainer.state.log_history if "loss" in e]
        for e in logs:
            print(
                f"step {e['step']}: loss {e['loss']:.4f}  entropy {e['entropy']:.3f}  "
                f"token accuracy {e['mean_token_accuracy']:.3f}  tokens {e['num_tokens']}"
            )
        summary = trainer.hdp_summary()
        print("group sizes used (k ranks: samples):", summary.get("group_sizes"))
        if a.loss_type == "dft":
            print(
                "note: DFT's loss is the mean of -p*log(p) over the label tokens (p = the token's probability, "
                "detached), not the NLL: it grows with p while p < 1/e, so on a fresh model (p near 1/vocab) "
                "a rising loss means the model is learning; stock TRL SFTTrainer logs the same values."
            )
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # every rank is done before any tears the group down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
