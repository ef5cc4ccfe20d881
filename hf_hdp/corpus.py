"""The embedded default corpus: the Python standard library's own source files.

Every machine with Python has it, it is real text, and its length distribution has the long tail
HDP is for (docs/design.md §1: median file about 1.9K tokens, p99 about 47K, the files over 16K tokens hold
about half of all tokens). The demo, the planner CLI and the benchmarks use it when no data is given.
"""

from __future__ import annotations

import os
import sysconfig


def stdlib_dir() -> str:
    """The directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(limit: int | None = None) -> list[str]:
    """Paths of the standard library's ``.py`` files (site-packages excluded), sorted."""
    root = stdlib_dir()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                paths.append(os.path.join(dirpath, name))
    paths.sort()
    return paths[:limit] if limit is not None else paths


def stdlib_texts(limit: int | None = None) -> list[tuple[str, str]]:
    """``(relative path, text)`` of each non-empty standard-library source file."""
    root = stdlib_dir()
    out = []
    for path in stdlib_files(limit):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            out.append((os.path.relpath(path, root), text))
    return out


def stdlib_lengths(chars_per_token: float = 3.6) -> list[int]:
    """Approximate token lengths of the standard-library files (bytes / ``chars_per_token``), no tokenizer needed."""
    lengths = []
    for path in stdlib_files():
        size = os.path.getsize(path)
        if size:
            lengths.append(max(1, round(size / chars_per_token)))
    return lengths


def build_stdlib_tokenizer_and_model(
    path: str, vocab_size: int = 2048, hidden_size: int = 128, layers: int = 4, seed: int = 0
) -> None:
    """Train a byte-level BPE tokenizer on the corpus and save it, with a freshly initialised small
    Llama-architecture model, to ``path`` (``save_pretrained``): everything offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [t for _, t in stdlib_texts()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts[::4], trainer=trainer)  # a quarter of the files is plenty for the merges
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=65536,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def build_stdlib_dataset(tokenizer):
    """The corpus as a ``datasets.Dataset`` with ``path`` and ``input_ids`` (tokenized with ``datasets.map``)."""
    from datasets import Dataset

    ds = Dataset.from_list([{"path": p, "text": t} for p, t in stdlib_texts()])
    return ds.map(
        lambda b: {"input_ids": tokenizer(b["text"])["input_ids"]},
        batched=True,
        remove_columns=["text"],
        desc="tokenizing the standard library",
    )
