"""Real HDP steps on CPU ranks: static mesh vs naive HDP vs balanced HDP, side by side in one run.

    torchrun --nproc_per_node 4 benchmarks/real_ranks.py [--batches 3] [--tokens_per_rank 1024] [--attention_backend auto]

Every planner runs the SAME global batches of the standard-library corpus (tokenized with a BPE
tokenizer trained locally) through the real step: collator, "hdp" attention with ring P2P over
gloo, backward, the one gradient all-reduce. Reported per planner:

- tokens/s over wall time (4 ranks share this machine's cores, so wall time mixes in contention);
- each rank's busy time (process CPU time) and the critical-path step time derived from the
  measured per-micro-batch CPU times along the plan's slot structure (ranks coupled by a ring in a
  slot start together and finish together), which is what the step would take with one core per rank;
- P2P bytes actually sent (counted in the mesh layer) next to the planner's estimate.

Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_hdp.collators import HDPCollator, count_loss_tokens
from hf_hdp.corpus import build_stdlib_dataset, build_stdlib_tokenizer_and_model
from hf_hdp.mesh import DynamicMesh
from hf_hdp.planning import PLANNERS, StepPlan
from hf_hdp.planning.cost import CostModel, HARDWARE_PRESETS, ModelSpec
from hf_hdp.planning.metrics import plan_metrics
from hf_hdp.trainer import enable_hdp_attention, run_micro_batches


def critical_path(plan: StepPlan, seconds: dict[tuple[int, int], float]) -> float:
    """Step time along the slot structure with measured micro-batch times ``seconds[(rank, slot)]``."""
    clock = [0.0] * plan.world_size
    for slot in range(plan.num_slots):
        mbs = [mb for mb in plan.micro_batches if mb.slot == slot]
        parent = {mb.rank: mb.rank for mb in mbs}

        def find(r):
            while parent[r] != r:
                parent[r] = parent[parent[r]]
                r = parent[r]
            return r

        for mb in mbs:
            for p in mb.pieces:
                for r in p.group[1:]:
                    parent[find(r)] = find(p.group[0])
        components: dict[int, list[int]] = {}
        for mb in mbs:
            components.setdefault(find(mb.rank), []).append(mb.rank)
        for ranks in components.values():
            start = max(clock[r] for r in ranks)
            end = start + max(seconds[(r, slot)] for r in ranks)
            for r in ranks:
                clock[r] = end
    return max(clock)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", default="hdp_output/demo")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--global_batch_size", type=int, default=16)
    ap.add_argument("--tokens_per_rank", type=int, default=1024)
    ap.add_argument("--planners", default="static,naive,balanced")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention_backend", default="auto",
                    help="'auto' runs cpu_flash on CPU (float32); 'reference' is the explicit-score kernel")
    a = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model_dir, data_dir = os.path.join(a.data_dir, "model"), os.path.join(a.data_dir, "data")
    if rank == 0:
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            build_stdlib_tokenizer_and_model(model_dir)
        if not os.path.exists(data_dir):
            build_stdlib_dataset(PreTrainedTokenizerFast.from_pretrained(model_dir)).save_to_disk(data_dir)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    enable_hdp_attention(model)
    data = load_from_disk(data_dir)
    limit = world * a.tokens_per_rank
    pool = [i for i, n in enumerate(data["input_ids"]) if 1 < len(n) <= limit]
    g = torch.Generator().manual_seed(a.seed)
    batches = [[pool[int(i)] for i in torch.randperm(len(pool), generator=g)[: a.global_batch_size]]
               for _ in range(a.batches)]
    cost = CostModel.from_specs(ModelSpec.from_config(model.config, bytes_per_value=4), HARDWARE_PRESETS["cpu"])
    mesh = DynamicMesh()
    collator = HDPCollator(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]

    # the first pass (naive) warms up allocator and thread pools; its figures are overwritten
    results = {}
    for name in ["naive"] + a.planners.split(","):
        planner = PLANNERS[name]
        tokens = wall = 0.0
        busy = torch.zeros(world, dtype=torch.float64)
        crit = est_time = sent = est_bytes = 0.0
        for rows in batches:
            samples = {s: data[r] for s, r in enumerate(rows)}
            lengths = [len(samples[s]["input_ids"]) for s in range(len(rows))]
            plan = planner(lengths, world, a.tokens_per_rank, **({"cost": cost} if name == "balanced" else {}))
            mine = [(mb, collator(mb, samples)) for mb in plan.for_rank(rank)]
            n_loss = sum(count_loss_tokens(s["input_ids"], None) for s in samples.values())
            model.zero_grad(set_to_none=True)
            dist.barrier()
            before = mesh.stats.bytes_sent
            t0, c0 = time.perf_counter(), time.process_time()
            seconds = {}
            for mb, batch in mine:
                m0 = time.process_time()
                run_micro_batches(model, [batch], n_loss, mesh, a.attention_backend, torch.device("cpu"))
                seconds[(rank, mb.slot)] = time.process_time() - m0
            mesh.reduce_gradients(params)
            my_busy = time.process_time() - c0
            dist.barrier()
            step_wall = time.perf_counter() - t0
            gathered = [None] * world
            dist.all_gather_object(gathered, (seconds, my_busy, mesh.stats.bytes_sent - before))
            all_seconds = {k: v for s, _, _ in gathered for k, v in s.items()}
            metrics = plan_metrics(plan, cost)
            tokens += sum(lengths)
            wall += step_wall
            busy += torch.tensor([b for _, b, _ in gathered], dtype=torch.float64)
            crit += critical_path(plan, all_seconds)
            sent += sum(b for _, _, b in gathered)
            est_bytes += metrics.p2p_bytes
            est_time += metrics.step_time_s
        results[name] = dict(tokens=tokens, wall=wall, busy=busy.tolist(), crit=crit, sent=sent, est_bytes=est_bytes,
                             est_time=est_time)

    if rank == 0:
        base = results[a.planners.split(",")[0]]
        print(f"\nreal HDP steps: {world} CPU ranks (gloo), tiny Llama ({model.num_parameters() / 1e6:.2f}M), "
              f"attention {a.attention_backend}, C = {a.tokens_per_rank}, {a.batches} global batches of {a.global_batch_size} stdlib files "
              f"({int(base['tokens'])} tokens), same batches for every planner")
        print(f"{'planner':<10}{'tokens/s':>10}{'x static':>9}{'crit s':>9}{'x static':>9}"
              f"{'busy max/mean':>15}{'P2P MB':>9}{'est MB':>9}")
        for name in a.planners.split(","):
            r = results[name]
            busy = r["busy"]
            print(f"{name:<10}{r['tokens'] / r['wall']:>10,.0f}{base['wall'] / r['wall']:>9.2f}{r['crit']:>9.2f}"
                  f"{base['crit'] / r['crit']:>9.2f}{max(busy) / (sum(busy) / len(busy)):>15.2f}"
                  f"{r['sent'] / 1e6:>9.1f}{r['est_bytes'] / 1e6:>9.1f}")
        print("busy CPU s per rank: " + "; ".join(f"{n}: {[round(b, 1) for b in results[n]['busy']]}"
                                                  for n in a.planners.split(",")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
