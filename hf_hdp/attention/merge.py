"""Merging partial attention results with the log-sum-exp rule (docs/design.md §4).

Attention over a set of keys can be computed block by block: each block gives an output and the
log-sum-exp of every query row, and two blocks merge exactly as

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Ring attention merges its blocks this way, in accumulators whose dtype :func:`accumulator_dtype`
decides for every place in hf_hdp that accumulates attention (backends, merge, ring).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulator_dtype", "merge_attention"]


def accumulator_dtype(x: Tensor | torch.dtype) -> torch.dtype:
    """The dtype attention accumulates in for ``x`` (a tensor or a dtype).

    float64 stays float64 (tests need a float64 lse to stay tight); everything else (float32,
    bfloat16, float16) accumulates in float32.
    """
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_attention(
    out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor, *, inplace: bool = False
) -> tuple[Tensor, Tensor]:
    """Merge one block's partial attention into the running ``(out, lse)``.

    ``out``/``block_out`` are ``[T, H, D]``, ``lse``/``block_lse`` ``[T, H]``. The running ``out`` is a
    float32 (or float64) accumulator; ``block_out`` may be bf16/fp16. Rows where both sides have no
    mass (``lse = -inf``) stay ``out = 0``, ``lse = -inf``, without NaN. ``out=None`` starts a new
    accumulation from the block (copied, in the accumulator dtype). With ``inplace=True`` the result
    is written into ``out`` and ``lse`` (which must be floating accumulators) and they are returned.
    """
    if out is None or lse is None:
        return (
            block_out.to(accumulator_dtype(block_out), copy=True),
            block_lse.to(accumulator_dtype(block_lse), copy=True),
        )
    if out.shape[:2] != lse.shape or block_out.shape != out.shape or block_lse.shape != lse.shape:
        raise ValueError(
            f"merge_attention shapes disagree: out {tuple(out.shape)}, lse {tuple(lse.shape)}, "
            f"block_out {tuple(block_out.shape)}, block_lse {tuple(block_lse.shape)}"
        )
    acc = accumulator_dtype(out)
    lse_a, lse_b = lse.to(acc), block_lse.to(acc)
    new_lse = torch.logaddexp(lse_a, lse_b)
    ref = new_lse.masked_fill(new_lse == float("-inf"), 0.0)  # -inf - -inf would be NaN
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    new_out = w_a * out.to(acc) + w_b * block_out.to(acc)
    if inplace:
        out.copy_(new_out)
        lse.copy_(new_lse)
        return out, lse
    return new_out, new_lse
