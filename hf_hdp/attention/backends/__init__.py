"""The attention backends of hf_hdp and how one is picked (docs/design.md §4).

Every backend keeps the contract of :class:`~hf_hdp.attention.backends.base.AttentionBackend`
(packed varlen layout, ``forward`` with log-sum-exp, ``backward`` from a merged out/lse, GQA,
empty sequences). In the order ``get_backend("auto", device, dtype)`` tries them:

1. ``"flash_attn"``: flash-attn 2 (``flash_attn_varlen_func``; ``_flash_attn_varlen_forward`` /
   ``_flash_attn_varlen_backward`` for ring blocks). CUDA tensors only, and only if the optional
   ``flash_attn`` package imports. It is imported lazily: the CPU path never imports it.
2. ``"torch_varlen"``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside
   PyTorch) and the registered op ``torch.ops.torch_attn._varlen_attn_backward``. CUDA only.
3. ``"cpu_flash"``: PyTorch's fused CPU flash-attention kernel, one sequence at a time. CPU only,
   float32/bfloat16/float16.
4. ``"reference"``: pure PyTorch, explicit scores per sequence, any device and dtype (float64
   included). Slow; used for tests, float64 on the CPU, and as ground truth in
   ``benchmarks/gpu_kernels.py``.

So ``"auto"`` picks flash_attn, then torch_varlen on CUDA (whatever the dtype: those refuse float32
at the first call, with the fix), and on the CPU cpu_flash for float32/bf16/fp16, reference for
float64.

Layer features (``window``, ``positions``, ``softcap``; :mod:`.base`): every backend takes them.
reference computes them literally. flash_attn runs windows/positions as FlashAttention-2
``window_size=(left, right)`` (one kernel call per group of sequences sharing one) and ``softcap`` in
the kernel. torch_varlen runs windows/positions the same way (refused with a ``ValueError`` by a torch
whose ``varlen_attn`` has no ``window_size``) and hands soft-capped calls to reference. cpu_flash runs
windowed and offset sequences over tiles of rows with banded explicit masks and hands soft-capped calls
to reference. The CUDA backends also hand reference the rare blocks their kernels cannot express (keys
after the last query row, or rows at the end that see no key), with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .base import AttentionBackend
from .cpu_flash import CpuFlashBackend
from .flash_attn import FlashAttnBackend
from .reference import ReferenceBackend
from .torch_varlen import TorchVarlenBackend

__all__ = [
    "AttentionBackend",
    "BACKEND_NAMES",
    "CpuFlashBackend",
    "FlashAttnBackend",
    "ReferenceBackend",
    "TorchVarlenBackend",
    "backend_unavailable_reason",
    "get_backend",
]

log = logging.getLogger(__name__)

_CLASSES: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (FlashAttnBackend, TorchVarlenBackend, CpuFlashBackend, ReferenceBackend)
}

#: Valid explicit backend names, in the order ``"auto"`` tries them.
BACKEND_NAMES: tuple[str, ...] = tuple(_CLASSES)

_INSTANCES: dict[str, AttentionBackend] = {}


def _instance(name: str) -> AttentionBackend:
    if name not in _INSTANCES:
        _INSTANCES[name] = _CLASSES[name]()
    return _INSTANCES[name]


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _check_name(name: str) -> None:
    if name not in _CLASSES:
        raise ValueError(
            f"unknown attention backend {name!r}; valid names: 'auto', " + ", ".join(map(repr, BACKEND_NAMES))
        )


def backend_unavailable_reason(name: str, device: Any = None, dtype: torch.dtype | None = None) -> str | None:
    """``None`` if backend ``name`` can run on ``device`` (for inputs of ``dtype``, when given), else a
    message saying why not and what to do. An unknown name raises ``ValueError``."""
    _check_name(name)
    return _CLASSES[name].unavailable_reason(_resolve_device(device), dtype)


def get_backend(name: str = "auto", device: Any = None, dtype: torch.dtype | None = None) -> AttentionBackend:
    """The attention backend called ``name`` for tensors of ``dtype`` on ``device`` (a cached singleton).

    ``"auto"`` picks the first of :data:`BACKEND_NAMES` that can run on ``device`` for ``dtype``
    (``None``: ``torch.get_default_dtype()``). ``device=None`` means the current CUDA device if CUDA
    is available, else the CPU. An explicit name that cannot run raises ``ValueError`` saying why and
    what to do; an unknown name raises ``ValueError`` listing the valid ones.
    """
    if name == "auto":
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        for candidate in BACKEND_NAMES:
            reason = backend_unavailable_reason(candidate, device, dtype)
            if reason is None:
                return _instance(candidate)
            log.debug("attention backend %s skipped: %s", candidate, reason)
        raise AssertionError("unreachable: the reference backend is always available")
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(reason)
    return _instance(name)
