"""Calibrate the cost model on this machine: fit a, b, c of ``a·s² + b·s + c`` (per layer) to measured
forward + backward times of a real transformers Llama.

    python benchmarks/calibrate.py                    # CPU: tiny stdlib-shaped Llama, float32, 1 thread
    python benchmarks/calibrate.py --p2p              # also gloo P2P bandwidth/latency between 2 processes
    python benchmarks/calibrate.py --json             # coefficients as JSON (last line of stdout)
    python benchmarks/calibrate.py --model llama-7b-layers   # on a GPU: LLaMA-7B's layer shape, bf16
    python benchmarks/calibrate.py --links h100-ib --reference-tokens 1024   # H100 links scaled to this machine

What is timed is what HDPTrainer runs: one sequence of ``s`` tokens as a single-rank micro-batch
(``plan_naive([s], 1, s)``), packed by the HDP collator and run by
``hf_hdp.trainer.trainer.run_micro_batches`` through the ``"hdp"`` attention (the ``reference``
backend on CPU, ``flash_attn``/``torch_varlen`` on CUDA), loss and backward included. The fit
divides the whole model's time by its layers, so the per-layer b and c carry 1/L of the
embedding, LM head and loss, as ``CostModel.from_specs`` does.

Printed: each length's time, the fit's prediction and relative residual; a, b, c; the measured
dense matmul rate; and the ``HardwareSpec`` that reproduces the fit through ``from_specs`` (what
the ``cpu`` preset in ``hf_hdp/planning/cost/specs.py`` holds). With ``--links PRESET``, also the
preset's links scaled to this machine's compute (:meth:`hf_hdp.distributed.links.LinkEmulator.scaled`: bandwidth x
scale, latency / scale, scale = this machine's achieved throughput over the H100 preset's), which
``benchmarks/real_ranks.py --emulate-links`` emulates. :func:`calibrate_model` is the calibration itself,
for other benchmarks. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_hdp.collators import HDPCollator, count_loss_tokens
from hf_hdp.distributed.links import LINK_PRESETS, LinkEmulator
from hf_hdp.distributed.mesh import DynamicMesh
from hf_hdp.engine import enable_hdp_attention, run_micro_batches
from hf_hdp.planning import plan_naive
from hf_hdp.planning.cost import (
    HARDWARE_PRESETS,
    CostModel,
    ModelSpec,
    calibrate,
    hardware_from_coefficients,
    predicted_time,
)

MODELS = {
    # the shape of hf_hdp.corpus.build_stdlib_tokenizer_and_model (the demo and benchmarks/real_ranks.py)
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=336,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # LLaMA-7B's layer (Touvron et al. 2023) with fewer layers: for a GPU calibration
    "llama-7b-layers": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
}
# single sequences, then packed micro-batches of short ones ("NxS": N sequences of S tokens), which pin down b
DEFAULT_LENGTHS = {
    "cpu": "64,128,256,384,512,768,1024,1536,2048,16x64,32x64,16x128,8x256",
    "cuda": "1024,2048,4096,8192,12288,16384,24576,32768,32x256,64x256,32x512",
}


def parse_lengths(text: str) -> list:
    """``"256,1024,16x64"`` -> ``[256, 1024, (64,) * 16]``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if "x" in part:
            n, s = part.split("x")
            out.append((int(s),) * int(n))
        else:
            out.append(int(part))
    return out


def _label(item) -> str:
    return (
        str(item)
        if isinstance(item, int)
        else f"{len(item)}x{item[0]}"
        if len(set(item)) == 1
        else "+".join(map(str, item))
    )


def _tokens(item) -> int:
    return item if isinstance(item, int) else sum(item)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s of this device (and thread count) in ``dtype``: the 'peak' the efficiencies refer to
    (CPU: process CPU time, so other processes on the machine do not lower it)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    n = 8192 if device.type == "cuda" else 1024
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    x @ y
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t = clock()
        x @ y
        _sync(device)
        best = min(best, clock() - t)
    return 2.0 * n**3 / best


def make_measure(model, device: torch.device, backend: str, vocab: int, seed: int = 0, clock=None):
    """``measure(s)``: seconds of one forward + backward of a sequence of ``s`` tokens through the HDP path.

    ``clock`` defaults to process CPU time on CPU (immune to other processes on a shared machine, and
    what benchmarks/real_ranks.py counts as busy time) and to wall time after a CUDA sync on GPU.
    """
    clock = clock or (time.perf_counter if device.type == "cuda" else time.process_time)
    collator = HDPCollator(vocab)
    mesh = DynamicMesh(device=device)
    g = torch.Generator().manual_seed(seed)
    prepared: dict[int, tuple] = {}

    def measure(item) -> float:
        if item not in prepared:
            lengths = [item] if isinstance(item, int) else list(item)
            samples = {
                i: {"input_ids": torch.randint(0, vocab, (s,), generator=g).tolist()} for i, s in enumerate(lengths)
            }
            (mb,) = plan_naive(lengths, 1, sum(lengths)).for_rank(0)  # one micro-batch of whole sequences
            prepared[item] = (
                collator(mb, samples),
                sum(count_loss_tokens(x["input_ids"], None) for x in samples.values()),
            )
        batch, n_loss = prepared[item]
        model.zero_grad(set_to_none=True)
        _sync(device)
        t = clock()
        run_micro_batches(model, [batch], n_loss, mesh, backend, device)
        _sync(device)
        return clock() - t

    return measure


def calibrate_model(
    model,
    config,
    device: torch.device,
    dtype: torch.dtype,
    backend: str = "auto",
    lengths: list | None = None,
    repeats: int = 2,
    warmup: int = 2,
    stat: str = "min",
    name: str | None = None,
) -> tuple[CostModel, ModelSpec]:
    """Time ``model`` (a transformers causal LM with the "hdp" attention enabled, of ``config``) on this
    machine and fit ``a, b, c``: ``(cost model, model spec)``. ``lengths`` as :func:`parse_lengths` gives
    them (default :data:`DEFAULT_LENGTHS` of the device); ``warmup`` unrecorded runs of the shortest
    length first; ``stat`` (``"min"`` or ``"median"``) of ``repeats`` runs counts. Everything but
    ``a, b, c`` comes from the ``cpu`` (or, on CUDA, ``h100``) preset. Leaves gradients behind."""
    lengths = lengths or parse_lengths(DEFAULT_LENGTHS[device.type])
    spec = ModelSpec.from_config(config, name=name, bytes_per_value=torch.finfo(dtype).bits // 8)
    base_hw = HARDWARE_PRESETS["cpu" if device.type == "cpu" else "h100"]
    measure = make_measure(model, device, backend, config.vocab_size)
    for _ in range(warmup):
        measure(min(lengths, key=_tokens))
    kwargs = {"statistic": min} if stat == "min" else {}
    cost = calibrate(
        measure,
        lengths,
        base=CostModel.from_specs(spec, base_hw),
        num_layers=config.num_hidden_layers,
        repeats=repeats,
        warmup=0,
        **kwargs,
    )
    return cost, spec


# ------------------------------------------------------------------------------------ gloo P2P


def _p2p_worker(rank: int, init_file: str, sizes: list[int], reps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    peer = 1 - rank
    results = {}
    for n in sizes:
        send = torch.zeros(max(n // 4, 1), dtype=torch.float32)
        recv = torch.empty_like(send)
        times = []
        for i in range(reps + 1):
            dist.barrier()
            t = time.perf_counter()
            ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            if i:
                times.append(time.perf_counter() - t)
        results[n] = min(times)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def measure_p2p(reps: int = 5) -> tuple[float, float, dict]:
    """Latency (s) and bandwidth (bytes/s, one way) of a simultaneous two-way exchange between two gloo
    processes on this machine, as the ring does it; fitted as ``t = latency + bytes / bandwidth``."""
    import torch.multiprocessing as mp

    sizes = [4, 1 << 16, 1 << 20, 1 << 22, 1 << 24]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p2p.pt")
        mp.start_processes(
            _p2p_worker, args=(os.path.join(tmp, "init"), sizes, reps, out), nprocs=2, start_method="spawn", join=True
        )
        results = torch.load(out)
    big = [n for n in sizes if n >= 1 << 20]
    # least squares on the large messages for the bandwidth, the smallest one for the latency
    xs, ys = big, [results[n] for n in big]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return results[sizes[0]], 1.0 / slope, results


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    ap.add_argument(
        "--lengths",
        default=None,
        help="comma-separated sequence lengths; NxS packs N sequences of S tokens in one micro-batch",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="unrecorded runs of the shortest length first")
    ap.add_argument("--stat", default="min", choices=["min", "median"], help="which repeat counts")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: one rank per core, as the CPU ranks run)")
    ap.add_argument("--backend", default="auto", help="attention backend of the 'hdp' attention")
    ap.add_argument("--p2p", action="store_true", help="also measure gloo P2P between two local processes (CPU)")
    ap.add_argument(
        "--links",
        default=None,
        choices=sorted(LINK_PRESETS),
        help="also print this link preset scaled to this machine's compute (hf_hdp.distributed.links)",
    )
    ap.add_argument(
        "--reference-tokens",
        "--reference_tokens",
        dest="reference_tokens",
        type=int,
        default=None,
        help="--links: the sequence length whose FLOP mix sets the scale (default: where attention = linear)",
    )
    ap.add_argument(
        "--ranks-per-node",
        "--ranks_per_node",
        dest="ranks_per_node",
        type=int,
        default=None,
        help="--links: ranks per emulated node (default: LOCAL_WORLD_SIZE, else the preset's)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = ap.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else (args.device if args.device != "auto" else "cpu")
    )
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    lengths = parse_lengths(args.lengths or DEFAULT_LENGTHS[device.type])
    shape = dict(MODELS[args.model])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=max(map(_tokens, lengths)), attention_dropout=0.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype=dtype)
    model.train()
    enable_hdp_attention(model)
    base_hw = HARDWARE_PRESETS["cpu" if device.type == "cpu" else "h100"]

    started = time.perf_counter()
    cost, spec = calibrate_model(
        model, config, device, dtype, args.backend, lengths, args.repeats, args.warmup, args.stat, name=args.model
    )
    timing_s = time.perf_counter() - started
    cal = cost.extra["calibration"]
    peak = matmul_rate(device, dtype)
    hw = hardware_from_coefficients(
        spec, cost.a, cost.b, cost.c, base_hw, peak_flops=peak, name=f"{base_hw.name} (calibrated)"
    )
    p2p = None
    if args.p2p:
        if device.type != "cpu":
            print("--p2p measures gloo between CPU processes; skipped on", device)
        else:
            lat, bw, raw = measure_p2p()
            p2p = {"latency_s": lat, "bandwidth_Bps": bw, "seconds_by_bytes": raw}
            hw = replace(hw, intra_bandwidth=bw, inter_bandwidth=bw, intra_latency=lat, inter_latency=lat)

    L = config.num_hidden_layers
    backend_name = args.backend
    if backend_name == "auto":
        from hf_hdp.attention.backends import get_backend

        backend_name = get_backend("auto", device).name
    print(
        f"calibration: {args.model} Llama (hidden {config.hidden_size}, {L} layers, heads {config.num_attention_heads}"
        f"/{config.num_key_value_heads}, intermediate {config.intermediate_size}, vocab {config.vocab_size}), "
        f"{device} {str(dtype).replace('torch.', '')}"
        + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "")
        + f", 'hdp' attention ({backend_name}), forward+backward of one sequence, {args.stat} of {args.repeats}, "
        + ("wall clock" if device.type == "cuda" else "process CPU time")
    )
    print(f"{'tokens':>8}{'measured s':>12}{'fit s':>12}{'residual':>10}")
    for s, t, r in zip(cal["lengths"], cal["seconds"], cal["residuals"]):
        print(f"{_label(s):>8}{t:>12.4f}{predicted_time(cost, s):>12.4f}{r:>+10.2%}")
    worst = max(abs(r) for r in cal["residuals"])
    print(
        f"per layer: a = {cost.a:.4e} s/token^2   b = {cost.b:.4e} s/token   c = {cost.c:.4e} s"
        f"   (max |residual| {worst:.2%}; attention = linear at {cost.b / cost.a if cost.a else float('inf'):,.0f} tokens)"
    )
    print(
        f"achieved: attention {3 * spec.attention_flops_per_s2 / cost.a / 1e9 if cost.a else 0:,.1f} GFLOP/s, "
        f"linear {3 * spec.linear_flops_per_token / cost.b / 1e9 if cost.b else 0:,.1f} GFLOP/s; "
        f"dense {str(dtype).replace('torch.', '')} matmul {peak / 1e9:,.1f} GFLOP/s"
    )
    if p2p:
        print(
            f"gloo P2P (two-way exchange, 2 processes): latency {p2p['latency_s'] * 1e6:,.0f} us, "
            f"bandwidth {p2p['bandwidth_Bps'] / 1e9:.2f} GB/s one way"
        )
    print(
        f"HardwareSpec reproducing the fit: HardwareSpec({hw.name!r}, {hw.peak_flops:.3g}, "
        f"{hw.attention_efficiency:.3g}, {hw.linear_efficiency:.3g}, {hw.intra_bandwidth:.3g}, {hw.intra_latency:.3g}, "
        f"{hw.inter_bandwidth:.3g}, {hw.inter_latency:.3g}, {hw.ranks_per_node}, {hw.overhead_per_layer:.3g}, "
        f"{hw.memory_bytes:.3g})"
    )
    links = None
    if args.links:
        links = LinkEmulator.scaled(args.links, cost, spec, args.reference_tokens, args.ranks_per_node)
        d = links.derivation
        print(
            f"links {args.links} scaled to this machine: achieved attention {d['this_attention_flops'] / 1e9:,.1f} "
            f"GFLOP/s vs {d['ref_attention_flops'] / 1e12:,.0f} TFLOP/s ({d['attention_ratio']:.3g}), linear "
            f"{d['this_linear_flops'] / 1e9:,.1f} GFLOP/s vs {d['ref_linear_flops'] / 1e12:,.0f} TFLOP/s "
            f"({d['linear_ratio']:.3g}); scale at {d['reference_tokens']:,.0f} tokens = {d['scale']:.4g}"
        )
        print(links.describe())
    print(f"timing took {timing_s:.1f} s")
    result = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "model": args.model,
        "num_layers": L,
        "backend": backend_name,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "a": cost.a,
        "b": cost.b,
        "c": cost.c,
        "lengths": [_label(s) for s in cal["lengths"]],
        "seconds": cal["seconds"],
        "residuals": cal["residuals"],
        "max_abs_residual": worst,
        "matmul_flops": peak,
        "hardware": {k: getattr(hw, k) for k in hw.__dataclass_fields__},
        "p2p": p2p and {"latency_s": p2p["latency_s"], "bandwidth_Bps": p2p["bandwidth_Bps"]},
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
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
