"""The ``"reference"`` backend: pure PyTorch attention with explicit scores, any device and dtype.

Slow, exact, and the ground truth: float64 tests, the backend ``"auto"`` picks for float64 on the
CPU, and the check of the fused backends in ``benchmarks/gpu_kernels.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..merge import accumulator_dtype
from .base import NEG_INF, POS_INF, AttentionBackend, empty_forward, sequence_bounds

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


def _scores(qq: Tensor, kk: Tensor, scale: float, causal: bool, r0: int) -> Tensor:
    """Scaled scores ``[Hkv, G, rows, keys]`` with the causal mask applied (-inf)."""
    s = torch.matmul(qq, kk.transpose(-1, -2).unsqueeze(1)) * scale
    if causal:
        rows = torch.arange(r0, r0 + s.shape[-2], device=s.device)
        cols = torch.arange(s.shape[-1], device=s.device)
        s = s.masked_fill(cols[None, :] > rows[:, None], NEG_INF)
    return s


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
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        seqs = sequence_bounds(q, k, v, cu_q, cu_k, causal)
        ct = accumulator_dtype(q)
        hq, hkv = q.shape[1], k.shape[1]
        out, lse = empty_forward(q, v)
        for (qs, qe), (ks, ke) in seqs:
            if qe == qs or ke == ks:
                continue  # no rows, or rows without keys: out 0, lse -inf
            kk = k[ks:ke].to(ct).transpose(0, 1)  # [Hkv, Lk, D]
            vv = v[ks:ke].to(ct).transpose(0, 1)
            for r0, r1 in _row_blocks(qe - qs, ke - ks, hq, torch.finfo(ct).bits // 8):
                n_keys = r1 if causal else ke - ks  # causal: row i sees keys 0..i
                qq = _heads_first(q[qs + r0 : qs + r1], hkv, ct)
                s = _scores(qq, kk[:, :n_keys], scale, causal, r0)
                m = s.amax(dim=-1, keepdim=True)  # finite: every row here has at least one key
                p = torch.exp(s - m)
                l = p.sum(dim=-1, keepdim=True)
                o = torch.matmul(p, vv[:, :n_keys].unsqueeze(1)) / l  # [Hkv, G, rows, D]
                out[qs + r0 : qs + r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, hq, -1)
                lse[qs + r0 : qs + r1] = (m + torch.log(l)).squeeze(-1).permute(2, 0, 1).reshape(r1 - r0, hq)
        return out, lse

    @torch.no_grad()
    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        seqs = sequence_bounds(q, k, v, cu_q, cu_k, causal)
        ct = accumulator_dtype(q)
        hq, hkv = q.shape[1], k.shape[1]
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=k.device)
        dv = torch.zeros(v.shape, dtype=ct, device=v.device)
        for (qs, qe), (ks, ke) in seqs:
            if qe == qs or ke == ks:
                continue
            kk = k[ks:ke].to(ct).transpose(0, 1)
            vv = v[ks:ke].to(ct).transpose(0, 1)
            for r0, r1 in _row_blocks(qe - qs, ke - ks, hq, torch.finfo(ct).bits // 8):
                n_keys = r1 if causal else ke - ks
                rows = slice(qs + r0, qs + r1)
                qq = _heads_first(q[rows], hkv, ct)
                do = _heads_first(dout[rows], hkv, ct)
                oo = _heads_first(out[rows], hkv, ct)
                ll = _heads_first(lse[rows].unsqueeze(-1), hkv, ct)  # [Hkv, G, rows, 1]
                ll = ll.masked_fill(ll == NEG_INF, POS_INF)  # rows with no mass: P = 0
                s = _scores(qq, kk[:, :n_keys], scale, causal, r0)
                p = torch.exp(s - ll)  # [Hkv, G, rows, keys]
                k_blk, v_blk = kk[:, :n_keys].unsqueeze(1), vv[:, :n_keys].unsqueeze(1)
                d_row = (do * oo).sum(dim=-1, keepdim=True)
                dp = torch.matmul(do, v_blk.transpose(-1, -2))
                ds = p * (dp - d_row)
                dq[rows] = (torch.matmul(ds, k_blk) * scale).permute(2, 0, 1, 3).reshape(r1 - r0, hq, -1)
                dk_blk = torch.matmul(ds.transpose(-1, -2), qq).sum(dim=1) * scale  # [Hkv, keys, D]
                dv_blk = torch.matmul(p.transpose(-1, -2), do).sum(dim=1)
                dk[ks : ks + n_keys] += dk_blk.transpose(0, 1)
                dv[ks : ks + n_keys] += dv_blk.transpose(0, 1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
