"""One GRPO training pass on a long-tailed rollout mix: HDPGRPOTrainer against TRL's stock GRPOTrainer.

Both trainers train the same rollouts with the same global batch on ``--world`` gloo ranks (CPU).
Generation is replaced by fixed completions whose lengths are drawn from the built-in corpus' length
distribution (the standard library's files of ``--min`` to ``--max`` tokens, 128-16K by default: the
distribution's own shape in that range, nothing clipped onto its ends; then times ``--scale``),
so the figures measure the training pass only: per step, the wall seconds of the training step minus
TRL's generation and scoring, the busiest rank's CPU seconds for the same, and (HDP) the planner's
estimate of the step. Stock runs DDP over the rollouts each rank generated (padded to the rank's
longest); HDP plans the global batch (``--tokens_per_rank``) and splits the long rollouts::

    python benchmarks/rl_step.py --world 4 --scale 0.0625 --steps 2          # small (about a minute)
    python benchmarks/rl_step.py --world 4 --steps 3                          # 128-16K tokens (long)

Prints one JSON line per trainer. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

G = 4  # completions per prompt


def rollout_lengths(n: int, lo: int, hi: int, scale: float, seed: int) -> list[int]:
    """``n`` completion lengths (EOS included): corpus files of ``lo`` to ``hi`` tokens, times ``scale``."""
    from hf_hdp.corpus import stdlib_lengths

    pool = [x for x in stdlib_lengths() if lo <= x <= hi]
    if not pool:
        raise SystemExit(f"no file of the built-in corpus has {lo} to {hi} tokens; widen --min/--max")
    rng = random.Random(seed)
    return [max(2, int(rng.choice(pool) * scale)) for _ in range(n)]


def build_model(path: str, hidden: int, layers: int) -> str:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:"
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_end|>", *chars, "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1 << 17,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _worker(rank, world, init_file, out, opts):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1"
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {kind: _measure(kind, rank, world, opts) for kind in opts["kinds"]}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _measure(kind: str, rank: int, world: int, opts: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from hf_hdp import HDPConfig
    from hf_hdp.integrations.rl import HDPGRPOTrainer
    from hf_hdp.planning import plan_metrics

    per_device, steps = opts["per_device"], opts["steps"]
    lengths = opts["lengths"]  # per global rollout, in (step, rank, row) order
    tok = AutoTokenizer.from_pretrained(opts["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(opts["model"], dtype=torch.float32)
    prompts = Dataset.from_list([{"prompt": f"q{k}:"} for k in range(steps * per_device * world // G)])
    config = GRPOConfig(
        output_dir=os.path.join(opts["out"], kind),
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=per_device,
        num_generations=G,
        max_completion_length=max(lengths) + 1,
        optim="sgd",
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        shuffle_dataset=False,
        seed=0,
        loss_type="dapo",
        gradient_checkpointing=opts["checkpointing"],
    )
    common = dict(
        reward_funcs=lambda completions, **kw: [float(len(c) % 5) for c in completions],
        args=config,
        train_dataset=prompts,
        processing_class=tok,
    )
    if kind == "hdp":
        trainer = HDPGRPOTrainer(
            model,
            **common,
            hdp_config=HDPConfig(tokens_per_rank=opts["tokens_per_rank"], zero_stage=opts["zero_stage"]),
        )
        estimates = []
        planner = trainer.hdp_planner

        def planned(lens, w, c):
            plan = planner(lens, w, c)
            if len(estimates) < 2 * steps:
                estimates.append(plan_metrics(plan, trainer.hdp_cost_model).step_time_s)
            return plan

        trainer.hdp_planner = planned
    else:
        trainer = GRPOTrainer(model, **common)
        estimates = None
    calls = {"n": 0, "gen_s": 0.0, "gen_cpu": 0.0}

    def fixed(self, prompt_ids, *args, **kwargs):
        out = []
        for i, _ in enumerate(prompt_ids):
            n = lengths[(calls["n"] * world + rank) * per_device + i]
            g = torch.Generator().manual_seed(n * 7919 + i)
            out.append(torch.randint(3, len(tok) - 1, (n - 1,), generator=g).tolist() + [tok.eos_token_id])
        calls["n"] += 1
        return out, None

    trainer._generate_single_turn = fixed.__get__(trainer)
    generate = trainer._generate_and_score_completions

    def timed(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return generate(*a, **k)
        finally:
            calls["gen_s"] += time.perf_counter() - t
            calls["gen_cpu"] += time.process_time() - c

    trainer._generate_and_score_completions = timed
    step_s, cpu_s = [], []
    original = trainer.training_step

    def step(*a, **k):
        g0, c0 = calls["gen_s"], calls["gen_cpu"]
        t, c = time.perf_counter(), time.process_time()
        out = original(*a, **k)
        step_s.append(time.perf_counter() - t - (calls["gen_s"] - g0))
        cpu_s.append(time.process_time() - c - (calls["gen_cpu"] - c0))
        return out

    trainer.training_step = step
    trainer.train()
    return {
        "pass_s": step_s,
        "cpu_s": cpu_s,
        "estimate_s": estimates,
        "local_tokens": [
            sum(lengths[(s * world + rank) * per_device : (s * world + rank + 1) * per_device]) for s in range(steps)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--per_device", type=int, default=8, help="rollouts per rank and step (a multiple of 4)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--min", type=int, default=128)
    parser.add_argument("--max", type=int, default=16384)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the drawn lengths (small runs)")
    parser.add_argument("--tokens_per_rank", type=int, default=None, help="default: the longest rollout / 2")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument(
        "--zero_stage",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="HDP's ZeRO stage (default HDPConfig's: 1 on several ranks; stock replicates: 0)",
    )
    parser.add_argument("--kinds", default="stock,hdp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    n = args.steps * args.world * args.per_device
    lengths = rollout_lengths(n, args.min, args.max, args.scale, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        opts = dict(
            model=build_model(os.path.join(tmp, "model"), args.hidden, args.layers),
            out=tmp,
            lengths=lengths,
            per_device=args.per_device,
            steps=args.steps,
            kinds=args.kinds.split(","),
            tokens_per_rank=args.tokens_per_rank or max(64, (max(lengths) + 4) // 2),
            checkpointing=args.checkpointing,
            zero_stage=args.zero_stage,
        )
        mp.start_processes(
            _worker,
            args=(args.world, os.path.join(tmp, "init"), tmp, opts),
            nprocs=args.world,
            join=True,
            start_method="spawn",
        )
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(args.world)]
    for kind in opts["kinds"]:
        per_step = list(zip(*(r[kind]["pass_s"] for r in ranks)))
        cpu = list(zip(*(r[kind]["cpu_s"] for r in ranks)))
        print(
            json.dumps(
                {
                    "trainer": kind,
                    "world": args.world,
                    "rollouts_per_step": args.world * args.per_device,
                    "tokens_per_rank": opts["tokens_per_rank"] if kind == "hdp" else None,
                    "zero_stage": (int(args.world > 1) if args.zero_stage is None else args.zero_stage)
                    if kind == "hdp"
                    else 0,
                    "completion_tokens_min_median_max": [
                        min(lengths),
                        sorted(lengths)[len(lengths) // 2],
                        max(lengths),
                    ],
                    "pass_s_per_step": [round(max(s), 3) for s in per_step],
                    "busiest_rank_cpu_s": [round(max(c), 3) for c in cpu],
                    "planner_estimate_s": ranks[0][kind]["estimate_s"],
                }
            )
        )


if __name__ == "__main__":
    main()
