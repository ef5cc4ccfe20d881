"""Tiny models of real Hub architectures, saved and loaded back with the real loading path."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 128

TINY_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=4096,
    attention_dropout=0.0,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY_CONFIG),
    "qwen2": lambda: Qwen2Config(**TINY_CONFIG),
    "mistral": lambda: MistralConfig(**TINY_CONFIG, sliding_window=4096),
}


def save_tiny_model(family: str, path: str, seed: int = 0) -> str:
    """Build a randomly initialised tiny ``family`` model and ``save_pretrained`` it to ``path``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    model.save_pretrained(path)
    return path


def load_model(path: str, dtype=torch.float64, attn: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def reference_step(model, samples: list[dict]):
    """Loss and gradients of one device running the whole batch, one sample at a time, unpacked.

    The loss is the sum of shifted token losses over the batch's label count (labels -100 excluded).
    """
    model.zero_grad(set_to_none=True)
    targets = []
    for s in samples:
        labels = torch.tensor(s.get("labels", s["input_ids"]))
        targets.append(labels[1:])
    n = sum(int((t != -100).sum()) for t in targets)
    total = 0.0
    for s, t in zip(samples, targets):
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, t, ignore_index=-100, reduction="sum") / max(n, 1)
        loss.backward()
        total += float(loss.detach())
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return total, grads


# a global batch that mixes short samples with long ones: with C = 16 on 4 ranks, 40 and 33 tokens
# need 3 ranks and 60 needs 4; the rest fit on one
MIXED_LENGTHS = [40, 5, 9, 60, 12, 3, 16, 7, 33, 2]


def mixed_batch(seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    """Random samples of :data:`MIXED_LENGTHS`; every third has an SFT-style masked prompt (-100)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(MIXED_LENGTHS):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        s = {"input_ids": ids}
        if i % 3 == 0:
            s["labels"] = [-100] * (n // 3) + ids[n // 3 :]
        samples.append(s)
    return samples


def stdlib_text(name: str) -> str:
    """A file of the Python standard library (real, long-tailed text on every machine)."""
    import os
    import sysconfig

    with open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8") as f:
        return f.read()


def save_bpe_llama(path: str, files: tuple[str, ...], max_positions: int = 4096) -> str:
    """A byte-level BPE tokenizer (512 tokens) trained on stdlib ``files`` and a tiny Llama, both saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([stdlib_text(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path
