"""The one attention-kernel interface of hf_hdp, with three backends (DESIGN.md section 5).

Every attention call in hf_hdp goes through an :class:`AttentionBackend`:

``varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> out``
    Autograd-enabled attention over whole packed sequences (the local, non-distributed part of a
    micro-batch).
``forward(...) -> (out, lse)``
    No autograd; called under ``torch.no_grad`` inside ring attention's autograd Function. Returns
    the output and the log-sum-exp of every query row, so that partial results over different key
    blocks can be merged with :func:`merge_attention`.
``backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``
    The gradient contribution of one key block. ``out`` and ``lse`` may be the *merged* (global)
    ones of the rows; the result is then this block's exact share of the full gradient, by the flash
    backward identity::

        P  = exp(S * scale - lse)          # S = q k^T of this block, lse the global one
        D  = rowsum(dout * out)            # out the global output
        dV = P^T dout      dP = dout V^T      dS = P * (dP - D)
        dQ = scale * dS K  dK = scale * dS^T Q

    Summed over the blocks of a ring, these contributions give the gradient of the full attention.

Conventions (all backends)
--------------------------
* Packed varlen layout: ``q`` is ``[Tq, Hq, D]``, ``k`` and ``v`` are ``[Tk, Hkv, D]`` with
  ``Hq % Hkv == 0``. K/V come in *unrepeated* (GQA); query head ``h`` uses K/V head
  ``h // (Hq // Hkv)``; ``dk``/``dv`` come back with ``Hkv`` heads.
* ``cu_q``, ``cu_k``: int32 ``[N + 1]`` cumulative lengths; query sequence ``i`` attends only to key
  sequence ``i``. ``max_q``/``max_k`` are the longest lengths (Python ints).
* ``lse`` is ``[Tq, Hq]`` float32 (float64 when the inputs are float64, which only the reference
  backend accepts: float64 tests need a float64 lse to stay tight). Each backend converts from and
  to its library's own layout.
* ``causal=True`` needs equal per-sequence query and key lengths (then top-left and bottom-right
  alignment agree); otherwise a ``ValueError`` is raised.
* Sequences of length 0 work: a query row with no keys gets ``out = 0``, ``lse = -inf`` and no
  gradient, and nothing is NaN.
* Output dtype = ``q.dtype``; gradients in the dtypes of ``q``/``k``/``v``.

Backends, in the order ``get_backend("auto", device)`` picks them
----------------------------------------------------------------
1. ``"flash_attn"``: flash-attn 2 (``flash_attn_varlen_func``; ``_flash_attn_varlen_forward`` /
   ``_flash_attn_varlen_backward`` for ring blocks). CUDA tensors only, and only if the optional
   ``flash_attn`` package imports. It is imported lazily: the CPU path never imports it.
2. ``"torch_varlen"``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside
   PyTorch) and the registered op ``torch.ops.torch_attn._varlen_attn_backward``. CUDA only.
3. ``"reference"``: pure PyTorch, explicit scores per sequence, any device and dtype (float64
   included). Slow; used for tests, the CPU demo and as ground truth in ``benchmarks/gpu_kernels.py``.

Both CUDA backends run fused flash kernels that need fp16 or bf16 inputs and a head dimension that is
a multiple of 8 (at most 256). They never change precision silently: other dtypes raise a
``ValueError`` telling the user to cast to bf16/fp16 or to use the ``"reference"`` backend. Their
``backward`` casts a merged float32 ``out`` to the input dtype before calling the kernel (the kernel
reads ``out`` only for ``D = rowsum(dout * out)``), as ring-flash-attention does.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = [
    "AttentionBackend",
    "BACKEND_NAMES",
    "FlashAttnBackend",
    "ReferenceBackend",
    "TorchVarlenBackend",
    "backend_unavailable_reason",
    "get_backend",
    "merge_attention",
]

log = logging.getLogger(__name__)

#: Valid explicit backend names, in the order ``"auto"`` tries them.
BACKEND_NAMES: tuple[str, ...] = ("flash_attn", "torch_varlen", "reference")

_NEG_INF = float("-inf")
_POS_INF = float("inf")


# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------


class AttentionBackend:
    """Base class of the attention backends; see the module docstring for the contract."""

    #: Registry name (``"flash_attn"``, ``"torch_varlen"`` or ``"reference"``).
    name: str = "base"

    def varlen(
        self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
        causal: bool, scale: float,
    ) -> Tensor:
        """Autograd-enabled attention of whole packed sequences; returns ``out`` ``[Tq, Hq, D]``."""
        raise NotImplementedError

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
        causal: bool, scale: float,
    ) -> tuple[Tensor, Tensor]:
        """Attention without autograd; returns ``(out [Tq, Hq, D], lse [Tq, Hq])``."""
        raise NotImplementedError

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
        cu_k: Tensor, max_q: int, max_k: int, causal: bool, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This key block's contribution ``(dq, dk, dv)`` given the (possibly merged) ``out``/``lse``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------
# helpers shared by the backends
# --------------------------------------------------------------------------------------------


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"packed varlen layout expected: q [Tq, Hq, D], k/v [Tk, Hkv, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same tokens and heads")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the query heads ({hq}) must be a multiple of the key/value heads ({hkv})")
    if cu_q.dim() != 1 or cu_k.dim() != 1 or cu_q.numel() != cu_k.numel() or cu_q.numel() < 1:
        raise ValueError(
            f"cu_q and cu_k must both be [N + 1] cumulative lengths; got {tuple(cu_q.shape)} and "
            f"{tuple(cu_k.shape)}"
        )


class _NoAttention(torch.autograd.Function):
    """Attention when there are no query rows or no keys at all: out 0, zero gradients.

    The fused kernels are not asked to handle ``Tq == 0`` or ``Tk == 0``; this keeps the autograd
    graph connected (q/k/v get zero gradients) without launching them.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _empty_forward(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.full((q.shape[0], q.shape[1]), _NEG_INF, dtype=_lse_dtype(q), device=q.device)
    return out, lse


def _empty_backward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _rows_without_keys(cu_q: Tensor, cu_k: Tensor, total_q: int) -> Tensor:
    """Bool ``[Tq]``: the query rows whose sequence has no keys (computed on device, no host sync)."""
    n_q = cu_q[1:] - cu_q[:-1]
    n_k = cu_k[1:] - cu_k[:-1]
    seq = torch.repeat_interleave(
        torch.arange(n_q.numel(), device=cu_q.device), n_q.long(), output_size=total_q
    )
    return n_k[seq] == 0


def _param_names(fn: Callable[..., Any]) -> set[str]:
    """Parameter names of ``fn``, seeing through ``torch.library.custom_op`` wrappers."""
    target = getattr(fn, "_init_fn", fn)  # CustomOpDef keeps the decorated function there
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()


def _required_params(fn: Callable[..., Any]) -> set[str]:
    target = getattr(fn, "_init_fn", fn)
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {
        p.name for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _call_by_keyword(fn: Callable[..., Any], what: str, candidates: dict[str, Any]) -> Any:
    """Call ``fn`` with those of ``candidates`` it accepts, by keyword.

    Library signatures changed across releases (flash-attn 2.x renamed ``window_size`` to
    ``window_size_left``/``right`` and added ``softcap``); unknown required parameters raise a clear
    error instead of a positional mix-up.
    """
    names = _param_names(fn)
    if not names:  # signature unknown: pass everything and let the library complain
        return fn(**candidates)
    missing = _required_params(fn) - set(candidates)
    if missing:
        raise RuntimeError(
            f"{what} has required parameters hf_hdp does not know: {sorted(missing)}; this version "
            f"of the library is not supported, use attention_backend='torch_varlen' or 'reference'"
        )
    return fn(**{key: val for key, val in candidates.items() if key in names})


# lse layouts a fused kernel may use: "ht" = [Hq, Tq] (FlashAttention-2 varlen), "th" = [Tq, Hq],
# "padded" = [N, Hq, max_q] (flash-attn before 2.4-ish, PyTorch on ROCm).
def _detect_lse_layout(lse: Tensor, total_q: int, heads: int) -> str:
    if lse.dim() == 3:
        return "padded"
    if lse.dim() == 2:
        if tuple(lse.shape) == (heads, total_q):
            return "ht"  # also taken when Hq == Tq: it is FlashAttention-2's native layout
        if tuple(lse.shape) == (total_q, heads):
            return "th"
    raise RuntimeError(
        f"unexpected log-sum-exp shape {tuple(lse.shape)} from the kernel for Tq={total_q}, Hq={heads}"
    )


def _padded_index(cu_q: Tensor, total_q: int) -> tuple[Tensor, Tensor]:
    n_q = (cu_q[1:] - cu_q[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(n_q.numel(), device=cu_q.device), n_q, output_size=total_q)
    pos = torch.arange(total_q, device=cu_q.device) - cu_q.long()[seq]
    return seq, pos


def _lse_from_kernel(lse: Tensor, layout: str, cu_q: Tensor, total_q: int) -> Tensor:
    """Kernel lse -> ours: ``[Tq, Hq]`` float32, ``-inf`` for rows without keys.

    FlashAttention-2 writes ``+inf`` for rows with no keys (so that its backward's
    ``exp(S - lse)`` is 0); our interface uses ``-inf`` (no mass), which merges correctly.
    """
    if layout == "ht":
        ours = lse.t().float().contiguous()
    elif layout == "th":
        ours = lse.float().contiguous()
    else:
        seq, pos = _padded_index(cu_q, total_q)
        ours = lse[seq, :, pos].float().contiguous()
    return ours.masked_fill_(ours == _POS_INF, _NEG_INF)


def _lse_to_kernel(lse: Tensor, layout: str, cu_q: Tensor, max_q: int) -> Tensor:
    """Ours -> the kernel's layout, ``-inf`` turned into ``+inf`` (so that ``exp(S - lse) = 0``)."""
    lse = lse.float()
    lse = lse.masked_fill(lse == _NEG_INF, _POS_INF)
    if layout == "ht":
        return lse.t().contiguous()
    if layout == "th":
        return lse.contiguous()
    total_q, heads = lse.shape
    seq, pos = _padded_index(cu_q, total_q)
    padded = torch.full((cu_q.numel() - 1, heads, max(max_q, 1)), _POS_INF, dtype=torch.float32, device=lse.device)
    padded[seq, :, pos] = lse
    return padded


def _check_fused_inputs(
    backend: str, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool
) -> None:
    _check_shapes(q, k, v, cu_q, cu_k)
    if not q.is_cuda:
        raise ValueError(
            f"the {backend!r} attention backend runs on CUDA tensors only, got {q.device}; use "
            f"attention_backend='auto' or 'reference'"
        )
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"the {backend!r} attention backend runs fused flash kernels that need float16 or bfloat16 "
            f"q/k/v of one dtype, got {q.dtype}/{k.dtype}/{v.dtype}; hf_hdp does not change precision "
            f"silently: load the model in bf16/fp16 (torch_dtype=torch.bfloat16), or use "
            f"attention_backend='reference' for float32/float64"
        )
    head_dim = q.shape[-1]
    if head_dim % 8 != 0 or head_dim > 256 or v.shape[-1] != head_dim:
        raise ValueError(
            f"the {backend!r} attention backend needs a head dimension that is a multiple of 8 and at "
            f"most 256 (same for q/k/v), got {head_dim} (v: {v.shape[-1]}); use attention_backend="
            f"'reference'"
        )
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"causal attention needs equal query and key lengths per sequence, but Tq={q.shape[0]} != "
            f"Tk={k.shape[0]}"
        )


def _as_int32(cu: Tensor) -> Tensor:
    return cu if cu.dtype == torch.int32 else cu.to(torch.int32)


def _last_dim_contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


# --------------------------------------------------------------------------------------------
# generic autograd wrapper: varlen from forward/backward
# --------------------------------------------------------------------------------------------


class _BlockAttentionFunction(torch.autograd.Function):
    """``varlen`` built from a backend's ``forward``/``backward`` (used by the reference backend)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
        causal: bool, scale: float, backend: AttentionBackend,
    ) -> Tensor:
        out, lse = backend.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, backend = ctx.args
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
        return dq, dk, dv, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# 3. reference backend
# --------------------------------------------------------------------------------------------

#: Upper bound on the bytes of one score block of the reference backend; longer sequences are
#: processed in blocks of query rows so the reference also runs at 32K+ tokens on a GPU.
REFERENCE_BLOCK_BYTES = 1 << 28


class ReferenceBackend(AttentionBackend):
    """Pure PyTorch attention with explicit scores, one sequence (and block of rows) at a time.

    Computes in float32 (float64 for float64 inputs) on any device. ``forward`` and ``backward``
    implement the formulas of the module docstring literally; ``varlen`` is the autograd Function
    built from them. Validates everything (causal length equality included), which costs a host
    sync on ``cu_q``/``cu_k``: this backend is for correctness, not speed.
    """

    name = "reference"

    # -- plumbing ----------------------------------------------------------------------------
    @staticmethod
    def _bounds(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool):
        _check_shapes(q, k, v, cu_q, cu_k)
        bq, bk = [int(x) for x in cu_q.tolist()], [int(x) for x in cu_k.tolist()]
        for name, b, total in (("cu_q", bq, q.shape[0]), ("cu_k", bk, k.shape[0])):
            if b[0] != 0 or b[-1] != total or any(b1 < b0 for b0, b1 in zip(b, b[1:])):
                raise ValueError(
                    f"{name} must start at 0, never decrease and end at the token count {total}; got {b}"
                )
        seqs = list(zip(zip(bq, bq[1:]), zip(bk, bk[1:])))
        if causal:
            bad = [i for i, ((qs, qe), (ks, ke)) in enumerate(seqs) if qe - qs != ke - ks]
            if bad:
                raise ValueError(
                    f"causal attention needs equal query and key lengths per sequence; sequences {bad} "
                    f"differ (q lengths {[b - a for a, b in zip(bq, bq[1:])]}, k lengths "
                    f"{[b - a for a, b in zip(bk, bk[1:])]})"
                )
        return seqs

    @staticmethod
    def _compute_dtype(q: Tensor) -> torch.dtype:
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    @staticmethod
    def _row_blocks(n_rows: int, n_keys: int, heads: int, itemsize: int):
        rows = max(1, REFERENCE_BLOCK_BYTES // max(1, heads * n_keys * itemsize))
        return [(r0, min(n_rows, r0 + rows)) for r0 in range(0, n_rows, rows)]

    @staticmethod
    def _heads_first(x: Tensor, hkv: int, ct: torch.dtype) -> Tensor:
        """``[L, Hq, D]`` -> ``[Hkv, G, L, D]`` (query head ``h`` = kv head ``h // G``, member ``h % G``)."""
        n, hq, d = x.shape
        return x.to(ct).reshape(n, hkv, hq // hkv, d).permute(1, 2, 0, 3)

    @staticmethod
    def _scores(qq: Tensor, kk: Tensor, scale: float, causal: bool, r0: int) -> Tensor:
        """Scaled scores ``[Hkv, G, rows, keys]`` with the causal mask applied (-inf)."""
        s = torch.matmul(qq, kk.transpose(-1, -2).unsqueeze(1)) * scale
        if causal:
            rows = torch.arange(r0, r0 + s.shape[-2], device=s.device)
            cols = torch.arange(s.shape[-1], device=s.device)
            s = s.masked_fill(cols[None, :] > rows[:, None], _NEG_INF)
        return s

    # -- the interface -----------------------------------------------------------------------
    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        return _BlockAttentionFunction.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, self)

    @torch.no_grad()
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        seqs = self._bounds(q, k, v, cu_q, cu_k, causal)
        ct = self._compute_dtype(q)
        hq, hkv = q.shape[1], k.shape[1]
        out = torch.zeros(q.shape[0], hq, v.shape[2], dtype=ct, device=q.device)
        lse = torch.full((q.shape[0], hq), _NEG_INF, dtype=_lse_dtype(q), device=q.device)
        for (qs, qe), (ks, ke) in seqs:
            if qe == qs or ke == ks:
                continue  # no rows, or rows without keys: out 0, lse -inf
            kk = k[ks:ke].to(ct).transpose(0, 1)  # [Hkv, Lk, D]
            vv = v[ks:ke].to(ct).transpose(0, 1)
            for r0, r1 in self._row_blocks(qe - qs, ke - ks, hq, torch.finfo(ct).bits // 8):
                n_keys = r1 if causal else ke - ks  # causal: row i sees keys 0..i
                qq = self._heads_first(q[qs + r0 : qs + r1], hkv, ct)
                s = self._scores(qq, kk[:, :n_keys], scale, causal, r0)
                m = s.amax(dim=-1, keepdim=True)  # finite: every row here has at least one key
                p = torch.exp(s - m)
                l = p.sum(dim=-1, keepdim=True)
                o = torch.matmul(p, vv[:, :n_keys].unsqueeze(1)) / l  # [Hkv, G, rows, D]
                out[qs + r0 : qs + r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, hq, -1)
                lse[qs + r0 : qs + r1] = (m + torch.log(l)).squeeze(-1).permute(2, 0, 1).reshape(r1 - r0, hq).to(lse.dtype)
        return out.to(q.dtype), lse

    @torch.no_grad()
    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        seqs = self._bounds(q, k, v, cu_q, cu_k, causal)
        ct = self._compute_dtype(q)
        hq, hkv = q.shape[1], k.shape[1]
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=k.device)
        dv = torch.zeros(v.shape, dtype=ct, device=v.device)
        for (qs, qe), (ks, ke) in seqs:
            if qe == qs or ke == ks:
                continue
            kk = k[ks:ke].to(ct).transpose(0, 1)
            vv = v[ks:ke].to(ct).transpose(0, 1)
            for r0, r1 in self._row_blocks(qe - qs, ke - ks, hq, torch.finfo(ct).bits // 8):
                n_keys = r1 if causal else ke - ks
                rows = slice(qs + r0, qs + r1)
                qq = self._heads_first(q[rows], hkv, ct)
                do = self._heads_first(dout[rows], hkv, ct)
                oo = self._heads_first(out[rows], hkv, ct)
                ll = self._heads_first(lse[rows].unsqueeze(-1), hkv, ct)  # [Hkv, G, rows, 1]
                ll = ll.masked_fill(ll == _NEG_INF, _POS_INF)  # rows with no mass: P = 0
                s = self._scores(qq, kk[:, :n_keys], scale, causal, r0)
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


# --------------------------------------------------------------------------------------------
# 2. torch_varlen backend
# --------------------------------------------------------------------------------------------


class TorchVarlenBackend(AttentionBackend):
    """PyTorch's own varlen FlashAttention-2 (``torch.nn.attention.varlen``), CUDA only.

    ``forward`` calls ``varlen_attn(..., return_aux=AuxRequest(lse=True))`` (causal as
    ``window_size=(-1, 0)`` or, on releases that predate it, ``is_causal=True``; GQA through
    ``enable_gqa=True`` where that flag exists, else natively through the kernel, as in torch 2.11,
    whose FlashAttention-2 takes unrepeated K/V and returns ``Hkv``-head gradients). ``backward`` calls
    the registered op ``torch.ops.torch_attn._varlen_attn_backward`` by keyword, with the arguments
    its schema names. The kernel's lse layout is detected on each forward and remembered for
    ``backward``.
    """

    name = "torch_varlen"

    def __init__(self) -> None:
        self._lse_layout = "ht"

    @staticmethod
    def api_problem() -> str | None:
        """``None`` if this torch has everything the backend needs, else what is missing."""
        try:
            from torch.nn.attention import varlen as varlen_mod
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            return f"torch {torch.__version__} has no torch.nn.attention.varlen ({exc})"
        fn = getattr(varlen_mod, "varlen_attn", None)
        if fn is None or not hasattr(varlen_mod, "AuxRequest"):
            return f"torch {torch.__version__}'s torch.nn.attention.varlen lacks varlen_attn/AuxRequest"
        params = _param_names(fn)
        if "return_aux" not in params:
            return (
                f"torch {torch.__version__}'s varlen_attn has no return_aux parameter, so it cannot "
                f"return the log-sum-exp that ring attention needs"
            )
        if "window_size" not in params and "is_causal" not in params:
            return f"torch {torch.__version__}'s varlen_attn takes neither window_size nor is_causal"
        try:
            torch.ops.torch_attn._varlen_attn_backward  # noqa: B018 - attribute lookup is the check
        except (AttributeError, RuntimeError) as exc:
            return f"torch {torch.__version__} has no op torch.ops.torch_attn._varlen_attn_backward ({exc})"
        return None

    @staticmethod
    def _fn_kwargs(causal: bool, scale: float, gqa: bool, head_dim: int) -> tuple[Callable[..., Any], dict[str, Any]]:
        from torch.nn.attention import varlen as varlen_mod

        fn = varlen_mod.varlen_attn
        params = _param_names(fn)
        kwargs: dict[str, Any] = {}
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if "scale" in params:
            kwargs["scale"] = scale
        elif not math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
            raise ValueError(
                f"torch {torch.__version__}'s varlen_attn takes no scale, and scale={scale} is not the "
                f"default head_dim**-0.5; upgrade PyTorch or use attention_backend='reference'"
            )
        if gqa and "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        return fn, kwargs

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        _check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _NoAttention.apply(q, k, v)
        q, k, v = _last_dim_contiguous(q, k, v)
        fn, kwargs = self._fn_kwargs(causal, scale, q.shape[1] != k.shape[1], q.shape[-1])
        out = fn(q, k, v, _as_int32(cu_q), _as_int32(cu_k), int(max_q), int(max_k), **kwargs)
        return out.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0])[:, None, None], 0.0)

    @torch.no_grad()
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        _check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _empty_forward(q, v)
        from torch.nn.attention.varlen import AuxRequest

        q, k, v = _last_dim_contiguous(q, k, v)
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        fn, kwargs = self._fn_kwargs(causal, scale, q.shape[1] != k.shape[1], q.shape[-1])
        out, lse = fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), return_aux=AuxRequest(lse=True), **kwargs)
        self._lse_layout = _detect_lse_layout(lse, q.shape[0], q.shape[1])
        lse = _lse_from_kernel(lse, self._lse_layout, cu_q, q.shape[0])
        empty = _rows_without_keys(cu_q, cu_k, q.shape[0])
        return out.masked_fill(empty[:, None, None], 0.0), lse

    @torch.no_grad()
    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        _check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _empty_backward(q, k, v)
        op = torch.ops.torch_attn._varlen_attn_backward
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        q, k, v = _last_dim_contiguous(q, k, v)
        candidates = {
            "grad_out": dout.to(q.dtype).contiguous(),
            "query": q,
            "key": k,
            "value": v,
            "out": out.to(q.dtype).contiguous(),
            "lse": _lse_to_kernel(lse, self._lse_layout, cu_q, int(max_q)),
            "cu_seq_q": cu_q,
            "cu_seq_k": cu_k,
            "max_q": int(max_q),
            "max_k": int(max_k),
            "is_causal": bool(causal),
            "rng_state": torch.zeros(2, dtype=torch.uint64, device=q.device),
            "scale": float(scale),
            "window_size": [-1, 0] if causal else [-1, -1],
        }
        schema = op.default._schema
        names = {a.name for a in schema.arguments}
        missing = {a.name for a in schema.arguments if not a.has_default_value()} - set(candidates)
        if missing:
            raise RuntimeError(
                f"torch {torch.__version__}'s torch_attn::_varlen_attn_backward needs arguments hf_hdp "
                f"does not know ({sorted(missing)}); use attention_backend='reference' or another torch"
            )
        dq, dk, dv = op(**{key: val for key, val in candidates.items() if key in names})
        dq = dq.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0])[:, None, None], 0.0)
        return dq, dk, dv


# --------------------------------------------------------------------------------------------
# 1. flash_attn backend
# --------------------------------------------------------------------------------------------


class FlashAttnBackend(AttentionBackend):
    """flash-attn 2 (the optional ``flash_attn`` package), CUDA only; imported on first use.

    ``varlen`` is ``flash_attn_varlen_func``. ``forward``/``backward`` call
    ``flash_attn.flash_attn_interface._flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward``
    by keyword: their signatures changed across 2.x releases (``window_size`` tuple vs
    ``window_size_left``/``right``, ``softcap``, 8 or 4 return values), so the keywords each
    release accepts are read with :func:`inspect.signature`.
    """

    name = "flash_attn"

    def __init__(self) -> None:
        self._lse_layout = "ht"
        self._iface: Any = None

    @staticmethod
    def import_problem() -> str | None:
        """``None`` if ``flash_attn`` imports, else why not. Only call this for CUDA devices."""
        return _flash_attn_import_problem()

    def _interface(self) -> Any:
        if self._iface is None:
            from flash_attn import flash_attn_interface  # lazy: never imported on the CPU path

            self._iface = flash_attn_interface
        return self._iface

    @staticmethod
    def _window(names: set[str]) -> dict[str, Any]:
        if "window_size_left" in names:
            return {"window_size_left": -1, "window_size_right": -1}
        if "window_size" in names:
            return {"window_size": (-1, -1)}
        return {}

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        _check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _NoAttention.apply(q, k, v)
        q, k, v = _last_dim_contiguous(q, k, v)
        out = self._interface().flash_attn_varlen_func(
            q, k, v, _as_int32(cu_q), _as_int32(cu_k), int(max_q), int(max_k),
            dropout_p=0.0, softmax_scale=float(scale), causal=bool(causal),
        )
        return out.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0])[:, None, None], 0.0)

    @torch.no_grad()
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        _check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _empty_forward(q, v)
        fn = self._interface()._flash_attn_varlen_forward
        q, k, v = _last_dim_contiguous(q, k, v)
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        candidates = {
            "q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
            "max_seqlen_q": int(max_q), "max_seqlen_k": int(max_k), "dropout_p": 0.0,
            "softmax_scale": float(scale), "causal": bool(causal), "softcap": 0.0,
            "alibi_slopes": None, "return_softmax": False,
            **self._window(_param_names(fn)),
        }
        res = _call_by_keyword(fn, "flash_attn _flash_attn_varlen_forward", candidates)
        # flash-attn >= 2.6: (out, lse, S_dmask, rng_state); older 2.x:
        # (out, q, k, v, out_padded, lse, S_dmask, rng_state)
        out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
        self._lse_layout = _detect_lse_layout(lse, q.shape[0], q.shape[1])
        lse = _lse_from_kernel(lse, self._lse_layout, cu_q, q.shape[0])
        empty = _rows_without_keys(cu_q, cu_k, q.shape[0])
        return out.masked_fill(empty[:, None, None], 0.0), lse

    @torch.no_grad()
    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        _check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _empty_backward(q, k, v)
        fn = self._interface()._flash_attn_varlen_backward
        q, k, v = _last_dim_contiguous(q, k, v)
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        candidates = {
            "dout": dout.to(q.dtype).contiguous(), "q": q, "k": k, "v": v,
            "out": out.to(q.dtype).contiguous(),
            "softmax_lse": _lse_to_kernel(lse, self._lse_layout, cu_q, int(max_q)),
            "dq": dq, "dk": dk, "dv": dv, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
            "max_seqlen_q": int(max_q), "max_seqlen_k": int(max_k), "dropout_p": 0.0,
            "softmax_scale": float(scale), "causal": bool(causal), "softcap": 0.0,
            "alibi_slopes": None, "deterministic": False, "rng_state": None,
            **self._window(_param_names(fn)),
        }
        _call_by_keyword(fn, "flash_attn _flash_attn_varlen_backward", candidates)  # fills dq/dk/dv
        dq.masked_fill_(_rows_without_keys(cu_q, cu_k, q.shape[0])[:, None, None], 0.0)
        return dq, dk, dv


_FLASH_ATTN_PROBE: list[str | None] = []


def _flash_attn_import_problem() -> str | None:
    if not _FLASH_ATTN_PROBE:
        try:
            import flash_attn.flash_attn_interface  # noqa: F401

            _FLASH_ATTN_PROBE.append(None)
        except Exception as exc:  # noqa: BLE001 - a broken build is as unavailable as a missing one
            _FLASH_ATTN_PROBE.append(f"{type(exc).__name__}: {exc}")
    return _FLASH_ATTN_PROBE[0]


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------

_INSTANCES: dict[str, AttentionBackend] = {}
_CLASSES: dict[str, type[AttentionBackend]] = {
    "flash_attn": FlashAttnBackend,
    "torch_varlen": TorchVarlenBackend,
    "reference": ReferenceBackend,
}


def _instance(name: str) -> AttentionBackend:
    if name not in _INSTANCES:
        _INSTANCES[name] = _CLASSES[name]()
    return _INSTANCES[name]


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def backend_unavailable_reason(name: str, device: Any = None) -> str | None:
    """``None`` if backend ``name`` can run on ``device``, else a message saying why not and what to do."""
    device = _resolve_device(device)
    if name == "reference":
        return None
    if name not in _CLASSES:
        raise ValueError(f"unknown attention backend {name!r}; valid names: 'auto', " + ", ".join(map(repr, BACKEND_NAMES)))
    if device.type != "cuda":
        return (
            f"{name} requested but the device is {device}: it runs fused kernels on CUDA tensors only; "
            f"use attention_backend='auto' (which picks 'reference' off CUDA) or 'reference'"
        )
    if not torch.cuda.is_available():
        return (
            f"{name} requested for {device} but CUDA is not available in this torch "
            f"({torch.__version__}); use attention_backend='auto' or 'reference'"
        )
    if name == "flash_attn":
        problem = _flash_attn_import_problem()
        if problem is not None:
            return (
                f"flash_attn requested but the flash_attn package is not installed or does not import "
                f"({problem}): pip install 'hf-hdp[flash-attn]' on a CUDA machine, or use "
                f"attention_backend='auto'"
            )
        return None
    problem = TorchVarlenBackend.api_problem()
    if problem is not None:
        return (
            f"torch_varlen requested but {problem}: it needs a PyTorch whose "
            f"torch.nn.attention.varlen.varlen_attn accepts return_aux=AuxRequest(lse=True) and has "
            f"the torch_attn::_varlen_attn_backward op (checked on CUDA with torch 2.11); upgrade "
            f"torch, install flash-attn (pip install 'hf-hdp[flash-attn]'), or use attention_backend='auto'"
        )
    return None


def get_backend(name: str = "auto", device: Any = None) -> AttentionBackend:
    """The attention backend called ``name`` for tensors on ``device`` (a cached singleton).

    ``"auto"`` picks the first of ``flash_attn``, ``torch_varlen``, ``reference`` that can run on
    ``device``. ``device=None`` means the current CUDA device if CUDA is available, else the CPU.
    An explicit name that cannot run raises ``ValueError`` saying why and what to do; an unknown
    name raises ``ValueError`` listing the valid ones.
    """
    if name == "auto":
        for candidate in BACKEND_NAMES:
            reason = backend_unavailable_reason(candidate, device)
            if reason is None:
                return _instance(candidate)
            log.debug("attention backend %s skipped: %s", candidate, reason)
        raise AssertionError("unreachable: the reference backend is always available")
    if name not in _CLASSES:
        raise ValueError(
            f"unknown attention backend {name!r}; valid names: 'auto', " + ", ".join(map(repr, BACKEND_NAMES))
        )
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(reason)
    return _instance(name)


# --------------------------------------------------------------------------------------------
# merging partial results
# --------------------------------------------------------------------------------------------


def merge_attention(
    out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor, *, inplace: bool = False
) -> tuple[Tensor, Tensor]:
    """Merge one block's partial attention into the running ``(out, lse)`` (DESIGN.md section 5).

    ``lse = log(exp(lse_a) + exp(lse_b))``; ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``.

    ``out``/``block_out`` are ``[T, H, D]``, ``lse``/``block_lse`` ``[T, H]``. The running ``out`` is a
    float32 (or float64) accumulator; ``block_out`` may be bf16/fp16. Rows where both sides have no
    mass (``lse = -inf``) stay ``out = 0``, ``lse = -inf``, without NaN. ``out=None`` starts a new
    accumulation from the block (copied, in float32 or float64). With ``inplace=True`` the result is
    written into ``out`` and ``lse`` (which must be floating accumulators) and they are returned.
    """
    if out is None or lse is None:
        acc = torch.float64 if block_out.dtype == torch.float64 else torch.float32
        lse_acc = torch.float64 if block_lse.dtype == torch.float64 else torch.float32
        return block_out.to(acc, copy=True), block_lse.to(lse_acc, copy=True)
    if out.shape[:2] != lse.shape or block_out.shape != out.shape or block_lse.shape != lse.shape:
        raise ValueError(
            f"merge_attention shapes disagree: out {tuple(out.shape)}, lse {tuple(lse.shape)}, "
            f"block_out {tuple(block_out.shape)}, block_lse {tuple(block_lse.shape)}"
        )
    acc = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
    lse_a, lse_b = lse.to(acc), block_lse.to(acc)
    new_lse = torch.logaddexp(lse_a, lse_b)
    ref = new_lse.masked_fill(new_lse == _NEG_INF, 0.0)  # -inf - -inf would be NaN
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    new_out = w_a * out.to(acc) + w_b * block_out.to(acc)
    if inplace:
        out.copy_(new_out)
        lse.copy_(new_lse)
        return out, lse
    return new_out, new_lse
