"""What the two CUDA backends (``flash_attn``, ``torch_varlen``) share: :class:`FusedBackend`.

Both run FlashAttention-2 varlen kernels that need fp16 or bf16 inputs and a head dimension that is
a multiple of 8 (at most 256). They never change precision silently: other dtypes raise a
``ValueError`` telling the user to cast to bf16/fp16 or to use the ``"reference"`` backend.

:class:`FusedBackend` holds the calling convention once: it checks the inputs, answers sequences
without rows or keys itself, makes the last dimension contiguous and ``cu_*`` int32, converts the
log-sum-exp between the kernel's layout and the contract's ``[Tq, Hq]`` float32 (``+inf`` vs
``-inf`` for rows without keys), casts a merged float32 ``out`` to the input dtype for the backward
kernel and zeroes the rows without keys. A subclass only calls its library: ``_kernel_varlen``,
``_kernel_forward`` (returning the kernel's own lse) and ``_kernel_backward``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor

from .base import NEG_INF, POS_INF, AttentionBackend, NoAttention, check_shapes, empty_backward, empty_forward


def _signature_target(fn: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(fn, "_init_fn", fn)  # torch.library.custom_op keeps the decorated function there


def param_names(fn: Callable[..., Any]) -> set[str]:
    """Parameter names of ``fn``, seeing through ``torch.library.custom_op`` wrappers."""
    try:
        return set(inspect.signature(_signature_target(fn)).parameters)
    except (TypeError, ValueError):
        return set()


def _required_params(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(_signature_target(fn)).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {
        p.name for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def call_by_keyword(fn: Callable[..., Any], what: str, candidates: dict[str, Any]) -> Any:
    """Call ``fn`` with those of ``candidates`` it accepts, by keyword.

    Library signatures changed across releases (flash-attn 2.x renamed ``window_size`` to
    ``window_size_left``/``right`` and added ``softcap``); unknown required parameters raise a clear
    error instead of a positional mix-up.
    """
    names = param_names(fn)
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
    return ours.masked_fill_(ours == POS_INF, NEG_INF)


def _lse_to_kernel(lse: Tensor, layout: str, cu_q: Tensor, max_q: int) -> Tensor:
    """Ours -> the kernel's layout, ``-inf`` turned into ``+inf`` (so that ``exp(S - lse) = 0``)."""
    lse = lse.float()
    lse = lse.masked_fill(lse == NEG_INF, POS_INF)
    if layout == "ht":
        return lse.t().contiguous()
    if layout == "th":
        return lse.contiguous()
    total_q, heads = lse.shape
    seq, pos = _padded_index(cu_q, total_q)
    padded = torch.full((cu_q.numel() - 1, heads, max(max_q, 1)), POS_INF, dtype=torch.float32, device=lse.device)
    padded[seq, :, pos] = lse
    return padded


def _rows_without_keys(cu_q: Tensor, cu_k: Tensor, total_q: int) -> Tensor:
    """Bool ``[Tq, 1, 1]``: the query rows whose sequence has no keys (on device, no host sync)."""
    n_q = cu_q[1:] - cu_q[:-1]
    n_k = cu_k[1:] - cu_k[:-1]
    seq = torch.repeat_interleave(torch.arange(n_q.numel(), device=cu_q.device), n_q.long(), output_size=total_q)
    return (n_k[seq] == 0)[:, None, None]


def check_fused_inputs(
    backend: str, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool
) -> None:
    """Raise ``ValueError`` (with the fix) unless a fused CUDA kernel can take these inputs."""
    check_shapes(q, k, v, cu_q, cu_k)
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


class FusedBackend(AttentionBackend):
    """A FlashAttention-2 varlen kernel on CUDA; subclasses implement the three ``_kernel_*`` calls.

    The kernels' lse layout is detected on each ``forward`` and remembered for ``backward``.
    """

    def __init__(self) -> None:
        self._lse_layout = "ht"

    # -- availability ------------------------------------------------------------------------
    @classmethod
    def library_problem(cls) -> str | None:
        """``None`` if the library this backend calls is usable, else the whole message (with the fix)."""
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype | None) -> str | None:
        if device.type != "cuda":
            return (
                f"{cls.name} requested but the device is {device}: it runs fused kernels on CUDA tensors "
                f"only; use attention_backend='auto' (which picks 'cpu_flash' or 'reference' off CUDA) "
                f"or 'reference'"
            )
        if not torch.cuda.is_available():
            return (
                f"{cls.name} requested for {device} but CUDA is not available in this torch "
                f"({torch.__version__}); use attention_backend='auto' or 'reference'"
            )
        return cls.library_problem()

    # -- what a subclass implements ----------------------------------------------------------
    def _kernel_varlen(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float) -> Tensor:
        raise NotImplementedError

    def _kernel_forward(
        self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        """``(out, lse)`` with the kernel's own lse (any layout :func:`_detect_lse_layout` knows)."""
        raise NotImplementedError

    def _kernel_backward(
        self, dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(dq, dk, dv)``; ``dout``/``out`` are in the input dtype, ``lse`` in the kernel's layout."""
        raise NotImplementedError

    # -- the contract ------------------------------------------------------------------------
    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return NoAttention.apply(q, k, v)
        q, k, v = _last_dim_contiguous(q, k, v)
        out = self._kernel_varlen(
            q, k, v, _as_int32(cu_q), _as_int32(cu_k), int(max_q), int(max_k), bool(causal), float(scale)
        )
        return out.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0]), 0.0)

    @torch.no_grad()
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return empty_forward(q, v)
        q, k, v = _last_dim_contiguous(q, k, v)
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        out, lse = self._kernel_forward(q, k, v, cu_q, cu_k, int(max_q), int(max_k), bool(causal), float(scale))
        self._lse_layout = _detect_lse_layout(lse, q.shape[0], q.shape[1])
        lse = _lse_from_kernel(lse, self._lse_layout, cu_q, q.shape[0])
        return out.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0]), 0.0), lse

    @torch.no_grad()
    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return empty_backward(q, k, v)
        q, k, v = _last_dim_contiguous(q, k, v)
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        dq, dk, dv = self._kernel_backward(
            dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(),
            _lse_to_kernel(lse, self._lse_layout, cu_q, int(max_q)),
            cu_q, cu_k, int(max_q), int(max_k), bool(causal), float(scale),
        )
        return dq.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0]), 0.0), dk, dv
