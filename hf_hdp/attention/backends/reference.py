"""The ``"reference"`` backend: pure PyTorch attention with explicit scores, any device and dtype.

Slow, exact, and the ground truth: float64 tests, the backend ``"auto"`` picks for float64 on the
CPU, and the check of the fused backends in ``benchmarks/gpu_kernels.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..merge import accumulator_dtype
from .base import NEG_INF, POS_INF, AttentionBackend, check_features, empty_forward, sequence_bounds, visible

#: Upper bound on the bytes of one score block of the reference backend; longer sequences are
#: processed in blocks of query rows so the reference also runs at 32K+ tokens on a GPU.
REFERENCE_BLOCK_BYTES = 1 << 28


def _row_blocks(n_rows: int, n_keys: int, heads: int, itemsize: int) -> list[tuple[int, int]]:
    rows = max(1, REFERENCE_BLOCK_BYTES // max(1, heads * n_keys * itemsize))
    return [(r0, min(n_rows, r0 + rows)) for r0 in range(0, n_rows, rows)]


def _heads_first(x: Tensor, hkv: int, ct: torch.dtype) -> Tensor:
    """``[L, Hq, D]`` -> ``[Hkv, G, L, D]`` (query head ``h`` = kv head ``h // G``, member ``h % G``)."""
    n, hq, d = x.shape
    return x.to(ct).reshape(n, hkv, hq // hkv, d).permute(1, 2, 0, 3)


def _key_range(q0: int, k0: int, r0: int, r1: int, n_keys: int, causal: bool, window: int | None) -> tuple[int, int]:
    """The keys ``[lo, hi)`` query rows ``r0..r1`` of a sequence can see (rows at positions ``q0 + r``, keys at
    ``k0 + c``): causal cuts the keys after the last row, a window those before the first row's reach."""
    lo, hi = 0, n_keys
    if causal:
        hi = min(hi, max(0, q0 + r1 - k0))
    if window is not None:
        lo = max(lo, min(hi, q0 + r0 - window + 1 - k0))
    return lo, hi


def _scores(
    qq: Tensor, kk: Tensor, scale: float, softcap: float | None, ok: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Scaled (and soft-capped) scores ``[Hkv, G, rows, keys]`` with invisible keys at -inf, and ``tanh`` of the
    capped scores (for the backward), or ``None`` without a cap."""
    s = torch.matmul(qq, kk.transpose(-1, -2).unsqueeze(1)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if ok is not None:
        s = s.masked_fill(~ok, NEG_INF)
    return s, t


class ReferenceBackend(AttentionBackend):
    """Explicit scores, one sequence (and block of rows) at a time.

    Computes in :func:`~hf_hdp.attention.merge.accumulator_dtype` (float32, float64 for float64
    inputs) on any device. ``forward`` and ``backward`` implement the formulas of the contract
    literally; ``varlen`` is the autograd Function built from them. Validates everything (causal
    length equality included), which costs a host sync on ``cu_q``/``cu_k``: this backend is for
    correctness, not speed.
    """

    name = "reference"

    @torch.no_grad()
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, *, window=None, softcap=None, positions=None):
        check_features(window, softcap, positions, causal)
        seqs = sequence_bounds(q, k, v, cu_q, cu_k, causal, positions)
        ct = accumulator_dtype(q)
        hq, hkv = q.shape[1], k.shape[1]
        out, lse = empty_forward(q, v)
        for i, ((qs, qe), (ks, ke)) in enumerate(seqs):
            if qe == qs or ke == ks:
                continue  # no rows, or rows without keys: out 0, lse -inf
            q0, k0 = positions[i] if positions is not None else (0, 0)
            kk = k[ks:ke].to(ct).transpose(0, 1)  # [Hkv, Lk, D]
            vv = v[ks:ke].to(ct).transpose(0, 1)
            for r0, r1 in _row_blocks(qe - qs, ke - ks, hq, torch.finfo(ct).bits // 8):
                lo, hi = _key_range(q0, k0, r0, r1, ke - ks, causal, window)
                if hi <= lo:
                    continue  # these rows see no key
                qq = _heads_first(q[qs + r0 : qs + r1], hkv, ct)
                ok = visible(q0 + r0, k0 + lo, r1 - r0, hi - lo, causal, window, q.device)
                s, _ = _scores(qq, kk[:, lo:hi], scale, softcap, ok)
                m = s.amax(dim=-1, keepdim=True)
                m = m.masked_fill(m == NEG_INF, 0.0)  # a row without keys: p = 0, l = 0
                p = torch.exp(s - m)
                l = p.sum(dim=-1, keepdim=True)
                o = torch.matmul(p, vv[:, lo:hi].unsqueeze(1)) / l.clamp_min(torch.finfo(ct).tiny)  # [Hkv, G, rows, D]
                out[qs + r0 : qs + r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, hq, -1)
                lse[qs + r0 : qs + r1] = (m + torch.log(l)).squeeze(-1).permute(2, 0, 1).reshape(r1 - r0, hq)
        return out, lse

    @torch.no_grad()
    def backward(
        self,
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        max_q,
        max_k,
        causal,
        scale,
        *,
        window=None,
        softcap=None,
        positions=None,
    ):
        check_features(window, softcap, positions, causal)
        seqs = sequence_bounds(q, k, v, cu_q, cu_k, causal, positions)
        ct = accumulator_dtype(q)
        hq, hkv = q.shape[1], k.shape[1]
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=k.device)
        dv = torch.zeros(v.shape, dtype=ct, device=v.device)
        for i, ((qs, qe), (ks, ke)) in enumerate(seqs):
            if qe == qs or ke == ks:
                continue
            q0, k0 = positions[i] if positions is not None else (0, 0)
            kk = k[ks:ke].to(ct).transpose(0, 1)
            vv = v[ks:ke].to(ct).transpose(0, 1)
            for r0, r1 in _row_blocks(qe - qs, ke - ks, hq, torch.finfo(ct).bits // 8):
                lo, hi = _key_range(q0, k0, r0, r1, ke - ks, causal, window)
                if hi <= lo:
                    continue
                rows = slice(qs + r0, qs + r1)
                qq = _heads_first(q[rows], hkv, ct)
                do = _heads_first(dout[rows], hkv, ct)
                oo = _heads_first(out[rows], hkv, ct)
                ll = _heads_first(lse[rows].unsqueeze(-1), hkv, ct)  # [Hkv, G, rows, 1]
                ll = ll.masked_fill(ll == NEG_INF, POS_INF)  # rows with no mass: P = 0
                ok = visible(q0 + r0, k0 + lo, r1 - r0, hi - lo, causal, window, q.device)
                s, t = _scores(qq, kk[:, lo:hi], scale, softcap, ok)
                p = torch.exp(s - ll)  # [Hkv, G, rows, keys]
                k_blk, v_blk = kk[:, lo:hi].unsqueeze(1), vv[:, lo:hi].unsqueeze(1)
                d_row = (do * oo).sum(dim=-1, keepdim=True)
                dp = torch.matmul(do, v_blk.transpose(-1, -2))
                ds = p * (dp - d_row)
                if t is not None:
                    ds = ds * (1 - t * t)  # d(c tanh(s/c))/ds
                dq[rows] = (torch.matmul(ds, k_blk) * scale).permute(2, 0, 1, 3).reshape(r1 - r0, hq, -1)
                dk_blk = torch.matmul(ds.transpose(-1, -2), qq).sum(dim=1) * scale  # [Hkv, keys, D]
                dv_blk = torch.matmul(p.transpose(-1, -2), do).sum(dim=1)
                dk[ks + lo : ks + hi] += dk_blk.transpose(0, 1)
                dv[ks + lo : ks + hi] += dv_blk.transpose(0, 1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
