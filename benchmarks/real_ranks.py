"""Real HDP steps on CPU ranks: static mesh vs naive HDP vs balanced HDP, side by side in one run.

    torchrun --nproc_per_node 4 benchmarks/real_ranks.py [--batches 3] [--tokens_per_rank 1024] [--attention_backend auto]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 benchmarks/real_ranks.py --emulate-links h100-ib --ranks-per-node 2

Every planner runs the SAME global batches of the standard-library corpus (tokenized with a BPE
tokenizer trained locally) through the real step: collator, "hdp" attention with ring P2P over
gloo, backward, the one gradient all-reduce. Reported per planner:

- tokens/s over wall time (4 ranks share this machine's cores, so wall time mixes in contention);
- each rank's busy time (process CPU time) and the critical-path step time derived from the
  measured per-micro-batch CPU times along the plan's slot structure (ranks coupled by a ring in a
  slot start together and finish together), then the slowest rank's gradient reduction, which is
  what the step would take with one core per rank;
- P2P bytes actually sent (counted in the mesh layer) next to the planner's estimate, and
  ``plan_metrics``' estimated step time.

Loopback P2P is nearly free, so on its own this measures compute only. ``--emulate-links h100-ib``
prices every P2P exchange and collective of the mesh on H100 links (NVLink inside a node, InfiniBand
between nodes) slowed down to this machine's compute (:mod:`hf_hdp.distributed.links`): rank 0 first calibrates
this machine on the benchmark's own model (``benchmarks/calibrate.py``'s :func:`calibrate_model`; or
``--calibration FILE``, the JSON line of ``calibrate.py --json``), the scale is this machine's
achieved throughput over the H100 preset's at ``--reference-tokens`` (default: the tokens per rank),
and the mesh sleeps each transfer's emulated delay, overlapped with compute as on a real link
(``DynamicMesh(links=...)``). The planners and ``plan_metrics`` get the calibrated cost model with
exactly those links. ``--ranks-per-node`` sets the emulated nodes (default ``LOCAL_WORLD_SIZE``, i.e.
one node; 2 makes two "nodes" of 2 ranks out of 4). Then the critical path adds to each micro-batch's
CPU time the wire time its own compute did not hide (``CommStats.emulated_exposed_s``), and the
report gives measured / estimated for wall time and for the critical path. The warm-up pass runs
without the emulator.

``--attention-split`` goes to ``plan_balanced`` where its signature has that keyword; the
distributed pieces' splits are printed where the plan's pieces have a ``split``.

Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from collections import Counter
from dataclasses import replace

import torch
import torch.distributed as dist
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_hdp.collators import HDPCollator, count_loss_tokens
from hf_hdp.corpus import build_stdlib_dataset, build_stdlib_tokenizer_and_model
from hf_hdp.distributed.links import LINK_PRESETS, scaled_links
from hf_hdp.distributed.mesh import DynamicMesh
from hf_hdp.engine import enable_hdp_attention, run_micro_batches
from hf_hdp.planning import PLANNERS, StepPlan
from hf_hdp.planning.cost import HARDWARE_PRESETS, CostModel, ModelSpec
from hf_hdp.planning.metrics import plan_metrics


def critical_path(plan: StepPlan, seconds: dict[tuple[int, int], float], tail: dict[int, float] | None = None) -> float:
    """Step time along the slot structure with measured micro-batch times ``seconds[(rank, slot)]``.

    ``tail[rank]``: what each rank spends after its last micro-batch (the gradient reduction): every rank
    waits for the slowest, then they reduce together, so the slowest tail is added once.
    """
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
    return max(clock) + (max(tail.values()) if tail else 0.0)


def split_summary(plans: list[StepPlan]) -> str | None:
    """``"ring k=2 x3, ulysses k=4 x1, local x12"`` over the samples of ``plans`` (None if pieces have no ``split``)."""
    counts: Counter = Counter()
    for plan in plans:
        seen = {}
        for mb in plan.micro_batches:
            for p in mb.pieces:
                if not hasattr(p, "split"):
                    return None
                seen[p.sample] = (p.split, len(p.group))
        counts.update(seen.values())
    order = sorted(counts, key=lambda sk: (sk[1], sk[0]))
    return ", ".join(f"{s} x{counts[(s, k)]}" if k == 1 else f"{s} k={k} x{counts[(s, k)]}" for s, k in order)


def calibrated_cost(a, model, rank: int) -> tuple[CostModel, ModelSpec, dict]:
    """This machine's cost model of ``model`` (float32, 1 thread), the same on every rank: timed on rank 0
    while the others wait (or read from ``--calibration``), then broadcast."""
    from calibrate import calibrate_model

    spec = ModelSpec.from_config(model.config, bytes_per_value=4)
    base = CostModel.from_specs(spec, HARDWARE_PRESETS["cpu"])
    box = [None]
    if rank == 0:
        if a.calibration:
            with open(a.calibration) as f:
                lines = [line for line in f.read().splitlines() if line.strip().startswith("{")]
            got = json.loads(lines[-1])
            box[0] = dict(
                a=got["a"],
                b=got["b"],
                c=got["c"],
                source=f"{a.calibration} ({got.get('backend')})",
                max_abs_residual=got.get("max_abs_residual"),
            )
        else:
            started = time.perf_counter()
            fitted, _ = calibrate_model(model, model.config, torch.device("cpu"), torch.float32, a.attention_backend)
            model.zero_grad(set_to_none=True)
            box[0] = dict(
                a=fitted.a,
                b=fitted.b,
                c=fitted.c,
                max_abs_residual=max(abs(r) for r in fitted.extra["calibration"]["residuals"]),
                source=f"calibrated here on rank 0 in {time.perf_counter() - started:.1f} s",
            )
    dist.broadcast_object_list(box, src=0)
    info = box[0]
    cost = base.with_coefficients(info["a"], info["b"], info["c"])
    return cost, spec, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", default="hdp_output/demo")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--global_batch_size", type=int, default=16)
    ap.add_argument("--tokens_per_rank", type=int, default=1024)
    ap.add_argument("--planners", default="static,naive,balanced")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--attention_backend",
        default="auto",
        help="'auto' runs cpu_flash on CPU (float32); 'reference' is the explicit-score kernel",
    )
    ap.add_argument(
        "--emulate-links",
        "--emulate_links",
        dest="emulate_links",
        default=None,
        choices=sorted(LINK_PRESETS),
        help="price the mesh's P2P and collectives on these links, "
        "scaled to this machine's compute (hf_hdp.distributed.links); default: off",
    )
    ap.add_argument(
        "--ranks-per-node",
        "--ranks_per_node",
        dest="ranks_per_node",
        type=int,
        default=None,
        help="ranks per emulated node (default: LOCAL_WORLD_SIZE, one node)",
    )
    ap.add_argument(
        "--reference-tokens",
        "--reference_tokens",
        dest="reference_tokens",
        type=int,
        default=None,
        help="sequence length whose FLOP mix sets the link scale (default: --tokens_per_rank)",
    )
    ap.add_argument(
        "--calibration",
        default=None,
        help="with --emulate-links: output of `benchmarks/calibrate.py --json` instead of calibrating here",
    )
    ap.add_argument(
        "--attention-split",
        "--attention_split",
        dest="attention_split",
        default=None,
        help="auto, ring, ulysses or hybrid: passed to plan_balanced where it takes attention_split",
    )
    ap.add_argument("--json", action="store_true", help="rank 0 also prints the results as one JSON line")
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
    batches = [
        [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[: a.global_batch_size]] for _ in range(a.batches)
    ]
    links = calibration = None
    if a.emulate_links:
        cpu_cost, spec, calibration = calibrated_cost(a, model, rank)
        rpn = a.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or world
        links, cost = scaled_links(a.emulate_links, cpu_cost, spec, a.reference_tokens or a.tokens_per_rank, rpn)
    else:
        cost = CostModel.from_specs(ModelSpec.from_config(model.config, bytes_per_value=4), HARDWARE_PRESETS["cpu"])
        if a.ranks_per_node:
            cost = replace(cost, ranks_per_node=a.ranks_per_node)
    mesh = DynamicMesh(links=links)
    collator = HDPCollator(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    balanced_kwargs = {"cost": cost}
    split_note = ""
    if a.attention_split:
        if "attention_split" in inspect.signature(PLANNERS["balanced"]).parameters:
            balanced_kwargs["attention_split"] = a.attention_split
        else:
            split_note = f" (--attention-split {a.attention_split} ignored: plan_balanced takes no attention_split yet)"

    # the first pass (naive) warms up allocator and thread pools, without emulated links; its figures are overwritten
    results = {}
    for n_pass, name in enumerate(["naive"] + a.planners.split(",")):
        mesh.links = links if n_pass else None
        planner = PLANNERS[name]
        tokens = wall = 0.0
        busy = torch.zeros(world, dtype=torch.float64)
        emulated = torch.zeros(3, world, dtype=torch.float64)  # wire, slept, exposed seconds per rank
        crit = est_time = sent = est_bytes = 0.0
        plans = []
        for rows in batches:
            samples = {s: data[r] for s, r in enumerate(rows)}
            lengths = [len(samples[s]["input_ids"]) for s in range(len(rows))]
            plan = planner(lengths, world, a.tokens_per_rank, **(balanced_kwargs if name == "balanced" else {}))
            plans.append(plan)
            mine = [(mb, collator(mb, samples)) for mb in plan.for_rank(rank)]
            n_loss = sum(count_loss_tokens(s["input_ids"], None) for s in samples.values())
            model.zero_grad(set_to_none=True)
            dist.barrier()
            before = mesh.stats.bytes_sent
            em0 = (mesh.stats.emulated_wire_s, mesh.stats.emulated_wait_s, mesh.stats.emulated_exposed_s)
            t0, c0 = time.perf_counter(), time.process_time()
            seconds = {}
            for mb, batch in mine:
                m0, x0 = time.process_time(), mesh.stats.emulated_exposed_s
                run_micro_batches(model, [batch], n_loss, mesh, a.attention_backend, torch.device("cpu"))
                seconds[(rank, mb.slot)] = time.process_time() - m0 + (mesh.stats.emulated_exposed_s - x0)
            r0, x0 = time.process_time(), mesh.stats.emulated_exposed_s
            mesh.reduce_gradients(params)
            reduce_s = time.process_time() - r0 + (mesh.stats.emulated_exposed_s - x0)
            my_busy = time.process_time() - c0
            dist.barrier()
            step_wall = time.perf_counter() - t0
            em = (
                mesh.stats.emulated_wire_s - em0[0],
                mesh.stats.emulated_wait_s - em0[1],
                mesh.stats.emulated_exposed_s - em0[2],
            )
            gathered = [None] * world
            dist.all_gather_object(gathered, (seconds, my_busy, mesh.stats.bytes_sent - before, reduce_s, em))
            all_seconds = {k: v for s, *_ in gathered for k, v in s.items()}
            metrics = plan_metrics(plan, cost)
            tokens += sum(lengths)
            wall += step_wall
            busy += torch.tensor([x[1] for x in gathered], dtype=torch.float64)
            emulated += torch.tensor([x[4] for x in gathered], dtype=torch.float64).T
            crit += critical_path(plan, all_seconds, {r: x[3] for r, x in enumerate(gathered)})
            sent += sum(x[2] for x in gathered)
            est_bytes += metrics.p2p_bytes
            est_time += metrics.step_time_s
        results[name] = dict(
            tokens=tokens,
            wall=wall,
            busy=busy.tolist(),
            crit=crit,
            sent=sent,
            est_bytes=est_bytes,
            est_time=est_time,
            wire=emulated[0].tolist(),
            slept=emulated[1].tolist(),
            exposed=emulated[2].tolist(),
            splits=split_summary(plans),
            attention_split=plans[0].meta.get("attention_split") if plans else None,
        )

    if rank == 0:
        names = a.planners.split(",")
        base = results[names[0]]
        print(
            f"\nreal HDP steps: {world} CPU ranks (gloo), tiny Llama ({model.num_parameters() / 1e6:.2f}M), "
            f"attention {a.attention_backend}, C = {a.tokens_per_rank}, {a.batches} global batches of {a.global_batch_size} stdlib files "
            f"({int(base['tokens'])} tokens), same batches for every planner{split_note}"
        )
        if links:
            d = links.derivation
            print(
                f"cost model of this machine: a = {cost.a:.4g}, b = {cost.b:.4g}, c = {cost.c:.4g} s per layer "
                f"({calibration['source']}; max |residual| {calibration['max_abs_residual'] or 0:.1%})"
            )
            print(
                f"scale = {d['scale']:.4g} at {d['reference_tokens']:,.0f} tokens: achieved attention "
                f"{d['this_attention_flops'] / 1e9:,.1f} GFLOP/s ({d['attention_ratio']:.3g} of the H100 preset's "
                f"{d['ref_attention_flops'] / 1e12:,.0f} TFLOP/s), linear {d['this_linear_flops'] / 1e9:,.1f} GFLOP/s "
                f"({d['linear_ratio']:.3g} of {d['ref_linear_flops'] / 1e12:,.0f} TFLOP/s)"
            )
            print(f"emulated {links.describe()}")
        print(
            f"{'planner':<10}{'tokens/s':>10}{'x static':>9}{'wall s':>9}{'crit s':>9}{'x static':>9}"
            f"{'est s':>9}{'x static':>9}{'wall/est':>9}{'crit/est':>9}{'busy max/mean':>15}{'P2P MB':>9}{'est MB':>9}"
        )
        for name in names:
            r = results[name]
            busy = r["busy"]
            print(
                f"{name:<10}{r['tokens'] / r['wall']:>10,.0f}{base['wall'] / r['wall']:>9.2f}{r['wall']:>9.2f}"
                f"{r['crit']:>9.2f}{base['crit'] / r['crit']:>9.2f}{r['est_time']:>9.2f}"
                f"{base['est_time'] / r['est_time']:>9.2f}{r['wall'] / r['est_time']:>9.2f}"
                f"{r['crit'] / r['est_time']:>9.2f}{max(busy) / (sum(busy) / len(busy)):>15.2f}"
                f"{r['sent'] / 1e6:>9.1f}{r['est_bytes'] / 1e6:>9.1f}"
            )
        print("busy CPU s per rank: " + "; ".join(f"{n}: {[round(b, 1) for b in results[n]['busy']]}" for n in names))
        if links:
            print(
                "emulated wire / slept / exposed s per rank: "
                + "; ".join(
                    f"{n}: {[round(w, 1) for w in results[n]['wire']]} / {[round(w, 1) for w in results[n]['slept']]} / "
                    f"{[round(w, 1) for w in results[n]['exposed']]}"
                    for n in names
                )
            )
        for name in names:
            if results[name]["splits"] is not None:
                how = results[name]["attention_split"]
                print(f"pieces of {name}{f' (attention_split {how})' if how else ''}: {results[name]['splits']}")
        if a.json:
            print(
                json.dumps(
                    {
                        "world": world,
                        "args": vars(a),
                        "calibration": calibration,
                        "links": links
                        and {
                            **{
                                k: getattr(links, k)
                                for k in (
                                    "name",
                                    "intra_bandwidth",
                                    "intra_latency",
                                    "inter_bandwidth",
                                    "inter_latency",
                                    "ranks_per_node",
                                )
                            },
                            "derivation": links.derivation,
                        },
                        "results": results,
                    }
                )
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
