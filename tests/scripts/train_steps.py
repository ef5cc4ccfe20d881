"""Train a saved tiny model for a few HDPTrainer steps; rank 0 saves the final weights and logs.

Run under torchrun (any number of processes) or plain python (one process).
"""

import argparse
import json
import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer


def make_dataset(n: int, vocab: int, seed: int, long_every: int = 5) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(30, 64, (1,), generator=g)) if i % long_every == 0 else int(torch.randint(2, 14, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 4) + ids[length // 4 :] if i % 2 else list(ids)
        rows.append({"input_ids": ids, "labels": labels})
    return Dataset.from_list(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global_batch_size", type=int, default=8)
    ap.add_argument("--tokens_per_rank", type=int, default=16)
    ap.add_argument("--planner", default="naive")
    ap.add_argument("--dtype", default="float64")
    a = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    ds = make_dataset(40, model.config.vocab_size, seed=1)
    args = TrainingArguments(
        output_dir=os.path.join(a.out, "trainer"),
        use_cpu=True,
        max_steps=a.steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    trainer = HDPTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        hdp_config=HDPConfig(tokens_per_rank=a.tokens_per_rank, global_batch_size=a.global_batch_size, planner=a.planner),
    )
    trainer.train()
    if trainer.args.process_index == 0:
        os.makedirs(a.out, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(a.out, "weights.pt"))
        with open(os.path.join(a.out, "log.json"), "w") as f:
            json.dump({"log_history": trainer.state.log_history, "hdp": trainer.hdp_summary()}, f)


if __name__ == "__main__":
    main()
