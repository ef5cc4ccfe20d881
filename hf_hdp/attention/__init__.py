"""Attention for HDP: kernel backends, zigzag ring attention, and the "hdp" AttentionInterface entry."""

from .interface import HDP_ATTENTION, UnsupportedAttentionError, hdp_attention_forward, register
from .backends import get_backend
from .metadata import HDPAttentionMetadata, RingSegment
from .ring import ring_attention

__all__ = [
    "HDP_ATTENTION",
    "UnsupportedAttentionError",
    "hdp_attention_forward",
    "register",
    "get_backend",
    "HDPAttentionMetadata",
    "RingSegment",
    "ring_attention",
]
