"""The contract every attention backend of hf_hdp keeps, and the helpers they share.

Every attention call in hf_hdp goes through an :class:`AttentionBackend`:

``varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> out``
    Autograd-enabled attention over whole packed sequences (the local, non-distributed part of a
    micro-batch).
``forward(...) -> (out, lse)``
    No autograd; called under ``torch.no_grad`` inside ring attention's autograd Function. Returns
    the output and the log-sum-exp of every query row, so that partial results over different key
    blocks can be merged with :func:`hf_hdp.attention.merge.merge_attention`.
``backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``
    The gradient contribution of one key block. ``out`` and ``lse`` may be the *merged* (global)
    ones of the rows; the result is then this block's exact share of the full gradient, by the flash
    backward identity::

        P  = exp(S * scale - lse)          # S = q k^T of this block, lse the global one
        D  = rowsum(dout * out)            # out the global output
        dV = P^T dout      dP = dout V^T      dS = P * (dP - D)
        dQ = scale * dS K  dK = scale * dS^T Q

    Summed over the blocks of a ring, these contributions give the gradient of the full attention.
    A merged ``out`` arrives in a float32 (float64) accumulator: backends whose kernels need the
    input dtype cast it (the kernel reads ``out`` only for ``D``), as ring-flash-attention does.

Conventions (all backends)
--------------------------
* Packed varlen layout: ``q`` is ``[Tq, Hq, Dk]``, ``k`` is ``[Tk, Hkv, Dk]`` and ``v`` is
  ``[Tk, Hkv, Dv]`` with ``Hq % Hkv == 0``; ``out`` and ``dout`` are ``[Tq, Hq, Dv]``. The value head size may
  differ from the query/key one (multi-head latent attention: 192 and 128 in DeepSeek-V3); kernels that need
  one head size get K/V zero-padded to the larger (:func:`pad_head_dims`), which is exact: zero columns add
  nothing to a score, and zero value columns give output columns that are dropped. K/V come in *unrepeated* (GQA); query head ``h`` uses K/V head
  ``h // (Hq // Hkv)``; ``dk``/``dv`` come back with ``Hkv`` heads.
* ``cu_q``, ``cu_k``: int32 ``[N + 1]`` cumulative lengths; query sequence ``i`` attends only to key
  sequence ``i``. ``max_q``/``max_k`` are the longest lengths (Python ints).
* ``lse`` is ``[Tq, Hq]`` in :func:`~hf_hdp.attention.merge.accumulator_dtype` of the inputs: float32,
  float64 for float64 inputs (which only the reference backend accepts: float64 tests need a float64
  lse to stay tight). Each backend converts from and to its library's own layout.
* ``causal=True`` needs equal per-sequence query and key lengths (then top-left and bottom-right
  alignment agree); otherwise a ``ValueError`` is raised.
* Sequences of length 0 work: a query row with no keys gets ``out = 0``, ``lse = -inf`` and no
  gradient, and nothing is NaN.
* Output dtype = ``q.dtype``; gradients in the dtypes of ``q``/``k``/``v``.

Layer features (keyword-only, every method, every backend; :func:`check_features` validates them)
-------------------------------------------------------------------------------------------------
``positions``
    ``None``, or per sequence ``(q_start, k_start)``: the positions (within the sample) of its first
    query row and first key row. With ``positions``, ``causal`` means key position ``<=`` query
    position and the lengths need not agree; ring blocks of windowed or chunked layers use this for
    their pairs of zigzag chunks (:mod:`hf_hdp.planning.reach`). ``None`` is ``(0, 0)`` for all.
``window``
    ``None``, or a sliding window of ``w`` tokens (causal only): key position ``p_k`` is visible from
    query position ``p_q`` iff ``0 <= p_q - p_k < w``, transformers' ``sliding_window`` semantics.
``softcap``
    ``None``, or a cap ``c > 0``: the scaled score ``s`` becomes ``c * tanh(s / c)`` before the
    mask and the softmax (Gemma 2's ``attn_logit_softcapping``), forward and backward (``dS`` is
    multiplied by ``1 - tanh²``). The log-sum-exp merge is unchanged: capping is per score.
Chunked attention and sinks are not backend features: chunked layers cut their sequences at chunk
boundaries (local sequences into chunks, ring pairs by :func:`~hf_hdp.planning.reach.visible_pairs`)
and sinks join the merged log-sum-exp once per row (:mod:`hf_hdp.attention.sinks`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..merge import accumulator_dtype

NEG_INF = float("-inf")
POS_INF = float("inf")


def check_shapes(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> None:
    """Raise ``ValueError`` unless q/k/v/cu_q/cu_k have the packed varlen layout of the contract."""
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
            f"cu_q and cu_k must both be [N + 1] cumulative lengths; got {tuple(cu_q.shape)} and {tuple(cu_k.shape)}"
        )


def pad_head(x: Tensor, dim: int) -> Tensor:
    """``x`` with its last dimension zero-padded to ``dim`` (``x`` itself when it has that size)."""
    return x if x.shape[-1] == dim else torch.nn.functional.pad(x, (0, dim - x.shape[-1]))


def pad_head_dims(*tensors: Tensor) -> tuple[int, list[Tensor]]:
    """``(D, tensors zero-padded to D)`` with ``D`` the largest last dimension among them: how a kernel that needs
    one head size for q, k and v runs multi-head latent attention exactly (padded q/k columns add 0 to every
    score, padded v columns make output columns the caller drops; the gradients of the padding are dropped)."""
    dim = max(t.shape[-1] for t in tensors)
    return dim, [pad_head(t, dim) for t in tensors]


def check_features(window: int | None, softcap: float | None, positions, causal: bool) -> None:
    """Raise ``ValueError`` unless the layer features of the contract are well formed (:func:`sequence_bounds`
    checks that ``positions`` has one entry per sequence)."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"a sliding window must be a positive number of tokens, got {window!r}")
        if not causal:
            raise ValueError("a sliding window needs causal attention")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"an attention soft-cap must be a positive number, got {softcap!r}")


def visible(
    q_start: int, k_start: int, rows: int, keys: int, causal: bool, window: int | None, device: torch.device
) -> Tensor | None:
    """Bool ``[rows, keys]``: which keys each query row sees (``None``: all of them), for query rows at positions
    ``q_start ...`` and keys at ``k_start ...`` under the contract's ``causal``/``window``."""
    if not causal:
        return None
    qp = torch.arange(q_start, q_start + rows, device=device)[:, None]
    kp = torch.arange(k_start, k_start + keys, device=device)[None, :]
    ok = kp <= qp
    if window is not None:
        ok &= qp - kp < window
    return ok


def capped(s: Tensor, softcap: float | None) -> Tensor:
    """Scores after soft-capping: ``c * tanh(s / c)`` (``s`` itself without a cap)."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def sequence_bounds(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    causal: bool,
    positions=None,
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``[((q_start, q_end), (k_start, k_end)), ...]`` per sequence, after validating everything.

    Checks the shapes, that ``cu_q``/``cu_k`` start at 0, never decrease and end at the token counts,
    and, for ``causal``, that every sequence has as many queries as keys. Reads ``cu_q``/``cu_k`` on
    the host (a sync on GPU): for the backends that loop over sequences in Python.
    """
    check_shapes(q, k, v, cu_q, cu_k)
    bq, bk = [int(x) for x in cu_q.tolist()], [int(x) for x in cu_k.tolist()]
    for name, b, total in (("cu_q", bq, q.shape[0]), ("cu_k", bk, k.shape[0])):
        if b[0] != 0 or b[-1] != total or any(b1 < b0 for b0, b1 in zip(b, b[1:])):
            raise ValueError(f"{name} must start at 0, never decrease and end at the token count {total}; got {b}")
    seqs = list(zip(zip(bq, bq[1:]), zip(bk, bk[1:])))
    if positions is not None and len(positions) != len(seqs):
        raise ValueError(
            f"positions must give (q_start, k_start) for each of the {len(seqs)} sequences, got {len(positions)}"
        )
    if causal and positions is None:
        bad = [i for i, ((qs, qe), (ks, ke)) in enumerate(seqs) if qe - qs != ke - ks]
        if bad:
            raise ValueError(
                f"causal attention needs equal query and key lengths per sequence; sequences {bad} "
                f"differ (q lengths {[b - a for a, b in zip(bq, bq[1:])]}, k lengths "
                f"{[b - a for a, b in zip(bk, bk[1:])]})"
            )
    return seqs


def empty_forward(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of rows that see no keys: ``out = 0`` in ``q.dtype``, ``lse = -inf``."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.full((q.shape[0], q.shape[1]), NEG_INF, dtype=accumulator_dtype(q), device=q.device)
    return out, lse


def empty_backward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero gradients of q/k/v, in their dtypes."""
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class NoAttention(torch.autograd.Function):
    """Attention when there are no query rows or no keys at all: out 0, zero gradients.

    The fused kernels are not asked to handle ``Tq == 0`` or ``Tk == 0``; this keeps the autograd
    graph connected (q/k/v get zero gradients) without launching them.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        return empty_forward(q, v)[0]

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return empty_backward(*ctx.saved_tensors)


class BlockAttentionFunction(torch.autograd.Function):
    """``varlen`` built from a backend's ``forward``/``backward`` (the default ``varlen``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_q: Tensor,
        cu_k: Tensor,
        max_q: int,
        max_k: int,
        causal: bool,
        scale: float,
        backend: AttentionBackend,
        features: dict,
    ) -> Tensor:
        out, lse = backend.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **features)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, backend, features)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, backend, features = ctx.args
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, **features)
        return dq, dk, dv, None, None, None, None, None, None, None, None


class AttentionBackend:
    """Base class of the attention backends; see the module docstring for the contract."""

    #: Registry name (one of :data:`hf_hdp.attention.backends.BACKEND_NAMES`).
    name: str = "base"

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype | None) -> str | None:
        """``None`` if this backend can run on ``device`` (for ``dtype``, when given), else why not
        and what to do instead. The base class runs anywhere."""
        return None

    def varlen(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_q: Tensor,
        cu_k: Tensor,
        max_q: int,
        max_k: int,
        causal: bool,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
        positions=None,
    ) -> Tensor:
        """Autograd-enabled attention of whole packed sequences; returns ``out`` ``[Tq, Hq, D]``.

        By default the autograd Function of this backend's own ``forward`` and ``backward``.
        """
        features = dict(window=window, softcap=softcap, positions=positions)
        return BlockAttentionFunction.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, self, features)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_q: Tensor,
        cu_k: Tensor,
        max_q: int,
        max_k: int,
        causal: bool,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
        positions=None,
    ) -> tuple[Tensor, Tensor]:
        """Attention without autograd; returns ``(out [Tq, Hq, D], lse [Tq, Hq])``."""
        raise NotImplementedError

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        cu_q: Tensor,
        cu_k: Tensor,
        max_q: int,
        max_k: int,
        causal: bool,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
        positions=None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This key block's contribution ``(dq, dk, dv)`` given the (possibly merged) ``out``/``lse``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
