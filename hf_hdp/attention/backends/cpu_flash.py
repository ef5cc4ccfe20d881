"""The ``"cpu_flash"`` backend: PyTorch's fused flash-attention kernel for the CPU.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` returns the output and the
log-sum-exp of one padded batch (``[B, H, L, D]``, lse ``[B, H, L]`` float32), and
``..._for_cpu_backward`` takes an ``out``/``lse`` pair back, which may be the merged ones of a ring
(its ``D = rowsum(dout * out)`` reads ``out``). This backend calls the pair once per packed sequence,
so it needs no padding: sequences without rows or keys are skipped (out 0, lse -inf, zero
gradients; the kernel itself must never see an empty sequence, it divides by zero).

K/V heads are repeated for the kernel (GQA) and dK/dV summed back over each group, so nothing
depends on the kernel's own GQA support. Accepts float32, bfloat16 and float16; float64 is refused
(use ``"reference"``): a merged float32 ``out`` is cast to the input dtype for the backward kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import NEG_INF, POS_INF, AttentionBackend, empty_backward, empty_forward, sequence_bounds

#: The input dtypes the CPU flash kernel runs.
CPU_FLASH_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def _op_problem() -> str | None:
    """``None`` if this torch has the CPU flash-attention ops, else what is missing."""
    try:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # noqa: B018 - the lookup is the check
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward  # noqa: B018
    except (AttributeError, RuntimeError) as exc:
        return f"torch {torch.__version__} has no CPU flash-attention op ({exc})"
    return None


def _dtype_problem(dtype: torch.dtype) -> str | None:
    if dtype in CPU_FLASH_DTYPES:
        return None
    return (
        f"the 'cpu_flash' attention backend runs PyTorch's CPU flash kernel in float32, bfloat16 or "
        f"float16, got {dtype}; use attention_backend='reference' for {dtype} (slow, exact)"
    )


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool):
    """The per-sequence bounds, after refusing what the kernel cannot take (with the fix)."""
    if any(t.device.type != "cpu" for t in (q, k, v)):
        raise ValueError(
            f"the 'cpu_flash' attention backend runs on CPU tensors only, got {q.device}; use "
            f"attention_backend='auto' (which picks flash_attn or torch_varlen on CUDA) or 'reference'"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the 'cpu_flash' attention backend needs q/k/v of one dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    problem = _dtype_problem(q.dtype)
    if problem is not None:
        raise ValueError(problem)
    if v.dim() == 3 and v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"the 'cpu_flash' attention backend needs one head dimension for q/k/v, got {q.shape[-1]} "
            f"and v {v.shape[-1]}; use attention_backend='reference'"
        )
    return sequence_bounds(q, k, v, cu_q, cu_k, causal)


def _kernel_layout(x: Tensor, start: int, end: int, repeat: int = 1) -> Tensor:
    """Rows ``start:end`` of packed ``[T, H, D]`` as the kernel's ``[1, H * repeat, L, D]`` (a view
    unless heads are repeated: query head ``h`` then sees K/V head ``h // repeat``)."""
    y = x[start:end].transpose(0, 1).unsqueeze(0)
    return y if repeat == 1 else y.repeat_interleave(repeat, dim=1)


def _packed_layout(y: Tensor, heads: int) -> Tensor:
    """The kernel's ``[1, Hq, L, D]`` back to packed ``[L, heads, D]``, summing each group of
    ``Hq // heads`` repeated heads (in float32)."""
    _, hq, n, d = y.shape
    if hq != heads:
        y = y.view(1, heads, hq // heads, n, d).sum(dim=2, dtype=torch.float32)
    return y[0].transpose(0, 1)


class CpuFlashBackend(AttentionBackend):
    """PyTorch's CPU flash-attention kernel, one packed sequence at a time."""

    name = "cpu_flash"

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype | None) -> str | None:
        if device.type != "cpu":
            return (
                f"cpu_flash requested but the device is {device}: it runs PyTorch's CPU flash-attention "
                f"kernel on CPU tensors only; use attention_backend='auto' (which picks flash_attn or "
                f"torch_varlen on CUDA), 'flash_attn', 'torch_varlen' or 'reference'"
            )
        problem = _op_problem()
        if problem is not None:
            return f"cpu_flash requested but {problem}; upgrade torch or use attention_backend='reference'"
        return None if dtype is None else _dtype_problem(dtype)

    @torch.no_grad()
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        seqs = _check_inputs(q, k, v, cu_q, cu_k, causal)
        groups = q.shape[1] // k.shape[1]
        out, lse = empty_forward(q, v)
        for (qs, qe), (ks, ke) in seqs:
            if qe == qs or ke == ks:
                continue  # no rows, or rows without keys: out 0, lse -inf
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _kernel_layout(q, qs, qe), _kernel_layout(k, ks, ke, groups), _kernel_layout(v, ks, ke, groups),
                0.0, bool(causal), scale=float(scale),
            )
            out[qs:qe] = _packed_layout(o, q.shape[1])
            lse[qs:qe] = l[0].transpose(0, 1)
        return out, lse

    @torch.no_grad()
    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        seqs = _check_inputs(q, k, v, cu_q, cu_k, causal)
        hkv = k.shape[1]
        groups = q.shape[1] // hkv
        dq, dk, dv = empty_backward(q, k, v)
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        lse = lse.float()
        lse = lse.masked_fill(lse == NEG_INF, POS_INF)  # rows with no mass: P = 0
        for (qs, qe), (ks, ke) in seqs:
            if qe == qs or ke == ks:
                continue  # no gradient
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _kernel_layout(dout, qs, qe), _kernel_layout(q, qs, qe),
                _kernel_layout(k, ks, ke, groups), _kernel_layout(v, ks, ke, groups),
                _kernel_layout(out, qs, qe), lse[qs:qe].t().unsqueeze(0),
                0.0, bool(causal), scale=float(scale),
            )
            dq[qs:qe] = _packed_layout(gq, q.shape[1])
            dk[ks:ke] = _packed_layout(gk, hkv)
            dv[ks:ke] = _packed_layout(gv, hkv)
        return dq, dk, dv
