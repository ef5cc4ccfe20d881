"""A custom accelerate training loop with Hybrid Data Parallelism, without HDPTrainer.

    torchrun --nproc_per_node 2 examples/custom_loop.py [steps]     # or: python examples/custom_loop.py

A tiny Llama, built from a config, learns the bytes of the Python standard library's own files (no
download). HDP's three calls: ``HDPAccelerator`` (starts the process group and the dynamic mesh),
``accelerator.hdp_steps`` (this rank's planned steps: the balanced planner, the model's cost model)
and ``accelerator.hdp_backward`` (the step's micro-batches, the loss over the global batch's label
count, and the one gradient reduction every rank joins, whatever its number of micro-batches).
"""

import itertools
import os
import sys

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_hdp import HDPAccelerator, HDPConfig
from hf_hdp.corpus import stdlib_texts

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
world = int(os.environ.get("WORLD_SIZE", "1"))
# C = 512 // world tokens per rank: the 512-byte samples are split over every rank, the short ones run whole
config = HDPConfig(tokens_per_rank=512 // world, global_batch_size=8)
accelerator = HDPAccelerator(hdp_config=config, mixed_precision="bf16" if torch.cuda.is_available() else "no")

texts = [text.encode() for _, text in stdlib_texts(limit=64)]
dataset = Dataset.from_list(
    [{"input_ids": list(t[: 512 if i % 8 == 0 else 16 * (i % 8 + 1)])} for i, t in enumerate(texts)]
)  # a long tail: a few long samples, many short
torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
model, optimizer = accelerator.prepare(model, optimizer)  # no DDP wrapper; the "hdp" attention switched on
model.train()


def epochs(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)  # each epoch draws its global batches in a new seeded order
        yield from loader


loader = accelerator.hdp_steps(dataset)  # one item per optimizer step: this rank's micro-batches of its plan
for n, batch in enumerate(itertools.islice(epochs(loader), steps), 1):
    loss = accelerator.hdp_backward(model, batch)  # grads now equal one device's on the whole global batch
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    micro = len(batch["hdp_step"].micro_batches)
    print(f"rank {accelerator.process_index}: step {n} loss {loss:.4f} ({micro} micro-batches here)", flush=True)
accelerator.end_training()
