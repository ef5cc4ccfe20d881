"""Check and time hf_hdp's fused attention backends on one CUDA GPU.

For every fused backend that can run here (``flash_attn`` if the package imports, ``torch_varlen``
if this PyTorch has the API), the script

1. checks it against the ``reference`` backend, run on the same GPU in float32 from the same bf16
   inputs (Hq=32, Hkv=8, D=128, packed mixes with empty sequences and sequences without keys):
   ``forward`` (out, lse), ``backward`` with its own out/lse, ``backward`` with the *merged* out/lse
   of a two-member causal ring and of a non-causal two-block key split (the sum of the blocks'
   contributions must equal the full gradient), and ``varlen`` under autograd;
2. times ``forward``, ``backward`` (ring API) and ``varlen`` forward+backward on packed mixes
   (8x4K, 1x32K, a skewed mix) in bf16, causal, and reports TFLOP/s with the causal flop count
   (forward 4 * L^2 / 2 * H * D per sequence, backward 2.5x that).

Exit status: 0 when every check is within bf16 tolerance, 1 when one is not (or a backend raised),
2 without CUDA, 3 when no fused backend is available here. Runs in well under two minutes
(``--quick``: a few seconds of GPU time).

    python benchmarks/gpu_kernels.py [--quick] [--iters N]
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_hdp.attention.backends import (  # noqa: E402
    ReferenceBackend,
    backend_unavailable_reason,
    get_backend,
)
from hf_hdp.attention.merge import merge_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128
SCALE = D**-0.5
DTYPE = torch.bfloat16
# bf16 tolerances, relative to the largest magnitude of the reference (bf16 rounding alone is ~4e-3)
TOL = {"out": 1e-2, "lse": 5e-3, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2}
REF = ReferenceBackend()


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


def cu(lengths: list[int], device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def split_index(lengths: list[int], cut: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed indices of the first ``cut[i]`` tokens of every sequence, and of the rest."""
    first, second, start = [], [], 0
    for n, c in zip(lengths, cut):
        first.extend(range(start, start + c))
        second.extend(range(start + c, start + n))
        start += n
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return as_t(first), as_t(second)


def make(q_lens: list[int], k_lens: list[int], device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(sum(q_lens), HQ, D, device=device, dtype=DTYPE, generator=g)
    k = torch.randn(sum(k_lens), HKV, D, device=device, dtype=DTYPE, generator=g)
    v = torch.randn(sum(k_lens), HKV, D, device=device, dtype=DTYPE, generator=g)
    dout = torch.randn(sum(q_lens), HQ, D, device=device, dtype=DTYPE, generator=g)
    return q, k, v, dout


def f32(*ts):
    return [t.float() for t in ts]


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, float, float, float, float, bool]] = []
        self.crashes: list[str] = []

    def compare(self, backend: str, check: str, what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        got, ref = got.float(), ref.float()
        if got.shape != ref.shape:
            self.rows.append((backend, check, f"{what} shape {tuple(got.shape)}!={tuple(ref.shape)}", math.inf, 0, math.inf, 0, False))
            return
        same_inf = torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got[torch.isinf(got)], ref[torch.isinf(ref)])
        fin = torch.isfinite(ref)
        finite_ok = bool(torch.isfinite(got[fin]).all()) and not bool(torch.isnan(got).any())
        err = (got[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
        mag = ref[fin].abs().max().item() if fin.any() else 0.0
        rel = err / max(mag, 1e-6)
        tol = TOL[what]
        measure = err if what == "lse" else rel  # lse: absolute error in nats
        ok = same_inf and finite_ok and measure <= tol
        self.rows.append((backend, check, what, err, mag, rel, tol, ok))

    def print(self) -> bool:
        print(f"\n{'backend':<13} {'check':<26} {'what':<4} {'max|err|':>10} {'max|ref|':>10} {'rel':>9} {'tol':>7}  ok")
        for b, c, w, err, mag, rel, tol, ok in self.rows:
            print(f"{b:<13} {c:<26} {w:<4} {err:10.2e} {mag:10.2e} {rel:9.2e} {tol:7.0e}  {'yes' if ok else 'NO'}")
        for crash in self.crashes:
            print(f"CRASH {crash}")
        return all(r[-1] for r in self.rows) and not self.crashes


def check_backend(name: str, device, report: Report) -> None:
    be = get_backend(name, device)

    # 1. plain forward / backward, causal and not, with empty sequences and sequences without keys
    for causal, q_lens, k_lens in (
        (True, [1000, 0, 517, 2048, 1, 300, 77], [1000, 0, 517, 2048, 1, 300, 77]),
        (False, [700, 0, 333, 1024, 5], [900, 64, 0, 1500, 2]),
    ):
        tag = "causal" if causal else "cross"
        q, k, v, dout = make(q_lens, k_lens, device, seed=1)
        cq, ck, mq, mk = cu(q_lens, device), cu(k_lens, device), max(q_lens), max(k_lens)
        out, lse = be.forward(q, k, v, cq, ck, mq, mk, causal, SCALE)
        r_out, r_lse = REF.forward(*f32(q, k, v), cq, ck, mq, mk, causal, SCALE)
        report.compare(name, f"forward {tag}", "out", out, r_out)
        report.compare(name, f"forward {tag}", "lse", lse, r_lse)
        grads = be.backward(dout, q, k, v, out, lse, cq, ck, mq, mk, causal, SCALE)
        r_grads = REF.backward(*f32(dout, q, k, v), r_out, r_lse, cq, ck, mq, mk, causal, SCALE)
        for what, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
            report.compare(name, f"backward {tag}", what, g, r)

    # 2. two-member causal ring: rows/keys in halves; half 2 merges (q2 x k1, full) and (q2 x k2, causal)
    lens = [1536, 0, 700, 3, 1, 2049]
    q, k, v, dout = make(lens, lens, device, seed=2)
    half = [n // 2 for n in lens]
    rest = [n - h for n, h in zip(lens, half)]
    i1, i2 = split_index(lens, half, device)
    c1, c2, m1, m2 = cu(half, device), cu(rest, device), max(half), max(rest)
    ctot, mtot = cu(lens, device), max(lens)

    def ring(b, q, k, v, dout):
        q1, q2, k1, k2, v1, v2 = q[i1], q[i2], k[i1], k[i2], v[i1], v[i2]
        out1, lse1 = b.forward(q1, k1, v1, c1, c1, m1, m1, True, SCALE)
        o21, l21 = b.forward(q2, k1, v1, c2, c1, m2, m1, False, SCALE)
        o22, l22 = b.forward(q2, k2, v2, c2, c2, m2, m2, True, SCALE)
        out2, lse2 = merge_attention(*merge_attention(None, None, o21, l21), o22, l22)
        dq1, dk1a, dv1a = b.backward(dout[i1], q1, k1, v1, out1, lse1, c1, c1, m1, m1, True, SCALE)
        dq2a, dk1b, dv1b = b.backward(dout[i2], q2, k1, v1, out2, lse2, c2, c1, m2, m1, False, SCALE)
        dq2b, dk2, dv2 = b.backward(dout[i2], q2, k2, v2, out2, lse2, c2, c2, m2, m2, True, SCALE)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
        out[i1], out[i2] = out1.float(), out2
        dq[i1], dq[i2] = dq1.float(), dq2a.float() + dq2b.float()
        dk[i1], dk[i2] = dk1a.float() + dk1b.float(), dk2.float()
        dv[i1], dv[i2] = dv1a.float() + dv1b.float(), dv2.float()
        return out, dq, dk, dv

    got = ring(be, q, k, v, dout)
    r_out, r_lse = REF.forward(*f32(q, k, v), ctot, ctot, mtot, mtot, True, SCALE)
    r_grads = REF.backward(*f32(dout, q, k, v), r_out, r_lse, ctot, ctot, mtot, mtot, True, SCALE)
    for what, g, r in zip(("out", "dq", "dk", "dv"), got, (r_out, *r_grads)):
        report.compare(name, "ring causal (merged lse)", what, g, r)

    # 3. non-causal key split into two blocks, merged out/lse
    q_lens, k_lens = [800, 3, 0, 1200], [1000, 1, 7, 600]
    q, k, v, dout = make(q_lens, k_lens, device, seed=3)
    cut = [n // 2 for n in k_lens]
    ka, kb = split_index(k_lens, cut, device)
    la, lb = cut, [n - c for n, c in zip(k_lens, cut)]
    cq, ca, cb, mq = cu(q_lens, device), cu(la, device), cu(lb, device), max(q_lens)
    oa, lsa = be.forward(q, k[ka], v[ka], cq, ca, mq, max(la), False, SCALE)
    ob, lsb = be.forward(q, k[kb], v[kb], cq, cb, mq, max(lb), False, SCALE)
    out, lse = merge_attention(*merge_attention(None, None, oa, lsa), ob, lsb)
    dqa, dka, dva = be.backward(dout, q, k[ka], v[ka], out, lse, cq, ca, mq, max(la), False, SCALE)
    dqb, dkb, dvb = be.backward(dout, q, k[kb], v[kb], out, lse, cq, cb, mq, max(lb), False, SCALE)
    dk, dv = torch.zeros(k.shape, device=device), torch.zeros(v.shape, device=device)
    dk[ka], dk[kb], dv[ka], dv[kb] = dka.float(), dkb.float(), dva.float(), dvb.float()
    ck = cu(k_lens, device)
    r_out, r_lse = REF.forward(*f32(q, k, v), cq, ck, mq, max(k_lens), False, SCALE)
    r_grads = REF.backward(*f32(dout, q, k, v), r_out, r_lse, cq, ck, mq, max(k_lens), False, SCALE)
    report.compare(name, "key split (merged lse)", "out", out, r_out)
    report.compare(name, "key split (merged lse)", "lse", lse, r_lse)
    for what, g, r in zip(("dq", "dk", "dv"), (dqa.float() + dqb.float(), dk, dv), r_grads):
        report.compare(name, "key split (merged lse)", what, g, r)

    # 4. varlen under autograd
    lens = [1000, 0, 517, 2048, 1]
    q, k, v, dout = make(lens, lens, device, seed=4)
    c, m = cu(lens, device), max(lens)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = be.varlen(qq, kk, vv, c, c, m, m, True, SCALE)
    out.backward(dout)
    rq, rk, rv = (t.float().requires_grad_(True) for t in (q, k, v))
    r_out = REF.varlen(rq, rk, rv, c, c, m, m, True, SCALE)
    r_out.backward(dout.float())
    report.compare(name, "varlen autograd", "out", out.detach(), r_out.detach())
    for what, g, r in zip(("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), (rq.grad, rk.grad, rv.grad)):
        report.compare(name, "varlen autograd", what, g, r)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def time_ms(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def causal_fwd_flops(lens: list[int]) -> float:
    return sum(4 * n * n / 2 * HQ * D for n in lens)


def bench_backend(name: str, device, mixes: dict[str, list[int]], iters: int) -> list[tuple]:
    be = get_backend(name, device)
    rows = []
    for mix, lens in mixes.items():
        q, k, v, dout = make(lens, lens, device, seed=5)
        c, m = cu(lens, device), max(lens)
        out, lse = be.forward(q, k, v, c, c, m, m, True, SCALE)
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))

        def fwd_bwd():
            o = be.varlen(qq, kk, vv, c, c, m, m, True, SCALE)
            o.backward(dout)

        t_fwd = time_ms(lambda: be.forward(q, k, v, c, c, m, m, True, SCALE), iters)
        t_bwd = time_ms(lambda: be.backward(dout, q, k, v, out, lse, c, c, m, m, True, SCALE), iters)
        t_fb = time_ms(fwd_bwd, iters)
        flops = causal_fwd_flops(lens)
        rows.append((name, mix, sum(lens), t_fwd, flops / t_fwd / 1e9, t_bwd, 2.5 * flops / t_bwd / 1e9, t_fb, 3.5 * flops / t_fb / 1e9))
        del q, k, v, dout, qq, kk, vv, out, lse
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------


def describe_torch_api() -> None:
    try:
        from torch.nn.attention import varlen as varlen_mod

        print(f"varlen_attn{inspect.signature(varlen_mod.varlen_attn)}")
    except Exception as exc:  # noqa: BLE001
        print(f"torch.nn.attention.varlen: unavailable ({exc})")
    try:
        print(f"backward op: {torch.ops.torch_attn._varlen_attn_backward.default._schema}")
    except Exception as exc:  # noqa: BLE001
        print(f"torch_attn::_varlen_attn_backward: unavailable ({exc})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller mixes and fewer iterations")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks and times the CUDA attention backends")
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be real float32
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}; Hq={HQ} Hkv={HKV} D={D} {DTYPE}")
    describe_torch_api()

    names = []
    for name in ("flash_attn", "torch_varlen"):
        reason = backend_unavailable_reason(name, device)
        print(f"{name}: {'available' if reason is None else 'unavailable: ' + reason}")
        if reason is None:
            names.append(name)
    print(f"auto -> {get_backend('auto', device).name}")
    if not names:
        print("no fused backend can run here: nothing to check")
        return 3

    report = Report()
    for name in names:
        try:
            check_backend(name, device, report)
        except Exception:  # noqa: BLE001 - report and go on with the next backend
            report.crashes.append(f"{name} check: {traceback.format_exc()}")
    ok = report.print()

    if args.quick:
        mixes = {"4x4K": [4096] * 4, "1x16K": [16384], "mixed 16K": [8192, 4096, 2048, 1024, 512, 256, 256]}
        iters = args.iters or 3
    else:
        mixes = {
            "8x4K": [4096] * 8,
            "1x32K": [32768],
            "mixed 32K": [16384, 8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 32],
        }
        iters = args.iters or 10
    rows = []
    for name in names:
        try:
            rows += bench_backend(name, device, mixes, iters)
        except Exception:  # noqa: BLE001
            report.crashes.append(f"{name} timing: {traceback.format_exc()}")
            print(f"CRASH {name} timing:\n{traceback.format_exc()}")
            ok = False
    print(f"\ncausal, bf16, {iters} timed iterations; TFLOP/s from the causal flop count (bwd = 2.5x fwd)")
    print(f"{'backend':<13} {'mix':<10} {'tokens':>7} {'fwd ms':>8} {'TFLOP/s':>8} {'bwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}")
    for b, mix, tok, tf, ff, tb, fb, tfb, ffb in rows:
        print(f"{b:<13} {mix:<10} {tok:7d} {tf:8.2f} {ff:8.1f} {tb:8.2f} {fb:8.1f} {tfb:11.2f} {ffb:8.1f}")
    print("\nALL CHECKS PASSED" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
