"""Memory of the model states under ZeRO stages 0-2 and FSDP2, and of the loss, measured next to the estimate.

    torchrun --nproc_per_node 4 benchmarks/memory.py            # states and step times, 4 gloo ranks
    python benchmarks/memory.py --loss                          # loss peak memory, one process

**States** (``torchrun``): one real HDPTrainer run per configuration (zero_stage 0, 1, 2; FSDP2
``shard_grad_op`` and ``full_shard``) of a ~60M-parameter Llama (float32, AdamW, built from a config
and loaded with ``from_pretrained``) on the same global batches of long-tailed random-token samples,
so every configuration runs the same plans (balanced planner; ``full_shard`` runs them in lockstep);
stage 1 also without starting the buckets during the last backward (``overlap_grad_reduction=False``).
Per rank, measured after each step's gradient reduction (``on_pre_optimizer_step``):

- optimizer-state bytes this rank holds (its shard's AdamW moments; DTensors by their local shard);
- gradient bytes this rank holds;
- the largest single temporary buffer of the reduction: HDP's bucket buffers
  (``DynamicMesh.stats.largest_buffer_bytes``, bound ``DEFAULT_BUCKET_BYTES``); under FSDP the
  reduction is FSDP's own, per sharded module: its input is that module's whole gradients, printed as
  the largest module's gradient bytes (computed from the module, not measured);

next to :func:`hf_hdp.planning.memory_breakdown`'s estimate for the same model, world and mode, and
each configuration's step time (median wall seconds of the steps after the first) as a ratio to stage 0.
Four ranks share this machine's cores: wall time mixes in contention, the ratios less so (the same
plans, side by side in one run); the busiest rank's CPU seconds per step are printed too, a figure that
waiting does not inflate.

**Loss** (``--loss``): the peak resident memory of the LM head + cross-entropy forward and backward
(``ru_maxrss`` of a fresh process, minus its level before the loss), for T = 4K and 16K tokens at a
32K vocabulary and hidden size 512, float32: chunked (``hf_hdp.engine.loss``, ``--chunk`` tokens per
chunk, default HDPConfig's) against the full ``[T, vocab]`` logits; next to the estimate
(:func:`hf_hdp.planning.cost.memory.head_bytes`).

Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

MB = 1024**2
CONFIGS = [  # name, HDPConfig.zero_stage, TrainingArguments.fsdp, HDPConfig.overlap_grad_reduction
    ("stage 0", 0, None, True),
    ("stage 1", 1, None, True),
    ("stage 1, no overlap", 1, None, False),
    ("stage 2", 2, None, True),
    ("FSDP2 shard_grad_op", None, "shard_grad_op", True),
    ("FSDP2 full_shard", None, "full_shard", True),
]


def _model(path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Long-tailed lengths: mostly 16-128 tokens, a few 600-1000 (split over ranks at C = 256)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = (
            int(torch.randint(600, 1000, (1,), generator=g))
            if i % 8 == 0
            else int(torch.randint(16, 128, (1,), generator=g))
        )
        rows.append({"input_ids": torch.randint(0, 32000, (length,), generator=g).tolist()})
    return rows


def _bytes(tensors) -> int:
    from hf_hdp.engine.fsdp import local_tensor

    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def states(args) -> None:
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from hf_hdp.distributed.mesh import DEFAULT_BUCKET_BYTES
    from hf_hdp.engine.zero import unwrap_zero
    from hf_hdp.planning import memory_breakdown
    from hf_hdp.planning.cost import ModelSpec

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shared = [tempfile.mkdtemp(prefix="hf_hdp_memory_") if rank == 0 else None]
    dist.broadcast_object_list(shared)  # one folder for all ranks (one machine)
    tmp = shared[0]
    if rank == 0:
        _model(os.path.join(tmp, "model"))
    dist.barrier()
    data = Dataset.from_list(_rows(args.samples * (args.steps + 1)))
    results = {}
    for name, stage, fsdp, overlap in CONFIGS:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "model"), dtype=torch.float32)
        training = TrainingArguments(
            output_dir=os.path.join(tmp, name.replace(" ", "_")),
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            max_steps=args.steps,
            learning_rate=1e-4,
            save_strategy="no",
            logging_steps=1,
            seed=0,
            **({"fsdp": fsdp} if fsdp else {}),
        )
        hdp = HDPConfig(
            tokens_per_rank=args.tokens_per_rank,
            global_batch_size=args.samples,
            zero_stage=stage,
            hardware="cpu",
            overlap_grad_reduction=overlap,
        )
        trainer = HDPTrainer(model, training, train_dataset=data, hdp_config=hdp)
        record = {"grads": [], "optimizer": [], "times": [], "cpu": [], "micro_batches": []}

        class Measure(TrainerCallback):
            def __init__(self, trainer):
                self.trainer = trainer

            def on_step_begin(self, a, state, control, **kw):
                self.started, self.cpu = time.perf_counter(), time.process_time()

            def on_pre_optimizer_step(self, a, state, control, **kw):
                record["grads"].append(_bytes(p.grad for p in self.trainer.model.parameters()))

            def on_step_end(self, a, state, control, **kw):
                record["times"].append(time.perf_counter() - self.started)
                record["cpu"].append(time.process_time() - self.cpu)
                opt = unwrap_zero(self.trainer.optimizer) or self.trainer.optimizer
                record["optimizer"].append(
                    _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
                )

        trainer.add_callback(Measure(trainer))
        step_fn = trainer.training_step

        def counting(m, inputs, n=None):
            record["micro_batches"].append(len(inputs["hdp_step"].micro_batches))
            return step_fn(m, inputs, n)

        trainer.training_step = counting
        trainer.train()
        if trainer.hdp_fsdp_modules:  # FSDP's reduce-scatter input: one module's whole gradients
            largest = max(
                sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                if m is trainer.model
                else sum(p.numel() * p.element_size() for p in m.parameters())
                for m in trainer.hdp_fsdp_modules
            )
            record["buffer"], record["buffer_kind"] = largest, "FSDP module (computed)"
        else:
            record["buffer"], record["buffer_kind"] = trainer.mesh.stats.largest_buffer_bytes, "HDP bucket (measured)"
        spec = ModelSpec.from_config(model.config, bytes_per_value=4)
        params = sum(p.numel() for p in model.parameters())
        est = memory_breakdown(
            spec,
            args.tokens_per_rank,
            world_size=world,
            zero_stage=stage or 0,
            fsdp=fsdp,
            weight_bytes=4,
            grad_bytes=4,
            optimizer_bytes=8,
            params=params,
        )
        sharded_grads = stage == 2 or fsdp is not None
        record["estimate"] = {
            "optimizer": est.optimizer,
            "peak_states": est.weights + est.gradients + est.optimizer,
            "gradients_after": params * 4 / (world if sharded_grads else 1),
        }
        record["weights_local"] = _bytes(trainer.model.parameters())
        record["params"] = params
        gathered = [None] * world
        dist.all_gather_object(gathered, record)
        results[name] = gathered
        del trainer, model
    if rank == 0:
        _print_states(results, world, DEFAULT_BUCKET_BYTES, args)
    dist.destroy_process_group()


def _print_states(results, world, bucket, args) -> None:
    params = results["stage 0"][0]["params"]
    replicated_opt = max(r["optimizer"][-1] for r in results["stage 0"])
    replicated_grad = max(r["grads"][-1] for r in results["stage 0"])
    base = statistics.median(t for r in results["stage 0"] for t in r["times"][1:])
    base_cpu = statistics.median(max(r["cpu"][i] for r in results["stage 0"]) for i in range(1, args.steps))
    print(
        f"model: {params / 1e6:.1f}M parameters, float32, AdamW; {world} gloo ranks; C = {args.tokens_per_rank}; "
        f"{args.steps} steps of {args.samples} samples; bucket bound {bucket / MB:.0f} MiB"
    )
    print(
        f"micro-batches per rank per step (stage 0): "
        f"{[r['micro_batches'] for r in results['stage 0']]}; full_shard: "
        f"{[r['micro_batches'] for r in results['FSDP2 full_shard']]}"
    )
    head = (
        f"{'config':20s} {'optimizer MiB/rank':>18s} {'est':>7s} {'x repl':>6s} | {'grads after step':>16s} "
        f"{'est':>7s} {'x repl':>6s} | {'weights':>7s} | {'peak states est':>15s} | {'largest buffer MiB':>30s} | "
        f"{'step s':>6s} {'/ st.0':>6s} {'cpu s':>6s} {'/ st.0':>6s}"
    )
    print(head)
    for name, ranks in results.items():
        opt = max(r["optimizer"][-1] for r in ranks)
        grad = max(r["grads"][-1] for r in ranks)
        est = ranks[0]["estimate"]
        step = statistics.median(t for r in ranks for t in r["times"][1:])
        cpu = statistics.median(max(r["cpu"][i] for r in ranks) for i in range(1, args.steps))
        buffer = f"{ranks[0]['buffer'] / MB:.1f} ({ranks[0]['buffer_kind']})"
        print(
            f"{name:20s} {opt / MB:18.1f} {est['optimizer'] / MB:7.1f} {opt / replicated_opt:6.3f} | "
            f"{grad / MB:16.1f} {est['gradients_after'] / MB:7.1f} {grad / replicated_grad:6.3f} | "
            f"{max(r['weights_local'] for r in ranks) / MB:7.1f} | {est['peak_states'] / MB:15.1f} | {buffer:>30s} | "
            f"{step:6.2f} {step / base:6.2f} {cpu:6.2f} {cpu / base_cpu:6.2f}"
        )
    print(
        "columns: MiB per rank, the largest over the ranks; 'est' from hf_hdp.planning.memory_breakdown (optimizer) "
        "and P x 4 B (/ world when sharded) for the gradients; 'weights': this rank's parameters between steps; "
        "'peak states est': memory_breakdown's weights + gradients + optimizer at the step's peak; 'step s': median "
        "wall seconds of the steps after the first (4 ranks share the cores: contention included); 'cpu s': the "
        "busiest rank's CPU seconds in the step, median (waiting excluded: the contention-free work)"
    )
    print(
        f"targets: optimizer state per rank <= 1/{world} + 5% = {1 / world + 0.05:.3f} of replicated at stage >= 1; "
        f"gradients <= {1 / world + 0.05:.3f} at stage 2 (and FSDP2); no HDP buffer above the bucket bound"
    )


# ------------------------------------------------------------------ loss
def _loss_child(tokens: int, chunk: int | None) -> None:
    import torch.nn.functional as F

    from hf_hdp.engine.loss import chunked_cross_entropy

    torch.manual_seed(0)
    V, H = 32000, 512
    hidden = torch.randn(tokens, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (tokens,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if chunk is None:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    else:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak - before, "loss": float(loss)}))


def loss(args) -> None:
    from hf_hdp.planning.cost import ModelSpec
    from hf_hdp.planning.cost.memory import head_bytes

    spec = ModelSpec(
        name="head",
        hidden_size=512,
        num_layers=1,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1408,
        vocab_size=32000,
        bytes_per_value=4,
    )
    print(
        f"loss: LM head + cross-entropy, forward and backward; vocabulary 32000, hidden 512, float32; "
        f"chunk {args.chunk} tokens"
    )
    print(
        f"{'tokens':>7s} {'full logits MiB':>16s} {'chunked MiB':>12s} {'full / chunked':>15s} "
        f"{'est full':>9s} {'est chunked':>12s}  same loss"
    )
    for tokens in (4096, 16384):
        got = {}
        for mode, chunk in (("full", None), ("chunked", args.chunk)):
            out = subprocess.run(
                [sys.executable, __file__, "--loss-child", str(tokens), str(chunk or 0)],
                capture_output=True,
                text=True,
                check=True,
            )
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        est_full, est_chunk = head_bytes(spec, tokens, None, 4), head_bytes(spec, tokens, args.chunk, 4)
        same = abs(got["full"]["loss"] - got["chunked"]["loss"]) <= 1e-4 * abs(got["full"]["loss"])
        print(
            f"{tokens:7d} {got['full']['peak'] / MB:16.0f} {got['chunked']['peak'] / MB:12.0f} "
            f"{got['full']['peak'] / max(got['chunked']['peak'], 1):15.1f} {est_full / MB:9.0f} "
            f"{est_chunk / MB:12.0f}  {same}"
        )


def main() -> None:
    from hf_hdp import HDPConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", action="store_true", help="measure the loss's peak memory (one process)")
    p.add_argument("--loss-child", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=HDPConfig().loss_chunk_tokens, help="tokens per loss chunk")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--samples", type=int, default=16, help="samples per global batch")
    p.add_argument("--tokens_per_rank", type=int, default=256)
    args = p.parse_args()
    if args.loss_child:
        tokens, chunk = args.loss_child
        return _loss_child(tokens, chunk or None)
    if args.loss:
        return loss(args)
    states(args)


if __name__ == "__main__":
    main()
