"""Check and time hf_hdp's fused attention backends on one CUDA GPU.

For every fused backend that can run here (``flash_attn`` if the package imports, ``torch_varlen``
if this PyTorch has the API), the script checks it against the ``reference`` backend, run on the same
GPU in float32 from the same bf16 inputs (Hq=32, Hkv=8, D=128), and times it:

1. plain attention (packed mixes with empty sequences and sequences without keys): ``forward``
   (out, lse) and ``backward`` causal and cross, ``backward`` with the *merged* out/lse of a
   two-member causal ring and of a non-causal two-block key split (the sum of the blocks'
   contributions must equal the full gradient), and ``varlen`` under autograd;
2. aligned causal with a sliding window (``window=1, 128, 1024`` over a pack holding a 4K and a
   ~32K sequence; smaller with ``--quick``): forward out/lse, backward, ``varlen`` under autograd;
3. windowed ring blocks with ``positions``, built the way the attention builds them: one zigzag
   layout (:func:`~hf_hdp.planning.layout.zigzag_front_back`, k=4 members, a long document, a short one
   and one with empty chunks), the pairs of :func:`~hf_hdp.planning.reach.member_pairs` for every
   (member, source) under ``LayerMask(window=w)``, one varlen call per source chunk (``k_chunk``) with
   ``positions=((q_pos, k_pos), ...)``. Per block vs the reference (forward, and backward from the
   merged out/lse), and the merge identity: every member's blocks merged give the dense windowed
   attention's out/lse, and the blocks' backward contributions summed (dq over a member's rows, dk/dv
   over every member's blocks) give its full gradient;
4. the same for chunked-attention pairs (``LayerMask(chunk=c)``, and one window+chunk mask), whose
   dense reference cuts every document at its chunk boundaries;
5. soft-capping (``softcap=50`` and ``5``, inputs scaled so that the cap bites) with and without a
   window, forward/backward and ``varlen``, plus one soft-capped windowed ring. A backend whose
   kernels take no soft-cap (``torch_varlen``) hands those calls to the reference backend: reported
   as ``[via reference]`` on the line, not as a failure;
6. timing: ``forward``, ``backward`` (ring API) and ``varlen`` forward+backward on packed mixes (8x4K,
   1x32K, a skewed mix), causal, TFLOP/s with the causal flop count (forward 4 * L^2 / 2 * H * D per
   sequence, backward 2.5x that); and a 32K sequence with ``window=4096`` against full causal: speed-up
   and TFLOP/s with the windowed flop count (forward 4 * (s*w - w^2/2) * H * D).

Every check prints one line as it finishes: ``ok``/``FAIL``/``CRASH``, the backend, the check, its
worst error as a multiple of its tolerance (relative to the reference's largest magnitude, at least
0.01; lse in absolute nats), then each quantity's multiple. A fused call that the backend routed to the reference
backend where a kernel was expected fails its line (the kernel was not exercised). The summary at the
end repeats the failures.

Exit status: 0 when every check is within bf16 tolerance, 1 when one is not (or a check raised),
2 without CUDA, 3 when no fused backend is available here. Runs in well under two minutes
(``--quick``: a few seconds of GPU time).

    python benchmarks/gpu_kernels.py [--quick] [--iters N]
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from hf_hdp.attention.backends import (
    ReferenceBackend,
    backend_unavailable_reason,
    get_backend,
)
from hf_hdp.attention.merge import merge_attention
from hf_hdp.planning.layout import member_token_ranges, zigzag_front_back
from hf_hdp.planning.reach import LayerMask, mask_pairs, member_pairs

HQ, HKV, D = 32, 8, 128
SCALE = D**-0.5
DTYPE = torch.bfloat16
# bf16 tolerances, relative to the largest magnitude of the reference (bf16 rounding alone is ~4e-3)
TOL = {"out": 1e-2, "lse": 5e-3, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2}
# the magnitude errors are relative to is at least this: gradients that vanish mathematically (dq/dk under a
# window of 1: one key per row, so dS = P * (dP - D) = 0) are rounding noise, not a scale (inputs are ~N(0, 1))
MAG_FLOOR = 1e-2
REF = ReferenceBackend()
RING_K = 4
CAP_INPUT_SCALE = 3.0  # soft-cap checks: q scaled so that scores ~ N(0, 9) and a cap of 5 (or 50) bites
T0 = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    """What one mode checks and times."""

    local_lens: tuple[int, ...]  # the pack of the local sliding-window checks
    local_windows: tuple[int, ...]
    ring_docs: tuple[int, ...]  # document lengths of the zigzag layout over RING_K members
    ring_windows: tuple[int, ...]
    ring_masks: tuple[LayerMask, ...]  # chunked (and window+chunk) masks on the same layout
    cap_lens: tuple[int, ...]
    cap_window: int
    ring_cap: tuple[int, float]  # (window, softcap) of the soft-capped ring
    mixes: dict
    window_bench: tuple[int, int]  # (sequence length, window) of the windowed timing
    iters: int
    plain_div: int = 1  # the plain checks' lengths divided by this (the CPU self-test)


FULL_SIZES = Sizes(
    local_lens=(4096, 0, 1, 32771, 517),
    local_windows=(1, 128, 1024),
    ring_docs=(16387, 1500, 5),
    ring_windows=(1, 128, 1024, 4096),
    ring_masks=(LayerMask(chunk=1000), LayerMask(chunk=4096), LayerMask(window=512, chunk=2048)),
    cap_lens=(2048, 0, 1, 8192, 300),
    cap_window=1024,
    ring_cap=(1024, 5.0),
    mixes={
        "8x4K": [4096] * 8,
        "1x32K": [32768],
        "mixed 32K": [16384, 8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 32],
    },
    window_bench=(32768, 4096),
    iters=10,
)
QUICK_SIZES = Sizes(
    local_lens=(1024, 0, 1, 4099, 300),
    local_windows=(1, 128, 1024),
    ring_docs=(4099, 500, 5),
    ring_windows=(1, 128, 1024),
    ring_masks=(LayerMask(chunk=300), LayerMask(window=128, chunk=512)),
    cap_lens=(1024, 0, 1, 2048),
    cap_window=256,
    ring_cap=(128, 5.0),
    mixes={"4x4K": [4096] * 4, "1x16K": [16384], "mixed 16K": [8192, 4096, 2048, 1024, 512, 256, 256]},
    window_bench=(16384, 4096),
    iters=3,
)
SELFTEST_SIZES = Sizes(  # --cpu-selftest: cpu_flash/reference stand in for the fused backends, on the CPU
    local_lens=(200, 0, 1, 517, 33),
    local_windows=(1, 16, 128),
    ring_docs=(301, 37, 5),
    ring_windows=(1, 8, 64),
    ring_masks=(LayerMask(chunk=20), LayerMask(chunk=64), LayerMask(window=8, chunk=32)),
    cap_lens=(100, 0, 1, 257),
    cap_window=16,
    ring_cap=(16, 5.0),
    mixes={"2x256": [256] * 2, "mixed 512": [256, 128, 64, 64]},
    window_bench=(1024, 128),
    iters=2,
    plain_div=8,
)


def stamp() -> str:
    return f"[{time.perf_counter() - T0:6.1f}s]"


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


def cu(lengths, device) -> torch.Tensor:
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
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return as_t(first), as_t(second)


def make(q_lens, k_lens, device, seed: int = 0, q_scale: float = 1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(sum(q_lens), HQ, D, device=device, dtype=DTYPE, generator=g)
    k = torch.randn(sum(k_lens), HKV, D, device=device, dtype=DTYPE, generator=g)
    v = torch.randn(sum(k_lens), HKV, D, device=device, dtype=DTYPE, generator=g)
    dout = torch.randn(sum(q_lens), HQ, D, device=device, dtype=DTYPE, generator=g)
    if q_scale != 1.0:
        q = (q.float() * q_scale).to(DTYPE)
    return q, k, v, dout


def f32(*ts):
    return [t.float() for t in ts]


_REF_CACHE: dict = {}


def cached(key, fn):
    """The reference result ``fn()`` for ``key``, computed once for all backends (same seeds, same inputs)."""
    if key not in _REF_CACHE:
        _REF_CACHE[key] = fn()
    return _REF_CACHE[key]


# -- zigzag ring blocks, the way hf_hdp.attention.metadata builds them -------------------------


def ring_layout(doc_lens, k: int = RING_K):
    """``layout[m][d] = (front_len, back_len)`` of document ``d`` on member ``m`` (hf_hdp.planning.reach)."""
    per_doc = [zigzag_front_back(n, k) for n in doc_lens]
    return tuple(tuple(per_doc[d][m] for d in range(len(doc_lens))) for m in range(k))


def member_rows(doc_lens, k: int, m: int) -> list[tuple[int, int]]:
    """Member ``m``'s rows in row order: ``(global packed index, position within its document)``."""
    rows, start = [], 0
    for n in doc_lens:
        for a, b in member_token_ranges(n, k, m):
            rows.extend((start + p, p) for p in range(a, b))
        start += n
    return rows


@dataclass
class Block:
    member: int
    source: int
    q_index: torch.Tensor  # rows of the member
    k_index: torch.Tensor  # rows of the source
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    positions: tuple


def ring_blocks(doc_lens, mask: LayerMask, device, k: int = RING_K):
    """``(rows, blocks)``: every member's rows (global packed indices, a long tensor each) and, per member,
    the blocks it computes with every source's K/V under ``mask``: one per source chunk, its pairs packed as
    varlen sequences with their positions. Checks the pairs against the rows' positions on the way."""
    layout = ring_layout(doc_lens, k)
    rows = [member_rows(doc_lens, k, m) for m in range(k)]
    for m in range(k):
        assert len(rows[m]) == sum(f + b for f, b in layout[m]), (m, len(rows[m]), layout[m])
    doc_start = [sum(doc_lens[:d]) for d in range(len(doc_lens))]
    blocks = []
    for m in range(k):
        mine = []
        for j in range(k):
            pairs = member_pairs(layout, m, j, mask)
            for chunk in (0, 1):
                ps = [p for p in pairs if p.k_chunk == chunk]
                if not ps:
                    continue
                q_idx, k_idx = [], []
                for p in ps:
                    assert p.q_len > 0 and p.k_len > 0, p
                    for r in range(p.q_row, p.q_row + p.q_len):
                        assert rows[m][r] == (doc_start[p.doc] + p.q_pos + r - p.q_row, p.q_pos + r - p.q_row), (p, r)
                    for r in range(p.k_row, p.k_row + p.k_len):
                        assert rows[j][r][1] == p.k_pos + r - p.k_row, (p, r)
                    q_idx.extend(range(p.q_row, p.q_row + p.q_len))
                    k_idx.extend(range(p.k_row, p.k_row + p.k_len))
                assert len(set(q_idx)) == len(q_idx), "a query row repeats within one source chunk"
                mine.append(
                    Block(
                        m,
                        j,
                        torch.tensor(q_idx, dtype=torch.long, device=device),
                        torch.tensor(k_idx, dtype=torch.long, device=device),
                        cu([p.q_len for p in ps], device),
                        cu([p.k_len for p in ps], device),
                        max(p.q_len for p in ps),
                        max(p.k_len for p in ps),
                        tuple((p.q_pos, p.k_pos) for p in ps),
                    )
                )
        blocks.append(mine)
    as_t = lambda r: torch.tensor([g for g, _ in r], dtype=torch.long, device=device)
    return [as_t(r) for r in rows], blocks


def dense_pieces(doc_lens, mask: LayerMask) -> list[int]:
    """The sequences of the dense reference under ``mask``: documents cut at its chunk boundaries."""
    if mask.chunk is None:
        return list(doc_lens)
    out = []
    for n in doc_lens:
        out.extend(min(mask.chunk, n - s) for s in range(0, n, mask.chunk))
    return out


def mask_label(mask: LayerMask) -> str:
    parts = ([f"w={mask.window}"] if mask.window else []) + ([f"c={mask.chunk}"] if mask.chunk else [])
    return ",".join(parts) or "full"


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------


class Line:
    """One printed check: several quantities compared, each as a multiple of its tolerance."""

    def __init__(self, backend: str, label: str) -> None:
        self.backend, self.label = backend, label
        self.parts: list[tuple[str, float, bool, str]] = []  # (what, measure / tol, ok, detail)
        self.crash: str | None = None
        self.fail_note = ""
        self.note = ""

    def compare(self, what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        got, ref = got.float(), ref.float()
        if got.shape != ref.shape:
            self.parts.append((what, math.inf, False, f"shape {tuple(got.shape)}!={tuple(ref.shape)}"))
            return
        inf_g, inf_r = torch.isinf(got), torch.isinf(ref)
        same_inf = torch.equal(inf_g, inf_r) and torch.equal(got[inf_g], ref[inf_r])
        fin = torch.isfinite(ref)
        finite_ok = bool(torch.isfinite(got[fin]).all()) and not bool(torch.isnan(got).any())
        err = (got[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
        mag = ref[fin].abs().max().item() if fin.any() else 0.0
        measure = err if what == "lse" else err / max(mag, MAG_FLOOR)  # lse: absolute error in nats
        ratio = measure / TOL[what]
        detail = "" if same_inf and finite_ok else "inf/nan pattern differs"
        self.parts.append((what, ratio, same_inf and finite_ok and ratio <= 1.0, detail))

    @property
    def ok(self) -> bool:
        return self.crash is None and not self.fail_note and bool(self.parts) and all(p[2] for p in self.parts)

    def render(self) -> str:
        head = f"{self.backend:<12} {self.label:<30}"
        if self.crash is not None:
            return f"CRASH {head} {self.crash}"
        if not self.parts:
            return f"FAIL  {head} nothing compared {self.fail_note}"
        worst = max(self.parts, key=lambda p: p[1])
        cols = "  ".join(f"{w} {r:.2f}{'' if ok else '!'}{(' ' + d) if d else ''}" for w, r, ok, d in self.parts)
        tail = "".join(f"  [{n}]" for n in (self.note, self.fail_note) if n)
        return f"{'ok' if self.ok else 'FAIL':<5} {head} {worst[1]:6.2f}x tol ({worst[0]:<3})  {cols}{tail}"


class Traced:
    """A fused backend that records how it routes each call (its kernels, or the reference backend)."""

    def __init__(self, be) -> None:
        self.be, self.name, self.routes = be, be.name, set()

    def _route(self, q, k, v, cu_q, cu_k, causal, kw) -> None:
        route = getattr(self.be, "_route", None)
        if route is None:
            return  # not a FusedBackend (the CPU self-test's stand-ins)
        how, _ = route(q, k, v, cu_q, cu_k, causal, kw.get("window"), kw.get("softcap"), kw.get("positions"))
        self.routes.add("reference" if how == "reference" else "kernel")

    def has_softcap(self) -> bool:
        fn = getattr(self.be, "_has_softcap", None)
        return True if fn is None else bool(fn())

    def window_problem(self) -> str | None:
        fn = getattr(self.be, "_window_problem", None)
        return None if fn is None else fn()

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **kw):
        self._route(q, k, v, cu_q, cu_k, causal, kw)
        return self.be.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **kw)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, **kw):
        self._route(q, k, v, cu_q, cu_k, causal, kw)
        return self.be.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, **kw)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **kw):
        self._route(q, k, v, cu_q, cu_k, causal, kw)
        return self.be.varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **kw)


class Report:
    def __init__(self) -> None:
        self.lines: list[Line] = []
        self.skipped: list[str] = []
        self.crashes: list[str] = []  # outside the checks (timing)

    @contextmanager
    def check(self, tb: Traced, *labels: str, softcap: bool = False):
        """Yields ``cmp(label, what, got, ref)``; prints the lines of ``labels`` when the block ends. A block
        that raises marks all of them crashed. Calls the backend routed to the reference are a failure unless
        ``softcap`` and the backend's kernels take no soft-cap (then a note)."""
        lines = {lab: Line(tb.name, lab) for lab in labels}
        tb.routes.clear()
        try:
            yield lambda lab, what, got, ref: lines[lab].compare(what, got, ref)
        except Exception as exc:
            print(traceback.format_exc(), end="")
            for line in lines.values():
                line.crash = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if "reference" in tb.routes:
            expected = softcap and not tb.has_softcap()
            for line in lines.values():
                if expected:
                    line.note = "via reference: no softcap in this backend's kernels"
                else:
                    line.fail_note = "routed to the reference backend: kernel not exercised"
        for line in lines.values():
            print(line.render(), flush=True)
            self.lines.append(line)

    def skip(self, backend: str, what: str, why: str) -> None:
        msg = f"SKIP  {backend:<12} {what}: {why}"
        print(msg, flush=True)
        self.skipped.append(msg)

    @property
    def ok(self) -> bool:
        return all(line.ok for line in self.lines) and not self.crashes

    def summary(self) -> None:
        bad = [line for line in self.lines if not line.ok]
        print(f"\n{stamp()} {len(self.lines)} checks, {len(bad)} failed, {len(self.skipped)} skipped")
        for line in bad:
            print(line.render())
        for msg in self.skipped:
            print(msg)
        for crash in self.crashes:
            print(f"CRASH {crash.strip().splitlines()[-1]}")


def shrink(lens: list[int], div: int) -> list[int]:
    return [n if n < 8 or div == 1 else max(8, n // div) for n in lens]


def check_plain(tb: Traced, device, report: Report, div: int = 1) -> None:
    # 1. plain forward / backward, causal and not, with empty sequences and sequences without keys
    for causal, q_lens, k_lens in (
        (True, [1000, 0, 517, 2048, 1, 300, 77], [1000, 0, 517, 2048, 1, 300, 77]),
        (False, [700, 0, 333, 1024, 5], [900, 64, 0, 1500, 2]),
    ):
        q_lens, k_lens = shrink(q_lens, div), shrink(k_lens, div)
        label = f"plain {'causal' if causal else 'cross'} fwd+bwd"
        with report.check(tb, label) as cmp:
            q, k, v, dout = make(q_lens, k_lens, device, seed=1)
            cq, ck, mq, mk = cu(q_lens, device), cu(k_lens, device), max(q_lens), max(k_lens)
            out, lse = tb.forward(q, k, v, cq, ck, mq, mk, causal, SCALE)
            r_out, r_lse = REF.forward(*f32(q, k, v), cq, ck, mq, mk, causal, SCALE)
            cmp(label, "out", out, r_out)
            cmp(label, "lse", lse, r_lse)
            grads = tb.backward(dout, q, k, v, out, lse, cq, ck, mq, mk, causal, SCALE)
            r_grads = REF.backward(*f32(dout, q, k, v), r_out, r_lse, cq, ck, mq, mk, causal, SCALE)
            for what, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
                cmp(label, what, g, r)

    # 2. two-member causal ring: rows/keys in halves; half 2 merges (q2 x k1, full) and (q2 x k2, causal)
    label = "ring causal (merged lse)"
    with report.check(tb, label) as cmp:
        lens = shrink([1536, 0, 700, 3, 1, 2049], div)
        q, k, v, dout = make(lens, lens, device, seed=2)
        half = [n // 2 for n in lens]
        rest = [n - h for n, h in zip(lens, half)]
        i1, i2 = split_index(lens, half, device)
        c1, c2, m1, m2 = cu(half, device), cu(rest, device), max(half), max(rest)
        ctot, mtot = cu(lens, device), max(lens)
        b = tb
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
        r_out, r_lse = REF.forward(*f32(q, k, v), ctot, ctot, mtot, mtot, True, SCALE)
        r_grads = REF.backward(*f32(dout, q, k, v), r_out, r_lse, ctot, ctot, mtot, mtot, True, SCALE)
        for what, g, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (r_out, *r_grads)):
            cmp(label, what, g, r)

    # 3. non-causal key split into two blocks, merged out/lse
    label = "key split (merged lse)"
    with report.check(tb, label) as cmp:
        q_lens, k_lens = shrink([800, 3, 0, 1200], div), shrink([1000, 1, 7, 600], div)
        q, k, v, dout = make(q_lens, k_lens, device, seed=3)
        cut = [n // 2 for n in k_lens]
        ka, kb = split_index(k_lens, cut, device)
        la, lb = cut, [n - c for n, c in zip(k_lens, cut)]
        cq, ca, cb, mq = cu(q_lens, device), cu(la, device), cu(lb, device), max(q_lens)
        oa, lsa = tb.forward(q, k[ka], v[ka], cq, ca, mq, max(la), False, SCALE)
        ob, lsb = tb.forward(q, k[kb], v[kb], cq, cb, mq, max(lb), False, SCALE)
        out, lse = merge_attention(*merge_attention(None, None, oa, lsa), ob, lsb)
        dqa, dka, dva = tb.backward(dout, q, k[ka], v[ka], out, lse, cq, ca, mq, max(la), False, SCALE)
        dqb, dkb, dvb = tb.backward(dout, q, k[kb], v[kb], out, lse, cq, cb, mq, max(lb), False, SCALE)
        dk, dv = torch.zeros(k.shape, device=device), torch.zeros(v.shape, device=device)
        dk[ka], dk[kb], dv[ka], dv[kb] = dka.float(), dkb.float(), dva.float(), dvb.float()
        ck = cu(k_lens, device)
        r_out, r_lse = REF.forward(*f32(q, k, v), cq, ck, mq, max(k_lens), False, SCALE)
        r_grads = REF.backward(*f32(dout, q, k, v), r_out, r_lse, cq, ck, mq, max(k_lens), False, SCALE)
        cmp(label, "out", out, r_out)
        cmp(label, "lse", lse, r_lse)
        for what, g, r in zip(("dq", "dk", "dv"), (dqa.float() + dqb.float(), dk, dv), r_grads):
            cmp(label, what, g, r)

    # 4. varlen under autograd
    lens = shrink([1000, 0, 517, 2048, 1], div)
    check_local(tb, device, report, lens, "plain", seed=4, with_fwd=False)


def check_local(
    tb: Traced,
    device,
    report: Report,
    lens,
    tag: str,
    seed: int,
    window: int | None = None,
    softcap: float | None = None,
    q_scale: float = 1.0,
    with_fwd: bool = True,
) -> None:
    """Aligned causal over packed local sequences: forward out/lse and backward (own out/lse) vs the
    reference, and ``varlen`` under autograd; with ``window``/``softcap`` as given."""
    lens = list(lens)
    kw = dict(window=window, softcap=softcap)
    c, m = cu(lens, device), max(lens)
    q, k, v, dout = make(lens, lens, device, seed=seed, q_scale=q_scale)
    key = (tag, tuple(lens), seed, window, softcap, q_scale, HQ, D)
    is_cap = softcap is not None
    if with_fwd:
        label = f"{tag} fwd+bwd"
        with report.check(tb, label, softcap=is_cap) as cmp:
            out, lse = tb.forward(q, k, v, c, c, m, m, True, SCALE, **kw)

            def ref_fb():
                r_out, r_lse = REF.forward(*f32(q, k, v), c, c, m, m, True, SCALE, **kw)
                return r_out, r_lse, REF.backward(*f32(dout, q, k, v), r_out, r_lse, c, c, m, m, True, SCALE, **kw)

            r_out, r_lse, r_grads = cached(("fb",) + key, ref_fb)
            cmp(label, "out", out, r_out)
            cmp(label, "lse", lse, r_lse)
            grads = tb.backward(dout, q, k, v, out, lse, c, c, m, m, True, SCALE, **kw)
            for what, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
                cmp(label, what, g, r)
            del out, lse, grads
    label = f"{tag} varlen autograd"
    with report.check(tb, label, softcap=is_cap) as cmp:
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = tb.varlen(qq, kk, vv, c, c, m, m, True, SCALE, **kw)
        out.backward(dout)

        def ref_varlen():
            rq, rk, rv = (t.float().requires_grad_(True) for t in (q, k, v))
            r_out = REF.varlen(rq, rk, rv, c, c, m, m, True, SCALE, **kw)
            r_out.backward(dout.float())
            return r_out.detach(), rq.grad, rk.grad, rv.grad

        r_out, *r_grads = cached(("varlen",) + key, ref_varlen)
        cmp(label, "out", out.detach(), r_out)
        for what, g, r in zip(("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), r_grads):
            cmp(label, what, g, r)


def check_ring(
    tb: Traced,
    device,
    report: Report,
    doc_lens,
    mask: LayerMask,
    seed: int,
    softcap: float | None = None,
    q_scale: float = 1.0,
) -> None:
    """Zigzag ring blocks with positions under ``mask`` (see the module docstring, item 3)."""
    tag = f"ring {mask_label(mask)}" + (f" cap={softcap:g}" if softcap is not None else "")
    l_blocks, l_merged = f"{tag} blocks", f"{tag} merged=dense"
    with report.check(tb, l_blocks, l_merged, softcap=softcap is not None) as cmp:
        q, k, v, dout = make(doc_lens, doc_lens, device, seed=seed, q_scale=q_scale)
        rows, blocks = ring_blocks(doc_lens, mask, device)
        kw = dict(window=mask.window, softcap=softcap)
        # forward: every block of every member, merged into the member's out/lse
        outs, lses = [], []
        got_o, ref_o, got_l, ref_l = [], [], [], []
        for m in range(RING_K):
            qm = q[rows[m]]
            out = torch.zeros(qm.shape, dtype=torch.float32, device=device)
            lse = torch.full(qm.shape[:2], float("-inf"), dtype=torch.float32, device=device)
            for b in blocks[m]:
                bq, bk, bv = qm[b.q_index], k[rows[b.source]][b.k_index], v[rows[b.source]][b.k_index]
                args = (b.cu_q, b.cu_k, b.max_q, b.max_k, True, SCALE)
                o, l = tb.forward(bq, bk, bv, *args, positions=b.positions, **kw)
                ro, rl = REF.forward(*f32(bq, bk, bv), *args, positions=b.positions, **kw)
                got_o.append(o), ref_o.append(ro), got_l.append(l), ref_l.append(rl)
                mo, ml = merge_attention(out.index_select(0, b.q_index), lse.index_select(0, b.q_index), o, l)
                out.index_copy_(0, b.q_index, mo)
                lse.index_copy_(0, b.q_index, ml)
            outs.append(out), lses.append(lse)
        cmp(l_blocks, "out", torch.cat(got_o), torch.cat(ref_o))
        cmp(l_blocks, "lse", torch.cat(got_l), torch.cat(ref_l))
        del got_o, ref_o, got_l, ref_l
        # backward: every block from its member's merged out/lse; per block vs the reference, and summed
        acc = [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in (q, k, v)]
        got_g, ref_g = ([], [], []), ([], [], [])
        for m in range(RING_K):
            qm, dm = q[rows[m]], dout[rows[m]]
            for b in blocks[m]:
                src = rows[b.source][b.k_index]
                bq, bk, bv, bd = qm[b.q_index], k[src], v[src], dm[b.q_index]
                bo, bl = outs[m].index_select(0, b.q_index), lses[m].index_select(0, b.q_index)
                args = (b.cu_q, b.cu_k, b.max_q, b.max_k, True, SCALE)
                grads = tb.backward(bd, bq, bk, bv, bo, bl, *args, positions=b.positions, **kw)
                r_grads = REF.backward(*f32(bd, bq, bk, bv), bo, bl, *args, positions=b.positions, **kw)
                for i in range(3):
                    got_g[i].append(grads[i]), ref_g[i].append(r_grads[i])
                acc[0].index_add_(0, rows[m][b.q_index], grads[0].float())
                acc[1].index_add_(0, src, grads[1].float())
                acc[2].index_add_(0, src, grads[2].float())
        for what, g, r in zip(("dq", "dk", "dv"), got_g, ref_g):
            cmp(l_blocks, what, torch.cat(g), torch.cat(r))
        del got_g, ref_g
        # the merge identity against the dense attention restricted to the mask
        out_full = torch.zeros(q.shape, dtype=torch.float32, device=device)
        lse_full = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=device)
        for m in range(RING_K):
            out_full.index_copy_(0, rows[m], outs[m])
            lse_full.index_copy_(0, rows[m], lses[m])
        pieces = dense_pieces(doc_lens, mask)
        c, mx = cu(pieces, device), max(pieces)

        def dense():
            r_out, r_lse = REF.forward(*f32(q, k, v), c, c, mx, mx, True, SCALE, **kw)
            return r_out, r_lse, REF.backward(*f32(dout, q, k, v), r_out, r_lse, c, c, mx, mx, True, SCALE, **kw)

        r_out, r_lse, r_grads = cached(("dense", tuple(doc_lens), mask, seed, softcap, q_scale, HQ, D), dense)
        cmp(l_merged, "out", out_full, r_out)
        cmp(l_merged, "lse", lse_full, r_lse)
        for what, g, r in zip(("dq", "dk", "dv"), acc, r_grads):
            cmp(l_merged, what, g, r)


def check_backend(name: str, device, report: Report, sizes: Sizes) -> None:
    tb = Traced(get_backend(name, device))
    check_plain(tb, device, report, sizes.plain_div)
    print(f"{stamp()} {name}: plain checks done", flush=True)

    problem = tb.window_problem()
    if problem is not None:
        report.skip(name, "sliding windows, ring pairs with positions, chunked pairs", problem)
    else:
        for w in sizes.local_windows:
            check_local(tb, device, report, sizes.local_lens, f"local w={w}", seed=10, window=w)
        print(f"{stamp()} {name}: local window checks done", flush=True)
        for w in sizes.ring_windows:
            check_ring(tb, device, report, sizes.ring_docs, LayerMask(window=w), seed=11)
        for mask in sizes.ring_masks:
            check_ring(tb, device, report, sizes.ring_docs, mask, seed=12)
        print(f"{stamp()} {name}: ring window/chunk checks done", flush=True)

    for cap in (50.0, 5.0):
        for w in (None, sizes.cap_window):
            if w is not None and problem is not None:
                continue
            tag = f"cap={cap:g}" + (f" w={w}" if w else "")
            check_local(
                tb, device, report, sizes.cap_lens, tag, seed=13, window=w, softcap=cap, q_scale=CAP_INPUT_SCALE
            )
    if problem is None:
        w, cap = sizes.ring_cap
        check_ring(
            tb, device, report, sizes.ring_docs, LayerMask(window=w), seed=14, softcap=cap, q_scale=CAP_INPUT_SCALE
        )
    print(f"{stamp()} {name}: soft-cap checks done", flush=True)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def time_ms(fn, iters: int, device, warmup: int = 2) -> float:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if not cuda:
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def fwd_flops(lens, window: int | None = None) -> float:
    """Forward flops, 4 * pairs * H * D: causal pairs L^2 / 2 per sequence, windowed L*w - w^2/2."""
    return sum(4 * mask_pairs(n, LayerMask(window=window)) / 2 * HQ * D for n in lens)


def free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_one(be, device, lens, iters: int, window: int | None = None) -> tuple[float, float, float]:
    """``(forward ms, backward ms, varlen forward+backward ms)``, causal (with ``window``)."""
    times = _time_one(be, device, lens, iters, window)  # its tensors are gone when it returns
    free(device)
    return times


def _time_one(be, device, lens, iters: int, window: int | None) -> tuple[float, float, float]:
    q, k, v, dout = make(lens, lens, device, seed=5)
    c, m = cu(lens, device), max(lens)
    kw = dict(window=window)
    out, lse = be.forward(q, k, v, c, c, m, m, True, SCALE, **kw)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))

    def fwd_bwd():
        o = be.varlen(qq, kk, vv, c, c, m, m, True, SCALE, **kw)
        o.backward(dout)

    t_fwd = time_ms(lambda: be.forward(q, k, v, c, c, m, m, True, SCALE, **kw), iters, device)
    t_bwd = time_ms(lambda: be.backward(dout, q, k, v, out, lse, c, c, m, m, True, SCALE, **kw), iters, device)
    t_fb = time_ms(fwd_bwd, iters, device)
    return t_fwd, t_bwd, t_fb


def bench_backend(name: str, device, mixes: dict, iters: int) -> list[tuple]:
    be = get_backend(name, device)
    rows = []
    for mix, lens in mixes.items():
        t_fwd, t_bwd, t_fb = bench_one(be, device, lens, iters)
        flops = fwd_flops(lens)
        rows.append(
            (
                name,
                mix,
                sum(lens),
                t_fwd,
                flops / t_fwd / 1e9,
                t_bwd,
                2.5 * flops / t_bwd / 1e9,
                t_fb,
                3.5 * flops / t_fb / 1e9,
            )
        )
    return rows


def bench_window(name: str, device, s: int, w: int, iters: int) -> list[tuple]:
    """Full causal vs ``window=w`` on one sequence of ``s`` tokens: rows with the speed-up over causal."""
    be = get_backend(name, device)
    rows, base = [], None
    for window in (None, w):
        t = bench_one(be, device, [s], iters, window)
        flops = fwd_flops([s], window)
        base = base or t
        rows.append(
            (name, "causal" if window is None else f"w={window}", s, t, flops, tuple(b / x for b, x in zip(base, t)))
        )
    return rows


def print_timing(rows, window_rows, iters: int) -> None:
    print(f"\ncausal, bf16, {iters} timed iterations; TFLOP/s from the causal flop count (bwd = 2.5x fwd)")
    print(
        f"{'backend':<13} {'mix':<10} {'tokens':>7} {'fwd ms':>8} {'TFLOP/s':>8} {'bwd ms':>8} {'TFLOP/s':>8} "
        f"{'fwd+bwd ms':>11} {'TFLOP/s':>8}"
    )
    for b, mix, tok, tf, ff, tb_, fb, tfb, ffb in rows:
        print(f"{b:<13} {mix:<10} {tok:7d} {tf:8.2f} {ff:8.1f} {tb_:8.2f} {fb:8.1f} {tfb:11.2f} {ffb:8.1f}")
    if window_rows:
        print(
            "\nsliding window vs full causal, one sequence; TFLOP/s from each mask's own flop count "
            "(fwd 4*pairs*H*D, pairs s^2/2 or s*w - w^2/2); speed-up = causal ms / this ms"
        )
        print(
            f"{'backend':<13} {'mask':<8} {'tokens':>7} {'fwd ms':>8} {'TFLOP/s':>8} {'x':>6} {'bwd ms':>8} "
            f"{'TFLOP/s':>8} {'x':>6} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'x':>6}"
        )
        for b, mask, tok, (tf, tbw, tfb), flops, (xf, xb, xfb) in window_rows:
            print(
                f"{b:<13} {mask:<8} {tok:7d} {tf:8.2f} {flops / tf / 1e9:8.1f} {xf:6.2f} {tbw:8.2f} "
                f"{2.5 * flops / tbw / 1e9:8.1f} {xb:6.2f} {tfb:11.2f} {3.5 * flops / tfb / 1e9:8.1f} {xfb:6.2f}"
            )


# ------------------------------------------------------------------------------------------


def describe_torch_api() -> None:
    try:
        from torch.nn.attention import varlen as varlen_mod

        print(f"varlen_attn{inspect.signature(varlen_mod.varlen_attn)}")
    except Exception as exc:
        print(f"torch.nn.attention.varlen: unavailable ({exc})")
    try:
        print(f"backward op: {torch.ops.torch_attn._varlen_attn_backward.default._schema}")
    except Exception as exc:
        print(f"torch_attn::_varlen_attn_backward: unavailable ({exc})")


def run(names: list[str], device, sizes: Sizes, iters: int, window_problem) -> bool:
    report = Report()
    for name in names:
        try:
            check_backend(name, device, report, sizes)
        except Exception:
            print(traceback.format_exc(), end="")
            report.crashes.append(f"{name} check: {traceback.format_exc()}")
    print(f"{stamp()} checks done", flush=True)

    rows, window_rows = [], []
    for name in names:
        try:
            rows += bench_backend(name, device, sizes.mixes, iters)
            if window_problem(name) is None:
                window_rows += bench_window(name, device, *sizes.window_bench, iters)
        except Exception:
            report.crashes.append(f"{name} timing: {traceback.format_exc()}")
            print(f"CRASH {name} timing:\n{traceback.format_exc()}")
    print_timing(rows, window_rows, iters)
    report.summary()
    ok = report.ok
    print("\nALL CHECKS PASSED" if ok else "\nSOME CHECKS FAILED")
    return ok


def cpu_selftest(args) -> int:
    """The whole script on the CPU at tiny sizes, cpu_flash and reference standing in for the fused backends
    (bf16 inputs, the same tolerances): checks the structure, the block building and the report."""
    global HQ, HKV, D, SCALE
    HQ, HKV, D = 4, 2, 16
    SCALE = D**-0.5
    device = torch.device("cpu")
    torch.manual_seed(0)
    print(f"CPU self-test: torch {torch.__version__}; Hq={HQ} Hkv={HKV} D={D} {DTYPE}")
    ok = run(["cpu_flash", "reference"], device, SELFTEST_SIZES, args.iters or SELFTEST_SIZES.iters, lambda _n: None)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller mixes and fewer iterations")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    ap.add_argument("--cpu-selftest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_selftest:
        return cpu_selftest(args)
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
    for name in names:
        tb = Traced(get_backend(name, device))
        problem = tb.window_problem()
        print(
            f"{name}: windows {'yes' if problem is None else 'no (' + problem + ')'}, "
            f"softcap {'in the kernels' if tb.has_softcap() else 'via reference'}"
        )

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    iters = args.iters or sizes.iters
    ok = run(names, device, sizes, iters, lambda n: Traced(get_backend(n, device)).window_problem())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
