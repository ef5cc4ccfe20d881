"""Per-rank memory and time of checkpoints: training, saving and resuming, on gloo ranks.

    python benchmarks/checkpoint_memory.py                       # a ~220M-parameter Llama, 4 ranks
    python benchmarks/checkpoint_memory.py --hidden 64 --layers 2 --vocab 512 --nproc 2   # a smoke run
    python benchmarks/checkpoint_memory.py --async-checkpoint    # the same with asynchronous saves

For each setting (``zero_stage`` 1 and 2, FSDP2 ``shard_grad_op`` and ``full_shard``; ``--configs`` picks) two
torchrun launches of HDPTrainer (float32, AdamW, random-token samples): the first trains ``--steps`` steps and
saves a checkpoint at the last one; the second, fresh processes, resumes from it and runs one more step. A
thread samples each rank's resident memory (``VmRSS``) every 5 ms; per rank the peaks are printed for the
training steps, the save (HDPTrainer's ``_save_checkpoint``) and the resume (from the start of ``train`` to the
first step), with the save's wall time (with ``--async-checkpoint``: the part that blocks training; the
writing goes on behind the next steps) and the checkpoint's size on disk. Figures only; nothing is asserted.
Run it with nothing else running: the ranks share the machine's cores and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

MB = 1024**2
CONFIGS = {
    "zero1": (1, None),
    "zero2": (2, None),
    "grad_op": (None, "shard_grad_op"),
    "full_shard": (None, "full_shard"),
}


class RssSampler(threading.Thread):
    """The peak ``VmRSS`` of this process per phase (``phase`` set from outside)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peaks, self.running = interval, "setup", {}, True

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self):
        while self.running:
            value = self.rss()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
            time.sleep(self.interval)


def _rows(n: int, vocab: int, length: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def child(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback, TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer

    torch.set_num_threads(1)
    sampler = RssSampler()
    sampler.start()
    zero_stage, fsdp = CONFIGS[args.config]
    out = os.path.join(args.out, args.config)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    resume = args.child == "resume"
    steps = args.steps + (1 if resume else 0)
    targs = TrainingArguments(
        output_dir=out,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=steps,
        learning_rate=1e-4,
        save_strategy="steps",
        save_steps=args.steps,
        logging_steps=1,
        **({"fsdp": fsdp} if fsdp else {}),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = _rows(4 * world * (args.steps + 1), args.vocab, args.length)  # the same in both launches
    hdp_config = HDPConfig(tokens_per_rank=args.length, global_batch_size=4 * world, zero_stage=zero_stage)
    hdp_config.async_checkpoint = args.async_checkpoint  # read with getattr until HDPConfig has the field
    trainer = HDPTrainer(model, targs, train_dataset=Dataset.from_list(rows), hdp_config=hdp_config)
    timing = {}
    save = trainer._save_checkpoint

    def timed_save(*a, **k):
        sampler.phase, start = "save", time.perf_counter()
        save(*a, **k)
        timing["save_s"] = time.perf_counter() - start
        sampler.phase = "after save"

    trainer._save_checkpoint = timed_save

    class Phases(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sampler.phase = "train"

    trainer.add_callback(Phases())
    sampler.phase = "resume" if resume else "setup"
    trainer.train(resume_from_checkpoint=True if resume else None)
    sampler.running = False
    sampler.join()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(args.out, f"{args.config}.{args.child}.{rank}.json"), "w") as f:
        json.dump({"peaks": sampler.peaks, **timing, "params": model.num_parameters()}, f)


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=["save", "resume"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--length", type=int, default=128, help="tokens per sample (and per rank)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument(
        "--async-checkpoint",
        action="store_true",
        help="HDPConfig(async_checkpoint=True): the save's wall time is then what blocks training",
    )
    p.add_argument("--out", default=None, help="where the checkpoints go (default: a temporary folder)")
    args = p.parse_args()
    if args.child:
        return child(args)
    out = args.out or tempfile.mkdtemp(prefix="hdp_ckpt_bench_")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    rows = []
    for name in args.configs.split(","):
        for phase in ("save", "resume"):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(args.nproc),
                "--master_port",
                str(29500 + os.getpid() % 1000),
                __file__,
                "--child",
                phase,
                "--config",
                name,
                "--out",
                out,
                "--hidden",
                str(args.hidden),
                "--layers",
                str(args.layers),
                "--vocab",
                str(args.vocab),
                "--length",
                str(args.length),
                "--steps",
                str(args.steps),
            ]
            cmd += ["--async-checkpoint"] if args.async_checkpoint else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name} {phase} failed")
        ranks = range(args.nproc)
        saves = [_read(os.path.join(out, f"{name}.save.{r}.json")) for r in ranks]
        resumes = [_read(os.path.join(out, f"{name}.resume.{r}.json")) for r in ranks]
        ckpt = os.path.join(out, name, f"checkpoint-{args.steps}")
        rows.append((name, saves, resumes, _size(ckpt)))
    params = rows[0][1][0]["params"] / 1e6
    print(f"\n{params:,.1f}M parameters, float32, AdamW, {args.nproc} gloo ranks; peak RSS per rank, MiB")
    print("| setting | training | save | resume | save wall s | checkpoint MiB |")
    print("|---|---|---|---|---|---|")
    for name, saves, resumes, size in rows:

        def per(records, phase):
            return " / ".join(f"{r['peaks'].get(phase, 0) / MB:,.0f}" for r in records)

        print(
            f"| {name} | {per(saves, 'train')} | {per(saves, 'save')} | {per(resumes, 'resume')} | "
            f"{max(s.get('save_s', 0) for s in saves):.1f} | {size / MB:,.0f} |"
        )


if __name__ == "__main__":
    main()
