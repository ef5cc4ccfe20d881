"""The ``"torch_varlen"`` backend: PyTorch's own varlen FlashAttention-2, CUDA only.

``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside PyTorch) for ``varlen`` and
``forward``, and the registered op ``torch.ops.torch_attn._varlen_attn_backward`` for ``backward``.

Layer features: sliding windows and ``positions`` run in the kernel as FlashAttention-2
``window_size=(left, right)`` (one call per group of sequences sharing one, see :mod:`._fused`),
through ``varlen_attn``'s ``window_size`` and the backward op's ``window_size``; a torch whose
``varlen_attn`` has no ``window_size`` refuses them with a ``ValueError``. ``varlen_attn`` has no
soft-capping: soft-capped calls are computed by the ``"reference"`` backend (explicit scores in
float32, exact but slow; logged once as a warning).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._fused import CAUSAL_WINDOW, FULL_WINDOW, FusedBackend, Window, param_names


def _varlen_fn_kwargs(
    window_size: Window,
    scale: float,
    gqa: bool,
    head_dim: int,
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``varlen_attn`` and the keywords this release of it takes for the window, scale and GQA."""
    from torch.nn.attention import varlen as varlen_mod

    fn = varlen_mod.varlen_attn
    params = param_names(fn)
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = tuple(window_size)  # varlen_attn reads (-1, 0) as is_causal
    elif window_size in (CAUSAL_WINDOW, FULL_WINDOW):
        kwargs["is_causal"] = window_size == CAUSAL_WINDOW
    else:
        raise ValueError(
            f"torch {torch.__version__}'s varlen_attn has no window_size parameter, so the 'torch_varlen' "
            f"attention backend cannot run a sliding window or offset positions (window {window_size}); "
            f"upgrade PyTorch, install flash-attn (attention_backend='flash_attn'), or use 'reference'"
        )
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


class TorchVarlenBackend(FusedBackend):
    """PyTorch's varlen FlashAttention-2 (``torch.nn.attention.varlen``).

    ``forward`` calls ``varlen_attn(..., return_aux=AuxRequest(lse=True))`` (causal as
    ``window_size=(-1, 0)`` or, on releases that predate it, ``is_causal=True``; GQA through
    ``enable_gqa=True`` where that flag exists, else natively through the kernel, as in torch 2.11,
    whose FlashAttention-2 takes unrepeated K/V and returns ``Hkv``-head gradients). ``backward`` calls
    the registered op ``torch.ops.torch_attn._varlen_attn_backward`` by keyword, with the arguments
    its schema names. Windows as in the module docstring; soft-capped calls go to the ``"reference"``
    backend.
    """

    name = "torch_varlen"

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
        params = param_names(fn)
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

    @classmethod
    def library_problem(cls) -> str | None:
        problem = cls.api_problem()
        if problem is None:
            return None
        return (
            f"torch_varlen requested but {problem}: it needs a PyTorch whose "
            f"torch.nn.attention.varlen.varlen_attn accepts return_aux=AuxRequest(lse=True) and has "
            f"the torch_attn::_varlen_attn_backward op (checked on CUDA with torch 2.11); upgrade "
            f"torch, install flash-attn (pip install 'hf-hdp[flash-attn]'), or use attention_backend='auto'"
        )

    def _has_softcap(self) -> bool:
        return False  # varlen_attn has no score transform: soft-capped calls go to the reference backend

    def _window_problem(self) -> str | None:
        from torch.nn.attention import varlen as varlen_mod

        if "window_size" not in param_names(varlen_mod.varlen_attn):
            return f"torch {torch.__version__}'s varlen_attn has no window_size parameter"
        return None

    def _kernel_varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        fn, kwargs = _varlen_fn_kwargs(window_size, scale, q.shape[1] != k.shape[1], q.shape[-1])
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    def _kernel_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        from torch.nn.attention.varlen import AuxRequest

        fn, kwargs = _varlen_fn_kwargs(window_size, scale, q.shape[1] != k.shape[1], q.shape[-1])
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True), **kwargs)

    def _kernel_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        op = torch.ops.torch_attn._varlen_attn_backward
        candidates = {
            "grad_out": dout,
            "query": q,
            "key": k,
            "value": v,
            "out": out,
            "lse": lse,
            "cu_seq_q": cu_q,
            "cu_seq_k": cu_k,
            "max_q": max_q,
            "max_k": max_k,
            "is_causal": tuple(window_size) == CAUSAL_WINDOW,  # as varlen_attn derives it for the forward
            "rng_state": torch.zeros(2, dtype=torch.uint64, device=q.device),
            "scale": scale,
            "window_size": list(window_size),
        }
        schema = op.default._schema
        names = {a.name for a in schema.arguments}
        missing = {a.name for a in schema.arguments if not a.has_default_value()} - set(candidates)
        if missing:
            raise RuntimeError(
                f"torch {torch.__version__}'s torch_attn::_varlen_attn_backward needs arguments hf_hdp "
                f"does not know ({sorted(missing)}); use attention_backend='reference' or another torch"
            )
        if "window_size" not in names and tuple(window_size) not in (CAUSAL_WINDOW, FULL_WINDOW):
            raise ValueError(
                f"torch {torch.__version__}'s torch_attn::_varlen_attn_backward takes no window_size; the "
                f"'torch_varlen' attention backend cannot run window {tuple(window_size)}: upgrade PyTorch or use "
                f"attention_backend='flash_attn' or 'reference'"
            )
        dq, dk, dv = op(**{key: val for key, val in candidates.items() if key in names})
        return dq, dk, dv
