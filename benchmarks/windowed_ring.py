"""One attention layer of a long ring piece: full causal (relay ring) vs sliding-window and chunked (halo exchange).

    .venv/bin/python benchmarks/windowed_ring.py                      # 4 gloo ranks, 16384 tokens
    .venv/bin/python benchmarks/windowed_ring.py --ranks 4 --length 16384 --windows 256 4096 --chunk 8192 --repeats 3

Spawns ``--ranks`` gloo CPU processes (one thread each) that hold ONE sample of ``--length`` tokens split over all
of them as a zigzag ring piece (:func:`hf_hdp.collators.collator.segment_for`, rows of
:func:`hf_hdp.planning.layout.hybrid_token_ranges`), Hq=8, Hkv=2, D=64, float32, the ``cpu_flash`` backend, and
runs one layer's forward + backward through :func:`hf_hdp.attention.segments.distributed_attention` for:

- ``full``: plain causal attention, the relay ring (:mod:`hf_hdp.attention.ring`);
- ``w=W`` for every ``--windows`` entry: a sliding window of ``W`` tokens;
- ``chunk=C`` (``--chunk``, 0 to leave it out): chunked attention of ``C`` tokens.

The windowed and chunked layers exchange only the K/V rows their masks reach (:mod:`hf_hdp.attention.halo`).
One warm-up first runs every configuration once on a sample of ``--warmup-length`` tokens (default a quarter
of ``--length``; it goes through the same code: the relay ring, the halo exchange, the blocked windowed kernel,
at a sixteenth of the full layer's cost), then each configuration runs ``--repeats`` times on the long sample.
Per configuration and rank it reports the median over the repeats of

- wall time of forward + backward (the ranks start together after a barrier);
- process CPU time (``time.process_time``) of the same interval. The ranks share this machine's cores, so
  wall time mixes in contention (and waits for slower partners); CPU time is what the rank itself computed,
  the figure that does not depend on how many cores the machine has;
- P2P bytes and messages sent (counted by :class:`hf_hdp.distributed.mesh.DynamicMesh`), next to the planner's estimate
  (:meth:`hf_hdp.planning.cost.CostModel.segment_bytes_by_member` / ``segment_messages_by_member`` with the
  layer's mask; where the cost model has no ``layer_masks`` yet, the count of
  :func:`hf_hdp.planning.reach.needed_count`, which is what the halo protocol sends);

and the ratios of each restricted layer to the full one, side by side: the bytes ratio is exact and does not
depend on load; the time ratios are measured in the same run (CPU time: independent of contention).

Correctness spot check (``--no-check`` skips it): every restricted configuration's output and dQ/dK/dV, gathered
in sequence order, against ONE process's ``cpu_flash`` varlen attention of the whole sequence under the same
window (chunked: the sequence cut at the chunk boundaries), max abs error printed.

Runtime of the default run: about 140 s of CPU time in all (imports, the 4 ranks, the check), so about 70 s on
2 idle cores; the full causal layer is most of it (``--length 8192`` takes well under half). On a loaded machine
it takes several times that: the header and footer print the load average. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HQ, HKV, D = 8, 2, 64
DTYPE = torch.float32
SEED = 1234


def _inputs(length: int):
    """The whole sequence's q, k, v and output gradient (the same on every process)."""
    g = torch.Generator().manual_seed(SEED)
    q = torch.randn(length, HQ, D, generator=g, dtype=DTYPE)
    k = torch.randn(length, HKV, D, generator=g, dtype=DTYPE)
    v = torch.randn(length, HKV, D, generator=g, dtype=DTYPE)
    dout = torch.randn(length, HQ, D, generator=g, dtype=DTYPE)
    return q, k, v, dout


def _row_index(length: int, ranks: int, member: int) -> torch.Tensor:
    from hf_hdp.planning.layout import hybrid_token_ranges

    return torch.cat([torch.arange(a, b) for a, b in hybrid_token_ranges(length, ranks, member, 1)])


def _configs(args) -> list[tuple[str, int | None, int | None]]:
    out = [("full", None, None)]
    out += [(f"w={w}", w, None) for w in args.windows]
    if args.chunk:
        out.append((f"chunk={args.chunk}", None, args.chunk))
    return out


def _measure(rank: int, world: int, args, out_dir: str) -> None:
    from hf_hdp.attention.backends import get_backend
    from hf_hdp.attention.features import LayerFeatures
    from hf_hdp.attention.segments import distributed_attention
    from hf_hdp.collators.collator import segment_for
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.planning.reach import LayerMask

    backend = get_backend("cpu_flash", torch.device("cpu"), DTYPE)
    mesh = DynamicMesh()
    scale = D**-0.5

    def sample(length: int):
        idx = _row_index(length, world, rank)
        q, k, v, dout = (t.index_select(0, idx) for t in _inputs(length))
        return idx, q, k, v, dout, segment_for([length], tuple(range(world)), 1, rank, 0, idx.numel(), (0,))

    def layer(q, k, v, dout, seg, features):
        """One forward + backward; (output, leaves, wall s, CPU s, bytes sent, messages sent)."""
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        dist.barrier()
        b0, m0 = mesh.stats.bytes_sent, mesh.stats.messages_sent
        t0, c0 = time.perf_counter(), time.process_time()
        o = distributed_attention(ql, kl, vl, (seg,), scale, backend, mesh, features)
        o.backward(dout)
        t1, c1 = time.perf_counter(), time.process_time()
        return o.detach(), (ql, kl, vl), t1 - t0, c1 - c0, mesh.stats.bytes_sent - b0, mesh.stats.messages_sent - m0

    configs = [
        (label, LayerFeatures(LayerMask(window=w, chunk=c), softcap=None), w, c) for label, w, c in _configs(args)
    ]
    # the warm-up: every configuration once on a shorter sample (kernels, allocator, the ring's and the halo's code)
    warm = sample(args.warmup_length)
    for _, features, _, _ in configs:
        layer(*warm[1:], features)
    idx, q, k, v, dout, seg = sample(args.length)
    result, tensors = {}, {}
    for label, features, window, chunk in configs:
        runs = [layer(q, k, v, dout, seg, features) for _ in range(args.repeats)]
        result[label] = {
            "wall": statistics.median(r[2] for r in runs),
            "cpu": statistics.median(r[3] for r in runs),
            "walls": [r[2] for r in runs],
            "cpus": [r[3] for r in runs],
            "bytes": [r[4] for r in runs],
            "messages": [r[5] for r in runs],
        }
        if not args.no_check and (window is not None or chunk is not None):
            o, leaves = runs[-1][:2]
            tensors[label] = (o, *(x.grad for x in leaves))
        del runs
    torch.save({"result": result, "index": idx, "tensors": tensors}, os.path.join(out_dir, f"rank{rank}.pt"))


def _worker(rank: int, world: int, init_file: str, out_dir: str, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _measure(rank, world, args, out_dir)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _estimates(length: int, k: int, window: int | None, chunk: int | None) -> tuple[list[int], list[int], str]:
    """Per member: bytes and messages the planner expects one layer's forward + backward to send, and the source."""
    from hf_hdp.planning.cost import CostModel
    from hf_hdp.planning.layout import zigzag_front_back
    from hf_hdp.planning.reach import LayerMask, needed_count

    mask = LayerMask(window=window, chunk=chunk)
    vb = DTYPE.itemsize
    common = dict(
        a=0, b=0, c=0, num_layers=1, kv_bytes_per_token=2 * HKV * D * vb, value_bytes=vb, num_heads=HQ, num_kv_heads=HKV
    )
    try:
        cost = CostModel(**common, layer_masks=(mask,))
        by = cost.segment_bytes_by_member([length], k)
        ms = cost.segment_messages_by_member([length], k)
        return [int(x) for x in by], [int(x) for x in ms], "cost model"
    except TypeError:  # a cost model without layer_masks: count the halo protocol's rows directly
        pass
    cost = CostModel(**common)
    mask = mask.for_length(length)
    if mask.full:
        return (
            [int(x) for x in cost.segment_bytes_by_member([length], k)],
            [cost.segment_messages(k)] * k,
            "cost model",
        )
    layout = tuple(tuple([zigzag_front_back(length, k)[m]]) for m in range(k))
    row = 2 * HKV * D * vb  # K and V of one row; dK/dV go back in float32 (= the model dtype here)
    by, ms = [], []
    for i in range(k):
        out = [needed_count(layout, m, i, mask) for m in range(k) if m != i]
        back = [needed_count(layout, i, j, mask) for j in range(k) if j != i]
        by.append((2 * sum(out) + sum(back)) * row)
        ms.append(2 * sum(1 for x in out if x) + sum(1 for x in back if x))
    return by, ms, "reach.needed_count"


def _reference(length: int, window: int | None, chunk: int | None):
    """One process's cpu_flash attention of the whole sequence: output and dQ/dK/dV."""
    from hf_hdp.attention.backends import get_backend

    backend = get_backend("cpu_flash", torch.device("cpu"), DTYPE)
    q, k, v, dout = _inputs(length)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    step = chunk if chunk is not None else length
    bounds = list(range(0, length, step)) + [length]
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    o = backend.varlen(q, k, v, cu, cu, longest, longest, True, D**-0.5, window=window)
    o.backward(dout)
    return o.detach(), q.grad, k.grad, v.grad


def _fmt_bytes(x: float) -> str:
    return f"{x / 2**20:.2f} MiB" if x >= 2**20 else f"{x / 2**10:.1f} KiB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--windows", type=int, nargs="*", default=[256, 4096])
    p.add_argument("--chunk", type=int, default=8192, help="attention chunk of the chunked layer (0: none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--warmup-length", type=int, default=None, help="tokens of the warm-up sample (default: a quarter of --length)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the single-process correctness check")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    k, s = args.ranks, args.length
    if args.warmup_length is None:
        args.warmup_length = max(args.length // 4, args.ranks)
    configs = _configs(args)
    print(
        f"windowed_ring: {k} gloo ranks, 1 sample of {s} tokens as one zigzag ring piece, Hq={HQ} Hkv={HKV} "
        f"D={D} {str(DTYPE).replace('torch.', '')}, cpu_flash, one layer forward+backward, "
        f"median of {args.repeats} after 1 warm-up ({args.warmup_length} tokens); {os.cpu_count()} CPUs, load avg "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker, args=(k, os.path.join(tmp, "init"), tmp, args), nprocs=k, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + args.timeout
        failure = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    failure = f"timed out after {args.timeout:.0f} s"
                    break
        except Exception as err:
            failure = str(err)
        if failure:
            errs = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.endswith(".err")]
            raise SystemExit("distributed run failed: " + failure + "\n" + "\n".join(errs))
        data = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(k)]
    measured_s = time.perf_counter() - started

    res = [d["result"] for d in data]
    full = configs[0][0]
    est = {label: _estimates(s, k, w, c) for label, w, c in configs}
    source = est[full][2] if all(e[2] == est[full][2] for e in est.values()) else "mixed"

    hdr = (
        f"{'layer':<12}{'rank':>5}{'wall ms':>10}{'cpu ms':>10}{'sent':>12}{'estimate':>12}{'msgs':>6}"
        f"{'est':>5}{'bytes/full':>12}{'wall/full':>11}{'cpu/full':>10}"
    )
    print(
        f"\nper rank (estimate: {source}; bytes and messages are the same in every repeat: "
        f"{'yes' if all(len(set(r[l]['bytes'])) == 1 and len(set(r[l]['messages'])) == 1 for r in res for l, _, _ in configs) else 'NO'})"
    )
    print(hdr)
    print("-" * len(hdr))
    for label, _, _ in configs:
        for r in range(k):
            m, f = res[r][label], res[r][full]
            print(
                f"{label:<12}{r:>5}{m['wall'] * 1e3:>10.1f}{m['cpu'] * 1e3:>10.1f}{_fmt_bytes(m['bytes'][0]):>12}"
                f"{_fmt_bytes(est[label][0][r]):>12}{m['messages'][0]:>6}{est[label][1][r]:>5}"
                f"{m['bytes'][0] / f['bytes'][0]:>12.4f}{m['wall'] / f['wall']:>11.3f}{m['cpu'] / f['cpu']:>10.3f}"
            )
    print()
    hdr = (
        f"{'layer':<12}{'bytes (all ranks)':>18}{'= estimate':>11}{'msgs':>6}{'bytes/full':>12}"
        f"{'max wall ms':>13}{'wall/full':>11}{'max cpu ms':>12}{'cpu/full':>10}{'sum cpu/full':>14}"
        f"{'cpu min-max ms':>17}"
    )
    print(
        "summary (time: the slowest rank, which the segment waits for; sum cpu: all ranks' CPU time; "
        "cpu min-max: that rank's repeats)"
    )
    print(hdr)
    print("-" * len(hdr))
    tot = lambda label, key: sum(res[r][label][key][0] for r in range(k))
    mx = lambda label, key: max(res[r][label][key] for r in range(k))
    sm = lambda label, key: sum(res[r][label][key] for r in range(k))

    def spread(label):  # the repeats' CPU time range of the rank with the largest median
        r = max(range(k), key=lambda x: res[x][label]["cpu"])
        c = res[r][label]["cpus"]
        return f"{min(c) * 1e3:.0f}-{max(c) * 1e3:.0f}"

    for label, _, _ in configs:
        b = tot(label, "bytes")
        print(
            f"{label:<12}{_fmt_bytes(b):>18}{'yes' if all(res[r][label]['bytes'][0] == est[label][0][r] for r in range(k)) else 'NO':>11}"
            f"{tot(label, 'messages'):>6}{b / tot(full, 'bytes'):>12.4f}{mx(label, 'wall') * 1e3:>13.1f}"
            f"{mx(label, 'wall') / mx(full, 'wall'):>11.3f}{mx(label, 'cpu') * 1e3:>12.1f}"
            f"{mx(label, 'cpu') / mx(full, 'cpu'):>10.3f}{sm(label, 'cpu') / sm(full, 'cpu'):>14.3f}"
            f"{spread(label):>17}"
        )

    if not args.no_check:
        print(
            "\ncorrectness: distributed rows gathered in sequence order vs one process's cpu_flash varlen of the "
            "whole sequence, same mask (max abs error)"
        )
        t0 = time.perf_counter()
        index = torch.cat([d["index"] for d in data])
        for label, window, chunk in configs:
            if label not in data[0]["tensors"]:
                continue
            ref = _reference(s, window, chunk)
            errs = []
            for f, name in enumerate(("out", "dQ", "dK", "dV")):
                got = torch.empty_like(ref[f])
                got[index] = torch.cat([d["tensors"][label][f] for d in data])
                errs.append(f"{name} {float((got - ref[f]).abs().max()):.2e}")
            print(f"  {label:<12}" + "  ".join(errs))
        print(f"  (check took {time.perf_counter() - t0:.1f} s)")
    print(
        f"\nmeasurement {measured_s:.1f} s; total {time.perf_counter() - started:.1f} s; load avg now "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
