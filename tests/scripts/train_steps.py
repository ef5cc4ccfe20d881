"""Train a saved tiny model for a few HDPTrainer steps; rank 0 saves the final weights and logs.

Run under torchrun (any number of processes) or plain python (one process).
"""

import argparse
import json
import os
import signal
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.distributed.launch import init_process_group


def make_dataset(n: int, vocab: int, seed: int, long_every: int = 5) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = (
            int(torch.randint(30, 64, (1,), generator=g))
            if i % long_every == 0
            else int(torch.randint(2, 14, (1,), generator=g))
        )
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 4) + ids[length // 4 :] if i % 2 else list(ids)
        rows.append({"input_ids": ids, "labels": labels})
    return Dataset.from_list(rows)


class FaultInjection(TrainerCallback):
    """Stop cleanly after a step (``--stop_at_step``) or SIGKILL one rank as a step begins (``--kill_*``)."""

    def __init__(self, a, rank):
        self.a, self.rank = a, rank

    def on_step_begin(self, args, state, control, **kwargs):
        a = self.a
        if a.kill_at_step is not None and self.rank == a.kill_rank and state.global_step + 1 == a.kill_at_step:
            marker = os.path.join(a.out, "killed.json")
            if not os.path.exists(marker):
                os.makedirs(a.out, exist_ok=True)
                with open(marker, "w") as f:
                    json.dump({"time": time.time(), "step": a.kill_at_step}, f)
                os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kwargs):
        if self.a.stop_at_step is not None and state.global_step >= self.a.stop_at_step:
            control.should_save = True
            control.should_training_stop = True


def base_parser() -> argparse.ArgumentParser:
    """The arguments every training script of the tests shares (tests/scripts/multinode_train.py too)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global_batch_size", type=int, default=8)
    ap.add_argument("--tokens_per_rank", type=int, default=16)
    return ap


def training_arguments(
    out: str, steps: int, optim: str = "sgd", weight_decay: float = 0.0, max_grad_norm: float = 1.0, save_steps: int = 0
) -> TrainingArguments:
    """This script's TrainingArguments: the reference every run of tests.dist_utils.run_train_steps compares with."""
    return TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        use_cpu=True,
        max_steps=steps,
        learning_rate=0.5 if optim == "sgd" else 1e-2,
        optim=optim,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_only_model=False,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )


def main():
    ap = base_parser()
    ap.add_argument("--planner", default="naive")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--optim", default="sgd")
    ap.add_argument("--save_steps", type=int, default=0)
    ap.add_argument("--stop_at_step", type=int, default=None)
    ap.add_argument("--kill_at_step", type=int, default=None)
    ap.add_argument("--kill_rank", type=int, default=1)
    ap.add_argument("--resume", default=None, help="a checkpoint folder, or 'last'")
    ap.add_argument("--zero_stage", type=int, default=None, help="HDPConfig.zero_stage (default: its own)")
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--max_grad_norm", type=float, default=1.0)
    ap.add_argument("--bucket_bytes", type=int, default=None, help="hf_hdp.distributed.mesh.DEFAULT_BUCKET_BYTES")
    a = ap.parse_args()
    if a.bucket_bytes is not None:
        import hf_hdp.distributed.mesh

        hf_hdp.distributed.mesh.DEFAULT_BUCKET_BYTES = a.bucket_bytes

    init_process_group("gloo")  # before TrainingArguments: safe across torchrun restarts
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    ds = make_dataset(40, model.config.vocab_size, seed=1)
    args = training_arguments(a.out, a.steps, a.optim, a.weight_decay, a.max_grad_norm, a.save_steps)
    trainer = HDPTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        hdp_config=HDPConfig(
            tokens_per_rank=a.tokens_per_rank,
            global_batch_size=a.global_batch_size,
            planner=a.planner,
            zero_stage=a.zero_stage,
        ),
    )
    trainer.add_callback(FaultInjection(a, trainer.args.process_index))
    resume = a.resume
    if resume == "last":
        resume = get_last_checkpoint(args.output_dir)  # None on the first attempt: start fresh
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    if trainer.args.process_index == 0:
        os.makedirs(a.out, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(a.out, "weights.pt"))
        with open(os.path.join(a.out, "log.json"), "w") as f:
            json.dump(
                {
                    "log_history": trainer.state.log_history,
                    "hdp": trainer.hdp_summary(),
                    "steps": list(trainer.hdp_history),
                    "resumed_from": resume,
                    "started": started,
                    "world_size": trainer.args.world_size,
                },
                f,
            )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit: gloo can abort at interpreter shutdown otherwise


if __name__ == "__main__":
    main()
