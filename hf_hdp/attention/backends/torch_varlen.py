"""The ``"torch_varlen"`` backend: PyTorch's own varlen FlashAttention-2, CUDA only.

``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside PyTorch) for ``varlen`` and
``forward``, and the registered op ``torch.ops.torch_attn._varlen_attn_backward`` for ``backward``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._fused import FusedBackend, param_names


def _varlen_fn_kwargs(causal: bool, scale: float, gqa: bool, head_dim: int) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``varlen_attn`` and the keywords this release of it takes for causal, scale and GQA."""
    from torch.nn.attention import varlen as varlen_mod

    fn = varlen_mod.varlen_attn
    params = param_names(fn)
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


class TorchVarlenBackend(FusedBackend):
    """PyTorch's varlen FlashAttention-2 (``torch.nn.attention.varlen``).

    ``forward`` calls ``varlen_attn(..., return_aux=AuxRequest(lse=True))`` (causal as
    ``window_size=(-1, 0)`` or, on releases that predate it, ``is_causal=True``; GQA through
    ``enable_gqa=True`` where that flag exists, else natively through the kernel, as in torch 2.11,
    whose FlashAttention-2 takes unrepeated K/V and returns ``Hkv``-head gradients). ``backward`` calls
    the registered op ``torch.ops.torch_attn._varlen_attn_backward`` by keyword, with the arguments
    its schema names.
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

    def _kernel_varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        fn, kwargs = _varlen_fn_kwargs(causal, scale, q.shape[1] != k.shape[1], q.shape[-1])
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    def _kernel_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        from torch.nn.attention.varlen import AuxRequest

        fn, kwargs = _varlen_fn_kwargs(causal, scale, q.shape[1] != k.shape[1], q.shape[-1])
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True), **kwargs)

    def _kernel_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
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
            "is_causal": causal,
            "rng_state": torch.zeros(2, dtype=torch.uint64, device=q.device),
            "scale": scale,
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
        return dq, dk, dv
