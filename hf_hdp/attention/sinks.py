"""Attention sinks: a learned logit per head that joins every row's softmax denominator (gpt-oss's ``sinks``).

For query row ``r`` and head ``h`` with attention output ``o`` and log-sum-exp ``l`` over its keys, the sink
``z_h`` is one more key whose value is zero::

    l' = log(exp(l) + exp(z_h))          o' = exp(l - l') · o

That is exactly a merge with one extra block (``lse = z_h``, ``out = 0``) in the log-sum-exp rule of
:mod:`.merge`, so a split sequence merges it ONCE per row, after all of its ring blocks.

Backward: the blocks' backward, given the merged ``o'``/``l'``, already gives the exact ``dQ``/``dK``/``dV``
(``P = exp(S - l')`` is the true probability, with the sink's column in the denominator; its value is
zero so it adds nothing to ``dV`` or ``dP``). The sink's own gradient is its column's ``dS``::

    dz_h = Σ_r P_sink · (0 - D_r) = -Σ_r exp(z_h - l'_r) · rowsum(dO_r · o'_r)

summed over this rank's rows; HDP's gradient all-reduce then sums it over ranks, and autograd over
micro-batches, like any other parameter's gradient.

:class:`LocalAttention` is the autograd node of a micro-batch's local sequences for a layer with sinks
(local sequences without sinks keep the backend's own ``varlen``); :mod:`.segments` does the same for the
distributed segments, and :mod:`.ulysses` for the head slice a member holds.
"""

from __future__ import annotations

import torch

from .merge import accumulator_dtype

NEG_INF = float("-inf")


def merge_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out', lse')`` of rows whose ``out`` ``[T, H, D]`` and ``lse`` ``[T, H]`` cover all their keys, with the
    sinks ``[H]`` merged in (accumulator dtype)."""
    acc = accumulator_dtype(out)
    lse = lse.to(acc)
    z = sinks.detach().to(acc)[None, :]
    new = torch.logaddexp(lse, z)
    return out.to(acc) * torch.exp(lse - new).unsqueeze(-1), new


def sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``d sinks`` ``[H]`` (in the sinks' dtype) from this rank's rows: merged ``out``/``lse`` and their ``dout``."""
    acc = accumulator_dtype(out)
    d_row = (dout.to(acc) * out.to(acc)).sum(-1)  # [T, H]
    p_sink = torch.exp(sinks.detach().to(acc)[None, :] - lse.to(acc))
    return (-(p_sink * d_row).sum(0)).to(sinks.dtype)


class LocalAttention(torch.autograd.Function):
    """Whole packed sequences with sinks: the backend's ``forward``, the sinks merged, the backend's ``backward``
    from the merged result, and the sinks' gradient."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu, max_len, scale, backend, kernel):
        out, lse = backend.forward(q, k, v, cu, cu, max_len, max_len, True, scale, **kernel)
        out, lse = merge_sinks(out, lse, sinks)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, out, lse, cu)
        ctx.args = (max_len, scale, backend, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse, cu = ctx.saved_tensors
        max_len, scale, backend, kernel = ctx.args
        dout = dout.contiguous()
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, cu, cu, max_len, max_len, True, scale, **kernel)
        return dq, dk, dv, sink_grad(dout, out, lse, sinks), None, None, None, None, None
