"""What the two CUDA backends (``flash_attn``, ``torch_varlen``) share: :class:`FusedBackend`.

Both run FlashAttention-2 varlen kernels that need fp16 or bf16 inputs and a head dimension that is
a multiple of 8 (at most 256), one for q, k and v: multi-head latent attention's wider q/k heads (192 beside
v's 128 in DeepSeek-V3) run with v zero-padded to the q/k size, and the padded output columns and their
gradients dropped (exact; only the kernel call is padded, never the messages between ranks). They never change precision silently: other dtypes raise a
``ValueError`` telling the user to cast to bf16/fp16 or to use the ``"reference"`` backend.

:class:`FusedBackend` holds the calling convention once: it checks the inputs, answers sequences
without rows or keys itself, makes the last dimension contiguous and ``cu_*`` int32, converts the
log-sum-exp between the kernel's layout and the contract's ``[Tq, Hq]`` float32 (``+inf`` vs
``-inf`` for rows without keys), casts a merged float32 ``out`` to the input dtype for the backward
kernel and zeroes the rows without keys. A subclass only calls its library: ``_kernel_varlen``,
``_kernel_forward`` (returning the kernel's own lse) and ``_kernel_backward``, each given the
FlashAttention-2 ``window_size=(left, right)`` and ``softcap`` of the call.

Layer features (the contract's ``window``, ``positions``, ``softcap``)
----------------------------------------------------------------------
FlashAttention-2 aligns every sequence bottom-right: query ``i`` (0-based in its sequence of ``nq``
rows and ``nk`` keys) attends keys ``j`` in ``[i + nk - nq - left, i + nk - nq + right]``, ``-1``
meaning unbounded; ``causal`` is ``(-1, 0)``. A sequence with positions ``(q0, k0)`` and our window
``w`` is exactly ``right = (q0 + nq) - (k0 + nk)``, ``left = w - 1 - right`` (``-1`` without a
window); :func:`flash_window` computes that per sequence, normalised so that the kernels' own
rewriting (a ``left``/``right`` of at least ``max_seqlen_k`` is read as unbounded) never changes the
mask: a ``left`` that reaches before every row's first key becomes ``-1``, a sequence whose rows all
see all keys becomes ``(-1, -1)``, and the call's ``max_seqlen_k`` is raised above its ``right``
(``max_seqlen_k`` is only an upper bound of the key lengths for the kernels). Sequences the kernel
cannot express are those with keys after the last query row (``right < 0``) or, with a window,
query rows at the end that see no key (``left < 0``); :func:`~hf_hdp.planning.reach.visible_pairs`
never builds them, and a call holding one is computed by the ``"reference"`` backend (exact, slow,
with a warning), as is a soft-capped call on a library without ``softcap``.

One kernel call takes one ``(left, right)``: :func:`window_groups` groups the sequences by it and
each group runs as one call over its rows and keys (gathered with ``index_select``, results scattered
back; dK/dV with ``index_copy``, each key row belonging to one sequence). One group holding every
sequence (a local batch under a window: ``(w - 1, 0)``; non-causal: ``(-1, -1)``) runs on the packed
tensors as they are. Without ``positions`` nothing is read on the host: local sequences take one call
with ``(w - 1, 0)`` or, without features, exactly the call they always took.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import (
    NEG_INF,
    POS_INF,
    AttentionBackend,
    NoAttention,
    check_features,
    check_shapes,
    empty_backward,
    empty_forward,
    pad_head,
    pad_head_dims,
    sequence_bounds,
)

log = logging.getLogger(__name__)

#: A FlashAttention-2 ``window_size``: ``(left, right)``, ``-1`` unbounded.
Window = tuple[int, int]
FULL_WINDOW: Window = (-1, -1)
CAUSAL_WINDOW: Window = (-1, 0)


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
        p.name
        for p in params
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
    raise RuntimeError(f"unexpected log-sum-exp shape {tuple(lse.shape)} from the kernel for Tq={total_q}, Hq={heads}")


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
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    causal: bool,
    positions=None,
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
    head_dim = max(q.shape[-1], v.shape[-1])  # q/k and v of different sizes run zero-padded to the larger
    if head_dim % 8 != 0 or head_dim > 256:
        raise ValueError(
            f"the {backend!r} attention backend needs a head dimension that is a multiple of 8 and at "
            f"most 256, got {q.shape[-1]} for q/k and {v.shape[-1]} for v; use attention_backend='reference'"
        )
    if causal and positions is None and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"causal attention needs equal query and key lengths per sequence, but Tq={q.shape[0]} != Tk={k.shape[0]}"
        )


def _as_int32(cu: Tensor) -> Tensor:
    return cu if cu.dtype == torch.int32 else cu.to(torch.int32)


def _last_dim_contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


# -- windows: the pure arithmetic -------------------------------------------------------------


def flash_window(q0: int, k0: int, nq: int, nk: int, causal: bool, window: int | None) -> Window | None:
    """FlashAttention-2's ``window_size=(left, right)`` for one sequence of ``nq`` query rows at positions
    ``q0 ...`` and ``nk`` keys at ``k0 ...`` under the contract's ``causal``/``window``, or ``None`` if no
    ``(left, right)`` gives exactly its mask (keys after the last row, or rows at the end that see no
    key under the window). ``nq`` and ``nk`` must be positive.

    Normalised so that the kernels' own rewriting cannot change the mask: a ``left`` of ``nk`` or more
    (every row reaches back past the first key) becomes ``-1``; rows that all see all keys give
    ``(-1, -1)``. A ``right`` of ``nk`` or more stays: the call's ``max_seqlen_k`` must then exceed it
    (:func:`call_max_k`).
    """
    if not causal:
        return FULL_WINDOW  # positions do not matter; a window needs causal (check_features)
    d = q0 - k0  # row i sees keys j <= i + d (and j > i + d - window)
    last_row_reaches_first_key = window is None or (nq - 1) + d - window + 1 <= 0
    if d >= nk - 1 and last_row_reaches_first_key:
        return FULL_WINDOW  # every row sees every key
    right = (q0 + nq) - (k0 + nk)
    if right < 0:
        return None  # keys after the last row's position: no right bound below the bottom-right diagonal
    if window is None:
        return (-1, right)
    left = window - 1 - right
    if left < 0:
        return None  # the last rows see no key: left = -1 would read as unbounded
    if left >= nk:
        left = -1  # every row's window reaches before the first key (the kernels read it so too)
    return (left, right)


def call_max_k(max_k: int, window_size: Window) -> int:
    """The ``max_seqlen_k`` to pass a kernel for sequences whose longest key length is ``max_k``: above
    ``right`` (FlashAttention-2 reads a bound of at least ``max_seqlen_k`` as unbounded)."""
    right = window_size[1]
    return max(max_k, right + 1) if right >= 0 and window_size != CAUSAL_WINDOW else max_k


def window_groups(
    lengths: list[tuple[int, int]],
    positions,
    causal: bool,
    window: int | None,
) -> dict[Window, list[int]] | None:
    """The sequences (indices) grouped by their :func:`flash_window`, in order of first appearance, or
    ``None`` if some sequence has none. ``lengths`` are ``(nq, nk)`` per sequence; ``positions`` ``None``
    or ``(q0, k0)`` per sequence. Sequences without rows or keys join the first group (the kernels and
    :func:`_rows_without_keys` answer them), or ``(-1, -1)`` when there is none."""
    groups: dict[Window, list[int]] = {}
    empty: list[int] = []
    for i, (nq, nk) in enumerate(lengths):
        if nq == 0 or nk == 0:
            empty.append(i)
            continue
        q0, k0 = positions[i] if positions is not None else (0, 0)
        ws = flash_window(q0, k0, nq, nk, causal, window)
        if ws is None:
            return None
        groups.setdefault(ws, []).append(i)
    if empty:
        first = next(iter(groups), FULL_WINDOW)
        groups[first] = sorted(groups.get(first, []) + empty)
    return groups


class _Group:
    """One kernel call of a grouped (featured) call: its window, the rows and keys it reads (``None``:
    all, in place) and their ``cu_*``/``max_*``."""

    def __init__(self, window_size: Window, seqs, members: list[int], device: torch.device, whole: bool) -> None:
        self.window_size = window_size
        nq = [seqs[i][0][1] - seqs[i][0][0] for i in members]
        nk = [seqs[i][1][1] - seqs[i][1][0] for i in members]
        self.max_q = max(nq, default=0)
        self.max_k = call_max_k(max(nk, default=0), window_size)
        if whole:
            self.rows = self.keys = None
            self.cu_q = self.cu_k = None  # the call's own
            return

        def index(bounds) -> Tensor:
            return torch.tensor([r for a, b in bounds for r in range(a, b)], dtype=torch.long, device=device)

        def cumulative(lengths: list[int]) -> Tensor:
            return torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32, device=device)

        self.rows = index([seqs[i][0] for i in members])
        self.keys = index([seqs[i][1] for i in members])
        self.cu_q, self.cu_k = cumulative(nq), cumulative(nk)


class FusedBackend(AttentionBackend):
    """A FlashAttention-2 varlen kernel on CUDA; subclasses implement the three ``_kernel_*`` calls.

    The kernels' lse layout is detected on each ``forward`` and remembered for ``backward``.
    """

    def __init__(self) -> None:
        self._lse_layout = "ht"
        self._warned_reference = False

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
    def _has_softcap(self) -> bool:
        """Whether this library's kernels take ``softcap`` (else soft-capped calls go to the reference)."""
        return False

    def _window_problem(self) -> str | None:
        """``None`` if this library's kernels take a ``window_size`` other than causal/full, else why not."""
        return None

    def _kernel_varlen(
        self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, window_size: Window, softcap: float
    ) -> Tensor:
        raise NotImplementedError

    def _kernel_forward(
        self,
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q: int,
        max_k: int,
        scale: float,
        window_size: Window,
        softcap: float,
    ) -> tuple[Tensor, Tensor]:
        """``(out, lse)`` with the kernel's own lse (any layout :func:`_detect_lse_layout` knows).
        ``window_size`` is ``(left, right)`` (``(-1, 0)`` causal, ``(-1, -1)`` full); ``softcap`` 0.0 is off."""
        raise NotImplementedError

    def _kernel_backward(
        self,
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        max_q: int,
        max_k: int,
        scale: float,
        window_size: Window,
        softcap: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(dq, dk, dv)``; ``dout``/``out`` are in the input dtype, ``lse`` in the kernel's layout."""
        raise NotImplementedError

    # -- routing -------------------------------------------------------------------------------
    def _reference(self, why: str):
        from .reference import ReferenceBackend  # the ground truth, for what the kernels cannot express

        if not self._warned_reference:
            log.warning(
                "attention backend %s: %s; computing such calls with the 'reference' backend (slow)", self.name, why
            )
            self._warned_reference = True
        return ReferenceBackend()

    def _require_window(self, window_size: Window) -> None:
        if window_size in (CAUSAL_WINDOW, FULL_WINDOW):
            return
        problem = self._window_problem()
        if problem is not None:
            raise ValueError(
                f"the {self.name!r} attention backend cannot run a sliding window or offset positions: {problem}; "
                f"upgrade it, or use attention_backend='flash_attn' or 'reference'"
            )

    def _route(self, q, k, v, cu_q, cu_k, causal, window, softcap, positions):
        """How a call runs: ``("reference", backend)``; ``("single", window_size)``: one kernel call on the
        packed tensors, no host sync; or ``("groups", [_Group, ...])``."""
        check_features(window, softcap, positions, causal)
        check_fused_inputs(self.name, q, k, v, cu_q, cu_k, causal, positions)
        if softcap is not None and not self._has_softcap():
            return "reference", self._reference("this library's kernels take no softcap")
        if positions is None:
            ws = ((window - 1) if window is not None else -1, 0) if causal else FULL_WINDOW
            self._require_window(ws)
            return "single", ws
        seqs = sequence_bounds(q, k, v, cu_q, cu_k, causal, positions)
        groups = window_groups([(qe - qs, ke - ks) for (qs, qe), (ks, ke) in seqs], positions, causal, window)
        if groups is None:
            return "reference", self._reference(
                "a sequence's positions give no FlashAttention window (keys after its last row, or rows that "
                "see no key)"
            )
        for ws in groups:
            self._require_window(ws)
        whole = len(groups) == 1
        return "groups", [_Group(ws, seqs, members, q.device, whole) for ws, members in groups.items()]

    # -- the contract ------------------------------------------------------------------------
    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, *, window=None, softcap=None, positions=None):
        how, what = self._route(q, k, v, cu_q, cu_k, causal, window, softcap, positions)
        if how == "reference":
            return what.varlen(
                q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window=window, softcap=softcap, positions=positions
            )
        if how == "groups":  # the autograd Function of forward/backward, which run the groups
            return super().varlen(
                q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window=window, softcap=softcap, positions=positions
            )
        if q.shape[0] == 0 or k.shape[0] == 0:
            return NoAttention.apply(q, k, v)
        if v.shape[-1] != q.shape[-1]:  # padded head sizes: the autograd Function of forward/backward, which pad
            return super().varlen(
                q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window=window, softcap=softcap, positions=positions
            )
        q, k, v = _last_dim_contiguous(q, k, v)
        out = self._kernel_varlen(
            q,
            k,
            v,
            _as_int32(cu_q),
            _as_int32(cu_k),
            int(max_q),
            call_max_k(int(max_k), what),
            float(scale),
            what,
            float(softcap or 0.0),
        )
        return out.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0]), 0.0)

    def _forward_call(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        """One kernel call: ``(out, lse)`` in our layout, rows without keys zeroed. Different q/k and v head
        sizes run zero-padded to the larger (FlashAttention-2 takes one head size), the padded columns dropped."""
        v_dim = v.shape[-1]
        if v_dim != q.shape[-1]:
            _, (q, k, v) = pad_head_dims(q, k, v)
        out, lse = self._kernel_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap)
        out = out[..., :v_dim]
        self._lse_layout = _detect_lse_layout(lse, q.shape[0], q.shape[1])
        lse = _lse_from_kernel(lse, self._lse_layout, cu_q, q.shape[0])
        return out.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0]), 0.0), lse

    @torch.no_grad()
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, *, window=None, softcap=None, positions=None):
        how, what = self._route(q, k, v, cu_q, cu_k, causal, window, softcap, positions)
        if how == "reference":
            return what.forward(
                q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window=window, softcap=softcap, positions=positions
            )
        if q.shape[0] == 0 or k.shape[0] == 0:
            return empty_forward(q, v)
        q, k, v = _last_dim_contiguous(q, k, v)
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        cap = float(softcap or 0.0)
        if how == "single":
            return self._forward_call(
                q, k, v, cu_q, cu_k, int(max_q), call_max_k(int(max_k), what), float(scale), what, cap
            )
        out, lse = empty_forward(q, v)
        for g in what:
            if g.rows is not None and (g.rows.numel() == 0 or g.keys.numel() == 0):
                continue  # only sequences without rows or keys: out 0, lse -inf
            if g.rows is None:  # one group holds every sequence: the packed tensors as they are
                return self._forward_call(q, k, v, cu_q, cu_k, g.max_q, g.max_k, float(scale), g.window_size, cap)
            o, l = self._forward_call(
                q.index_select(0, g.rows),
                k.index_select(0, g.keys),
                v.index_select(0, g.keys),
                g.cu_q,
                g.cu_k,
                g.max_q,
                g.max_k,
                float(scale),
                g.window_size,
                cap,
            )
            out.index_copy_(0, g.rows, o.to(out.dtype))
            lse.index_copy_(0, g.rows, l.to(lse.dtype))
        return out, lse

    def _backward_call(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        qk_dim, v_dim = q.shape[-1], v.shape[-1]
        if v_dim != qk_dim:  # as _forward_call: zero-padded, the padding's gradients dropped
            dim, (q, k, v) = pad_head_dims(q, k, v)
            dout, out = pad_head(dout, dim), pad_head(out, dim)
        dq, dk, dv = self._kernel_backward(
            dout.to(q.dtype).contiguous(),
            q,
            k,
            v,
            out.to(q.dtype).contiguous(),
            _lse_to_kernel(lse, self._lse_layout, cu_q, max_q),
            cu_q,
            cu_k,
            max_q,
            max_k,
            scale,
            window_size,
            softcap,
        )
        dq, dk, dv = dq[..., :qk_dim], dk[..., :qk_dim], dv[..., :v_dim]
        return dq.masked_fill(_rows_without_keys(cu_q, cu_k, q.shape[0]), 0.0), dk, dv

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
        how, what = self._route(q, k, v, cu_q, cu_k, causal, window, softcap, positions)
        if how == "reference":
            return what.backward(
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
                window=window,
                softcap=softcap,
                positions=positions,
            )
        if q.shape[0] == 0 or k.shape[0] == 0:
            return empty_backward(q, k, v)
        q, k, v = _last_dim_contiguous(q, k, v)
        cu_q, cu_k = _as_int32(cu_q), _as_int32(cu_k)
        cap = float(softcap or 0.0)
        if how == "single":
            return self._backward_call(
                dout, q, k, v, out, lse, cu_q, cu_k, int(max_q), call_max_k(int(max_k), what), float(scale), what, cap
            )
        dq, dk, dv = empty_backward(q, k, v)
        for g in what:
            if g.rows is not None and (g.rows.numel() == 0 or g.keys.numel() == 0):
                continue  # no gradient
            if g.rows is None:
                return self._backward_call(
                    dout, q, k, v, out, lse, cu_q, cu_k, g.max_q, g.max_k, float(scale), g.window_size, cap
                )
            gq, gk, gv = self._backward_call(
                dout.index_select(0, g.rows),
                q.index_select(0, g.rows),
                k.index_select(0, g.keys),
                v.index_select(0, g.keys),
                out.index_select(0, g.rows),
                lse.index_select(0, g.rows),
                g.cu_q,
                g.cu_k,
                g.max_q,
                g.max_k,
                float(scale),
                g.window_size,
                cap,
            )
            dq.index_copy_(0, g.rows, gq.to(dq.dtype))
            dk.index_copy_(0, g.keys, gk.to(dk.dtype))  # each key row belongs to one sequence, one group
            dv.index_copy_(0, g.keys, gv.to(dv.dtype))
        return dq, dk, dv
