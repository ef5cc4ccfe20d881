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

Layer features (the contract's ``window``, ``positions`` and ``softcap``):

* A sequence whose mask the kernel's own flags express runs as one kernel call, as before: non-causal
  (positions do not matter then), causal with equal lengths starting at the same position
  (``is_causal=True``, top-left aligned; this is every local sequence without a window, exactly the
  path it always took), and causal where every row sees every key (``is_causal=False``).
* Any other causal sequence (a sliding window, or offset ``positions``) runs *over blocks*: its query
  rows are cut into tiles of :data:`TILE_ROWS` rows (or about the window), and each tile is given only
  the key range it can see (the band of the window). That range is cut into at most three parts: the
  keys every row of the tile sees (no mask) and, either side of them, the keys only some rows see,
  each with an explicit additive float mask of (tile rows) x (part keys), never more than
  ``tile x 2 tiles``. Forward merges the parts' outputs with their log-sum-exp; a part's rows that
  see none of its keys get ``lse = -inf`` and ``out = 0`` there (the kernel itself answers ``lse = 0``
  for them). Backward runs the same parts with the global ``out``/``lse`` (the flash identity makes
  each part's share exact), adds each part's dQ into its rows and accumulates dK/dV (in float32)
  over the overlapping key ranges of the tiles. Rows that see no key at all get out 0, lse -inf and
  no gradient. So a long windowed sequence costs about ``s * (tile + w)`` scores, not ``s²``.
* Different q/k and v head sizes (multi-head latent attention): the kernel needs one head size, so q, k and v
  are zero-padded to the larger (``dout`` and ``out`` too in backward) and the output and gradients sliced back;
  exact, since zero columns add nothing to a score and padded value columns only fill dropped output columns.
* ``softcap``: the CPU kernel has no score transform, so soft-capped calls are computed exactly with
  explicit scores by the ``"reference"`` backend's ``forward``/``backward`` (float32 arithmetic for
  float32/bf16/fp16 inputs, results in the input dtype), after this backend's own input checks.
  Correct but slow: a soft-capped model on the CPU attends at reference speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..merge import merge_attention
from .base import (
    NEG_INF,
    POS_INF,
    AttentionBackend,
    check_features,
    empty_backward,
    empty_forward,
    pad_head,
    pad_head_dims,
    sequence_bounds,
    visible,
)
from .reference import ReferenceBackend

#: The input dtypes the CPU flash kernel runs.
CPU_FLASH_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: Query rows per tile of a sequence that runs over blocks (windowed or offset causal sequences).
TILE_ROWS = 256
#: The fewest rows per tile with a short window (fewer, larger kernel calls).
MIN_TILE_ROWS = 64

_REFERENCE = ReferenceBackend()


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


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool, window=None, softcap=None, positions=None
):
    """The per-sequence bounds, after refusing what the kernel cannot take (with the fix)."""
    if any(t.device.type != "cpu" for t in (q, k, v)):
        raise ValueError(
            f"the 'cpu_flash' attention backend runs on CPU tensors only, got {q.device}; use "
            f"attention_backend='auto' (which picks flash_attn or torch_varlen on CUDA) or 'reference'"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"the 'cpu_flash' attention backend needs q/k/v of one dtype, got {q.dtype}/{k.dtype}/{v.dtype}"
        )
    problem = _dtype_problem(q.dtype)
    if problem is not None:
        raise ValueError(problem)
    check_features(window, softcap, positions, causal)
    return sequence_bounds(q, k, v, cu_q, cu_k, causal, positions)


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


# -- sequences over blocks ---------------------------------------------------------------------


def _whole_sequence_flag(q0: int, k0: int, nq: int, nk: int, causal: bool, window: int | None) -> bool | None:
    """The kernel's ``is_causal`` for a sequence one plain kernel call computes exactly, else ``None``
    (the sequence runs over blocks)."""
    if not causal:
        return False  # a window needs causal (check_features); positions do not matter
    if window is None and q0 == k0 and nq == nk:
        return True  # top-left aligned causal: the kernel's own is_causal
    first_sees_all = q0 >= k0 + nk - 1  # the first row sees the last key ...
    last_sees_all = window is None or (q0 + nq - 1) - k0 < window  # ... and the last row the first key
    if first_sees_all and last_sees_all:
        return False  # every row sees every key: no mask
    return None


def _tile_rows(window: int | None) -> int:
    return TILE_ROWS if window is None else max(MIN_TILE_ROWS, min(TILE_ROWS, window))


def _block_parts(q0: int, k0: int, nq: int, nk: int, window: int | None):
    """``[(r0, r1, [(lo, hi, masked), ...]), ...]``: the tiles of query rows of a causal sequence and,
    per tile, the parts of the key range it sees (``masked``: only some of its rows see those keys)."""
    tiles = []
    rows = _tile_rows(window)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        p_first, p_last = q0 + r0, q0 + r1 - 1  # positions of the tile's first and last rows
        hi = min(nk, p_last + 1 - k0)
        lo = 0 if window is None else max(0, p_first - window + 1 - k0)
        if hi <= lo:
            continue  # no row of the tile sees a key
        f_lo = lo if window is None else max(lo, p_last - window + 1 - k0)  # keys every row sees
        f_hi = min(hi, p_first + 1 - k0)
        if f_hi > f_lo:
            parts = [(a, b, m) for a, b, m in ((lo, f_lo, True), (f_lo, f_hi, False), (f_hi, hi, True)) if b > a]
        else:
            parts = [(lo, hi, True)]
        tiles.append((r0, r1, parts))
    return tiles


def _part_mask(
    q0: int, k0: int, r0: int, r1: int, lo: int, hi: int, window: int | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The additive mask ``[1, 1, rows, keys]`` (0 visible, -inf not) of a masked part, and bool
    ``[rows]``: which rows see none of its keys."""
    ok = visible(q0 + r0, k0 + lo, r1 - r0, hi - lo, True, window, torch.device("cpu"))
    mask = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, NEG_INF)
    return mask[None, None], ~ok.any(dim=-1)


class CpuFlashBackend(AttentionBackend):
    """PyTorch's CPU flash-attention kernel, one packed sequence (or tile of one) at a time."""

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
    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, *, window=None, softcap=None, positions=None):
        seqs = _check_inputs(q, k, v, cu_q, cu_k, causal, window, softcap, positions)
        if softcap is not None:  # no score transform in the kernel: explicit scores
            return _REFERENCE.forward(
                q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap=softcap, window=window, positions=positions
            )
        v_dim = v.shape[-1]
        if v_dim != q.shape[-1]:  # one head size for the kernel: zero-pad, then drop the padded output columns
            _, (q, k, v) = pad_head_dims(q, k, v)
            out, lse = self._forward(q, k, v, seqs, causal, scale, window, positions)
            return out[..., :v_dim].contiguous(), lse
        return self._forward(q, k, v, seqs, causal, scale, window, positions)

    def _forward(self, q, k, v, seqs, causal, scale, window, positions):
        groups = q.shape[1] // k.shape[1]
        out, lse = empty_forward(q, v)
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        for i, ((qs, qe), (ks, ke)) in enumerate(seqs):
            if qe == qs or ke == ks:
                continue  # no rows, or rows without keys: out 0, lse -inf
            q0, k0 = positions[i] if positions is not None else (0, 0)
            flag = _whole_sequence_flag(q0, k0, qe - qs, ke - ks, causal, window)
            if flag is not None:
                o, l = kernel(
                    _kernel_layout(q, qs, qe),
                    _kernel_layout(k, ks, ke, groups),
                    _kernel_layout(v, ks, ke, groups),
                    0.0,
                    flag,
                    scale=float(scale),
                )
                out[qs:qe] = _packed_layout(o, q.shape[1])
                lse[qs:qe] = l[0].transpose(0, 1)
                continue
            kk, vv = _kernel_layout(k, ks, ke, groups), _kernel_layout(v, ks, ke, groups)
            for r0, r1, parts in _block_parts(q0, k0, qe - qs, ke - ks, window):
                qq = _kernel_layout(q, qs + r0, qs + r1)
                acc_o = acc_l = None
                for lo, hi, masked in parts:
                    mask, empty = _part_mask(q0, k0, r0, r1, lo, hi, window, q.dtype) if masked else (None, None)
                    o, l = kernel(qq, kk[:, :, lo:hi], vv[:, :, lo:hi], 0.0, False, attn_mask=mask, scale=float(scale))
                    o, l = _packed_layout(o, q.shape[1]), l[0].transpose(0, 1).float()
                    if empty is not None and bool(empty.any()):
                        o = o.masked_fill(empty[:, None, None], 0.0)
                        l = l.masked_fill(empty[:, None], NEG_INF)
                    acc_o, acc_l = merge_attention(acc_o, acc_l, o, l)
                out[qs + r0 : qs + r1] = acc_o
                lse[qs + r0 : qs + r1] = acc_l
        return out, lse

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
        seqs = _check_inputs(q, k, v, cu_q, cu_k, causal, window, softcap, positions)
        if softcap is not None:  # no score transform in the kernel: explicit scores
            return _REFERENCE.backward(
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
        qk_dim, v_dim = q.shape[-1], v.shape[-1]
        if v_dim != qk_dim:  # as forward: zero-padded to one head size, the padding's gradients dropped
            dim, (q, k, v) = pad_head_dims(q, k, v)
            dq, dk, dv = self._backward(
                pad_head(dout, dim), q, k, v, pad_head(out, dim), lse, seqs, causal, scale, window, positions
            )
            return dq[..., :qk_dim].contiguous(), dk[..., :qk_dim].contiguous(), dv[..., :v_dim].contiguous()
        return self._backward(dout, q, k, v, out, lse, seqs, causal, scale, window, positions)

    def _backward(self, dout, q, k, v, out, lse, seqs, causal, scale, window, positions):
        hkv = k.shape[1]
        groups = q.shape[1] // hkv
        dq, dk, dv = empty_backward(q, k, v)
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        lse = lse.float()
        lse = lse.masked_fill(lse == NEG_INF, POS_INF)  # rows with no mass: P = 0
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        for i, ((qs, qe), (ks, ke)) in enumerate(seqs):
            if qe == qs or ke == ks:
                continue  # no gradient
            q0, k0 = positions[i] if positions is not None else (0, 0)
            flag = _whole_sequence_flag(q0, k0, qe - qs, ke - ks, causal, window)
            if flag is not None:
                gq, gk, gv = kernel(
                    _kernel_layout(dout, qs, qe),
                    _kernel_layout(q, qs, qe),
                    _kernel_layout(k, ks, ke, groups),
                    _kernel_layout(v, ks, ke, groups),
                    _kernel_layout(out, qs, qe),
                    lse[qs:qe].t().unsqueeze(0),
                    0.0,
                    flag,
                    scale=float(scale),
                )
                dq[qs:qe] = _packed_layout(gq, q.shape[1])
                dk[ks:ke] = _packed_layout(gk, hkv)
                dv[ks:ke] = _packed_layout(gv, hkv)
                continue
            kk, vv = _kernel_layout(k, ks, ke, groups), _kernel_layout(v, ks, ke, groups)
            dk_acc = torch.zeros(ke - ks, hkv, k.shape[2], dtype=torch.float32)
            dv_acc = torch.zeros(ke - ks, hkv, v.shape[2], dtype=torch.float32)
            for r0, r1, parts in _block_parts(q0, k0, qe - qs, ke - ks, window):
                rows = (qs + r0, qs + r1)
                do, qq, oo = _kernel_layout(dout, *rows), _kernel_layout(q, *rows), _kernel_layout(out, *rows)
                ll = lse[rows[0] : rows[1]].t().unsqueeze(0)
                dq_acc = torch.zeros(r1 - r0, q.shape[1], q.shape[2], dtype=torch.float32)
                for lo, hi, masked in parts:
                    mask = _part_mask(q0, k0, r0, r1, lo, hi, window, q.dtype)[0] if masked else None
                    gq, gk, gv = kernel(
                        do, qq, kk[:, :, lo:hi], vv[:, :, lo:hi], oo, ll, 0.0, False, attn_mask=mask, scale=float(scale)
                    )
                    dq_acc += _packed_layout(gq, q.shape[1])
                    dk_acc[lo:hi] += _packed_layout(gk, hkv)
                    dv_acc[lo:hi] += _packed_layout(gv, hkv)
                dq[rows[0] : rows[1]] = dq_acc
            dk[ks:ke] = dk_acc
            dv[ks:ke] = dv_acc
        return dq, dk, dv
