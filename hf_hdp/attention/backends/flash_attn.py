"""The ``"flash_attn"`` backend: flash-attn 2 (the optional ``flash_attn`` package), CUDA only.

flash-attn ships only as a source package that compiles against CUDA: it is an optional extra,
imported on first use, so the CPU path never imports it (docs/design.md §4).

Layer features: sliding windows and ``positions`` run in the kernels as FlashAttention-2
``window_size=(left, right)`` (one call per group of sequences sharing one, see
:mod:`._fused`), spelled ``window_size`` or ``window_size_left``/``window_size_right`` as the release
takes it; a release with neither refuses windows and offset positions with a ``ValueError``.
``softcap`` is the kernels' own ``softcap`` (forward and backward, flash-attn >= 2.6); on a release
without it soft-capped calls are computed by the ``"reference"`` backend (with a warning).
"""

from __future__ import annotations

from typing import Any

import torch

from ._fused import CAUSAL_WINDOW, FULL_WINDOW, FusedBackend, Window, call_by_keyword, param_names

_FLASH_ATTN_PROBE: list[str | None] = []  # filled once: None, or why flash_attn does not import


def _flash_attn_import_problem() -> str | None:
    if not _FLASH_ATTN_PROBE:
        try:
            import flash_attn.flash_attn_interface  # noqa: F401

            _FLASH_ATTN_PROBE.append(None)
        except Exception as exc:  # noqa: BLE001 - a broken build is as unavailable as a missing one
            _FLASH_ATTN_PROBE.append(f"{type(exc).__name__}: {exc}")
    return _FLASH_ATTN_PROBE[0]


def _window(names: set[str], window_size: Window = FULL_WINDOW) -> dict[str, Any]:
    """``window_size=(left, right)`` spelled the way this flash-attn release takes it (nothing for a
    release that takes none: then only causal and full attention, through ``causal``, can be asked)."""
    left, right = window_size
    if "window_size_left" in names:
        return {"window_size_left": left, "window_size_right": right}
    if "window_size" in names:
        return {"window_size": (left, right)}
    if window_size not in (CAUSAL_WINDOW, FULL_WINDOW):
        raise ValueError(f"this flash-attn takes no window_size; cannot run window {window_size}")
    return {}


def _causal(window_size: Window) -> bool:
    """flash-attn's ``causal``: the window has no keys right of the diagonal (it then forces right = 0)."""
    return window_size[1] == 0


class FlashAttnBackend(FusedBackend):
    """flash-attn 2's varlen kernels.

    ``varlen`` is ``flash_attn_varlen_func``. ``forward``/``backward`` call
    ``flash_attn.flash_attn_interface._flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward``
    by keyword: their signatures changed across 2.x releases (``window_size`` tuple vs
    ``window_size_left``/``right``, ``softcap``, 8 or 4 return values), so the keywords each
    release accepts are read with :func:`inspect.signature`. Windows and ``softcap`` as in the module
    docstring.
    """

    name = "flash_attn"

    def __init__(self) -> None:
        super().__init__()
        self._iface: Any = None

    @staticmethod
    def import_problem() -> str | None:
        """``None`` if ``flash_attn`` imports, else why not. Only call this for CUDA devices."""
        return _flash_attn_import_problem()

    @classmethod
    def library_problem(cls) -> str | None:
        problem = cls.import_problem()
        if problem is None:
            return None
        return (
            f"flash_attn requested but the flash_attn package is not installed or does not import "
            f"({problem}): pip install 'hf-hdp[flash-attn]' on a CUDA machine, or use "
            f"attention_backend='auto'"
        )

    def _interface(self) -> Any:
        if self._iface is None:
            from flash_attn import flash_attn_interface  # lazy: never imported on the CPU path

            self._iface = flash_attn_interface
        return self._iface

    def _functions(self) -> tuple[Any, ...]:
        iface = self._interface()
        return iface.flash_attn_varlen_func, iface._flash_attn_varlen_forward, iface._flash_attn_varlen_backward

    def _has_softcap(self) -> bool:
        return all("softcap" in param_names(fn) for fn in self._functions())

    def _window_problem(self) -> str | None:
        for fn in self._functions():
            names = param_names(fn)
            if not ({"window_size", "window_size_left"} & names):
                return f"flash_attn's {getattr(fn, '__name__', fn)} takes no window_size (flash-attn < 2.3?)"
        return None

    def _kernel_varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        fn = self._interface().flash_attn_varlen_func
        names = param_names(fn)
        kwargs: dict[str, Any] = {"dropout_p": 0.0, "softmax_scale": scale, "causal": _causal(window_size)}
        if names:
            kwargs.update(_window(names, window_size))
            if "softcap" in names:
                kwargs["softcap"] = softcap
        elif window_size not in (CAUSAL_WINDOW, FULL_WINDOW) or softcap:
            kwargs.update(window_size=window_size, softcap=softcap)  # signature unknown: let it complain
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    def _kernel_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        fn = self._interface()._flash_attn_varlen_forward
        candidates = {
            "q": q,
            "k": k,
            "v": v,
            "cu_seqlens_q": cu_q,
            "cu_seqlens_k": cu_k,
            "max_seqlen_q": max_q,
            "max_seqlen_k": max_k,
            "dropout_p": 0.0,
            "softmax_scale": scale,
            "causal": _causal(window_size),
            "softcap": softcap,
            "alibi_slopes": None,
            "return_softmax": False,
            **_window(param_names(fn), window_size),
        }
        res = call_by_keyword(fn, "flash_attn _flash_attn_varlen_forward", candidates)
        # flash-attn >= 2.6: (out, lse, S_dmask, rng_state); older 2.x:
        # (out, q, k, v, out_padded, lse, S_dmask, rng_state)
        return (res[0], res[1]) if len(res) == 4 else (res[0], res[5])

    def _kernel_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        fn = self._interface()._flash_attn_varlen_backward
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        candidates = {
            "dout": dout,
            "q": q,
            "k": k,
            "v": v,
            "out": out,
            "softmax_lse": lse,
            "dq": dq,
            "dk": dk,
            "dv": dv,
            "cu_seqlens_q": cu_q,
            "cu_seqlens_k": cu_k,
            "max_seqlen_q": max_q,
            "max_seqlen_k": max_k,
            "dropout_p": 0.0,
            "softmax_scale": scale,
            "causal": _causal(window_size),
            "softcap": softcap,
            "alibi_slopes": None,
            "deterministic": False,
            "rng_state": None,
            **_window(param_names(fn), window_size),
        }
        call_by_keyword(fn, "flash_attn _flash_attn_varlen_backward", candidates)  # fills dq/dk/dv
        return dq, dk, dv
