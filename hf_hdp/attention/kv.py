"""K and V as one message, each at its own head size (multi-head latent attention and the rest).

Ring, windowed-exchange and head-parallel attention send a member's K and V rows together, one message
per hop. Most models have one head size for q, k and v, but multi-head latent attention (DeepSeek-V3,
Kimi K2, GLM's MLA models) has q/k heads of ``qk_nope_head_dim + qk_rope_head_dim`` (192) and v heads
of ``v_head_dim`` (128). So a message is not ``[rows, 2·Hkv, D]`` but each row's K heads then its V heads,
flattened: ``[rows, Hkv·(Dk + Dv)]``. Its bytes are exactly ``rows · Hkv · (Dk + Dv)`` values, what the
cost model prices (:meth:`~hf_hdp.planning.cost.CostModel.segment_bytes_by_member`), with no padding on the
wire; the same layout carries the dK/dV accumulators back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["KVLayout", "pack_kv", "unpack_kv"]


class KVLayout(NamedTuple):
    """How a packed K/V row splits: ``heads`` K/V heads of ``k_dim`` (keys) and ``v_dim`` (values) each."""

    heads: int
    k_dim: int
    v_dim: int

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> KVLayout:
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same rows and heads")
        return cls(k.shape[1], k.shape[2], v.shape[2])

    @property
    def width(self) -> int:
        """Values of one packed row."""
        return self.heads * (self.k_dim + self.v_dim)

    def with_heads(self, heads: int) -> KVLayout:
        return KVLayout(heads, self.k_dim, self.v_dim)


def pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``k`` ``[n, H, Dk]`` and ``v`` ``[n, H, Dv]`` as one ``[n, H·(Dk + Dv)]`` tensor (a copy)."""
    n = k.shape[0]
    return torch.cat([k.reshape(n, -1), v.reshape(n, -1)], dim=1)


def unpack_kv(kv: torch.Tensor, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(k [n, H, Dk], v [n, H, Dv])`` of a packed ``[n, H·(Dk + Dv)]`` tensor (last dims contiguous)."""
    n, split = kv.shape[0], layout.heads * layout.k_dim
    if kv.shape[1] != layout.width:
        raise ValueError(f"a packed K/V row of {kv.shape[1]} values does not match {layout}")
    return kv[:, :split].view(n, layout.heads, layout.k_dim), kv[:, split:].view(n, layout.heads, layout.v_dim)
