"""The CUDA packages' varlen kernels for the state-carrying layers, where installed (optional extras, like flash-attn).

On CUDA, whole samples (a micro-batch's local region, and a head-parallel segment's documents after the
all-to-all) run the packages' fused kernels, which keep packed samples apart with ``cu_seqlens`` / ``seq_idx``:

- ``causal_conv1d.causal_conv1d_fn(x [B, C, T], weight [C, K], bias, seq_idx [B, T], activation)``;
- ``fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale, cu_seqlens=...)`` (flash-linear-attention;
  ``[1, T, H, D]`` tensors, ``cu_seqlens`` of the samples);
- ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, seq_idx=...)``.

A split sample's scan pieces keep HDP's own chunked kernels (:mod:`.delta_rule`): the state scan needs each piece's
transition, which the packages do not return. On CPU, or without the packages, HDP's own kernels run everywhere.
Nothing here imports a package at module import: the CPU path never touches them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusedKernels:
    conv: Callable | None  # causal_conv1d_fn
    delta: Callable | None  # fla chunk_gated_delta_rule
    ssd: Callable | None  # mamba_chunk_scan_combined


_CACHE: dict[str, FusedKernels] = {}


def _load(module: str, name: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - not installed, or built for another CUDA/torch: HDP's own kernels run
        return None


def fused_kernels(device: torch.device) -> FusedKernels | None:
    """The packages' kernels usable on ``device`` (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    if "cuda" not in _CACHE:
        _CACHE["cuda"] = FusedKernels(
            conv=_load("causal_conv1d", "causal_conv1d_fn"),
            delta=_load("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
            ssd=_load("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
        )
    return _CACHE["cuda"]


def sample_index(lengths, device) -> torch.Tensor:
    """``seq_idx`` ``[1, T]`` (int32): each row's sample number."""
    counts = torch.tensor(list(lengths), device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), counts)[None]


def cu_seqlens(lengths, device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.long, device=device)
    out[1:] = torch.tensor(list(lengths), device=device).cumsum(0)
    return out


def conv_docs(kernels: FusedKernels, x, lengths, weight, bias, activation):
    """``causal_conv1d_fn`` over consecutive samples (``x``: ``[T, C]``; the package wants channels last in memory
    when ``seq_idx`` is given, which ``x.T`` of a row-major ``x`` is)."""
    out = kernels.conv(x.T[None], weight, bias, seq_idx=sample_index(lengths, x.device), activation=activation)
    return out[0].T


def delta_docs(kernels: FusedKernels, q, k, v, g, beta, lengths):
    """flash-linear-attention's chunked gated delta rule over consecutive samples; inputs as HDP's (heads first,
    ``q`` normalised and scaled, ``k`` normalised, query/key heads already repeated to the value heads)."""
    out, _ = kernels.delta(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        g.transpose(0, 1)[None],
        beta.transpose(0, 1)[None],
        scale=1.0,
        cu_seqlens=cu_seqlens(lengths, q.device),
        use_qk_l2norm_in_kernel=False,
    )
    return out[0]  # [T, H, dv]


def ssd_docs(kernels: FusedKernels, x, dt, rate, b, c, lengths, skip, chunk: int = 64):
    """mamba-ssm's state space dual scan over consecutive samples: ``x`` ``[T, H, P]``, ``dt`` ``[T, H]`` (already
    ``clamp(softplus(dt + dt_bias))``), ``rate`` ``A`` ``[H]``, ``b``/``c`` ``[T, G, N]``, ``skip`` ``D``."""
    out = kernels.ssd(x[None], dt[None], rate, b[None], c[None], chunk, D=skip, seq_idx=sample_index(lengths, x.device))
    return out[0]
