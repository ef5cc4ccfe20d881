"""Train a saved tiny model with HDPTrainer under attention_split="hybrid", as one agent of a multi-node torchrun.

Meant for ``torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d ...`` (tests/test_multinode.py starts
two such agents on one machine). ``HDPConfig.ranks_per_node`` is left unset: the trainer must take it from the
launcher's ``LOCAL_WORLD_SIZE``.

The data and the TrainingArguments are tests/scripts/train_steps.py's (its ``make_dataset`` and
``training_arguments``: SGD, lr 0.5, constant schedule, clipping at 1.0, seed 0), so that ``tests.dist_utils.run_train_steps(1, ...)`` is the
one-process reference of this run.

Every rank writes ``rank{RANK}.json`` (its launcher environment). Rank 0 also writes ``plan.json``: the plan of
every step it ran (each piece's sample, length, group, Ulysses degree and split) and the cost model's
``ranks_per_node``; and the final weights with ``trainer.save_model(<out>/final)``.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_steps import base_parser, make_dataset, training_arguments

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.distributed.launch import init_process_group

ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RUN_ID",
)


def main():
    ap = base_parser()
    ap.add_argument("--attention_split", default="hybrid")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    init_process_group("gloo")  # before TrainingArguments, as train_steps.py
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in ENV}, f)

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float64)
    args = training_arguments(a.out, a.steps)  # train_steps.py's defaults (its --optim sgd)
    trainer = HDPTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(40, model.config.vocab_size, seed=1),
        # ranks_per_node deliberately unset: LOCAL_WORLD_SIZE
        hdp_config=HDPConfig(
            tokens_per_rank=a.tokens_per_rank,
            global_batch_size=a.global_batch_size,
            planner="balanced",
            attention_split=a.attention_split,
            attention_backend="reference",
            p2p_timeout_s=120,
        ),
    )
    plans = []
    step_fn = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):  # the plan every rank runs this step
        step = inputs["hdp_step"]
        plans.append(
            {
                "global_step": step.global_step,
                "rows": step.rows,
                "pieces": [
                    {
                        "sample": p.sample,
                        "length": p.length,
                        "group": list(p.group),
                        "ulysses": p.ulysses,
                        "split": p.split,
                    }
                    for p in step.plan.pieces()
                ],
            }
        )
        return step_fn(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    trainer.train()
    trainer.save_model(os.path.join(a.out, "final"))  # Trainer saves on the main process only
    if trainer.args.process_index == 0:
        with open(os.path.join(a.out, "plan.json"), "w") as f:
            json.dump(
                {
                    "plans": plans,
                    "ranks_per_node": trainer.cost_model.ranks_per_node,
                    "world_size": trainer.args.world_size,
                    "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                },
                f,
            )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit: gloo can abort at interpreter shutdown otherwise


if __name__ == "__main__":
    main()
