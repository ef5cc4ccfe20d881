"""The main job: an HDP fine-tune of a small Llama-architecture model on the Python standard library.

Run it on 4 CPU processes (the README's first command does the set-up too)::

    torchrun --nproc_per_node 4 examples/hdp_demo.py

Everything is local and offline. Rank 0 trains a byte-level BPE tokenizer on the corpus with
``tokenizers``, builds a small Llama-architecture model and saves both with ``save_pretrained``;
every rank then loads them back with ``from_pretrained`` (the real loading path), tokenizes the
corpus through ``datasets.map``, and fine-tunes with :class:`hf_hdp.HDPTrainer` on every file of up
to world x tokens_per_rank tokens (16K by default: the long files are the samples HDP splits over a
group of ranks). Longer files cannot be placed; the demo leaves them out and says how many (raise
``--tokens_per_rank`` to include them). On CPU the attention runs PyTorch's fused flash kernel
(``cpu_flash``). The closing summary gives the loss, tokens/s, how many
samples ran on one rank and which context-parallel group sizes were used.

The other examples run offline on the same tiny model. ``--save_tiny_model DIR`` (no torchrun) saves this
demo's tokenizer and model to ``DIR/model`` and the first 200 standard-library files as a jsonl of
``{"text": ...}`` rows to ``DIR/stdlib.jsonl``, then exits (about 10 s)::

    python examples/hdp_demo.py --save_tiny_model hdp_output/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import time

import datasets
import torch
import torch.distributed as dist
import transformers
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.corpus import build_stdlib_dataset, build_stdlib_tokenizer_and_model, stdlib_texts


def save_tiny_model(directory: str, vocab_size: int, hidden_size: int, layers: int, seed: int) -> None:
    """The other examples' offline inputs: the demo's tokenizer and model, and a jsonl of stdlib files."""
    build_stdlib_tokenizer_and_model(os.path.join(directory, "model"), vocab_size, hidden_size, layers, seed)
    with open(os.path.join(directory, "stdlib.jsonl"), "w") as f:
        for _, text in stdlib_texts(200):
            f.write(json.dumps({"text": text}) + "\n")
    print(
        f"saved {os.path.join(directory, 'model')} (tokenizer and model, save_pretrained) and "
        f"{os.path.join(directory, 'stdlib.jsonl')} (200 files, one {{'text': ...}} per line)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", default="hdp_output/demo")
    ap.add_argument("--max_steps", type=int, default=10)
    ap.add_argument("--global_batch_size", type=int, default=16)
    ap.add_argument("--tokens_per_rank", type=int, default=4096)
    ap.add_argument("--planner", default="balanced")
    ap.add_argument("--vocab_size", type=int, default=2048)
    ap.add_argument("--hidden_size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--learning_rate", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--save_tiny_model",
        "--save-tiny-model",
        metavar="DIR",
        default=None,
        help="save the tiny tokenizer and model (DIR/model) and a jsonl of stdlib files "
        "(DIR/stdlib.jsonl) for the other examples, then exit (no torchrun needed)",
    )
    a = ap.parse_args()
    if a.save_tiny_model:
        save_tiny_model(a.save_tiny_model, a.vocab_size, a.hidden_size, a.layers, a.seed)
        return

    args = TrainingArguments(
        output_dir=a.output_dir,
        use_cpu=True,
        max_steps=a.max_steps,
        learning_rate=a.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=a.seed,
        ddp_backend="gloo",
        log_level="warning",
        log_level_replica="error",
    )
    world, rank = args.world_size, args.process_index
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if rank != 0:  # one set of progress bars: rank 0's
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    with args.main_process_first(desc="building tokenizer, model and data"):
        if rank == 0 and not os.path.exists(os.path.join(a.output_dir, "model", "config.json")):
            build_stdlib_tokenizer_and_model(
                os.path.join(a.output_dir, "model"), a.vocab_size, a.hidden_size, a.layers, a.seed
            )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(a.output_dir, "model"))
        if rank == 0 and not os.path.exists(os.path.join(a.output_dir, "data")):
            build_stdlib_dataset(tokenizer).save_to_disk(os.path.join(a.output_dir, "data"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(a.output_dir, "model"), dtype=torch.float32)
    data = load_from_disk(os.path.join(a.output_dir, "data"))
    limit = world * a.tokens_per_rank
    fits = data.filter(lambda s: 1 < len(s["input_ids"]) <= limit, desc="selecting files that fit")
    left_out = len(data) - len(fits)

    trainer = HDPTrainer(
        model=model,
        args=args,
        train_dataset=fits,
        hdp_config=HDPConfig(
            tokens_per_rank=a.tokens_per_rank, global_batch_size=a.global_batch_size, planner=a.planner
        ),
    )
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started

    summary = trainer.hdp_summary()
    everyone = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(everyone, summary)
    else:
        everyone = [summary]
    if rank == 0:
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        p2p = sum(s["p2p_bytes_this_rank"] for s in everyone)
        busy = [s["busy_cpu_s_this_rank"] for s in everyone]
        mbs = [s["micro_batches_this_rank"] for s in everyone]
        print("\n=== hf_hdp demo summary ===")
        print(
            f"ranks: {world} CPU processes (gloo), tokens_per_rank C = {a.tokens_per_rank}, "
            f"global batch = {a.global_batch_size} samples, planner = {a.planner}"
        )
        print(
            f"model: Llama architecture, {model.num_parameters() / 1e6:.2f}M parameters, "
            f"{a.layers} layers, hidden {a.hidden_size}"
        )
        print(
            f"corpus: {len(fits)} standard-library files of at most {limit} tokens "
            f"({left_out} longer files left out; raise --tokens_per_rank to include them)"
        )
        print(f"steps: {result.global_step}, loss {losses[0]:.3f} -> {losses[-1]:.3f} (per-token mean of each step)")
        print(f"tokens: {summary['tokens']:,} in {wall:.1f} s = {summary['tokens'] / wall:,.0f} tokens/s")
        print(
            f"samples: {summary['samples']} ({summary['samples_on_one_rank']} ran whole on one rank, "
            f"{summary['samples'] - summary['samples_on_one_rank']} were split over a group)"
        )
        print(
            "group sizes used (k ranks: samples): " + ", ".join(f"{k}: {n}" for k, n in summary["group_sizes"].items())
        )
        print(f"micro-batches per rank: {mbs}; busy CPU seconds per rank: {busy}")
        print(f"P2P traffic (measured in the mesh): {p2p / 1e6:.1f} MB")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
