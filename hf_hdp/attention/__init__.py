"""Attention for HDP: kernel backends, zigzag ring attention, head-parallel pieces, the windowed exchange of sliding
and chunked layers, sinks, and the "hdp" AttentionInterface entry."""

from .backends import get_backend
from .features import LayerFeatures
from .interface import HDP_ATTENTION, UnsupportedAttentionError, hdp_attention_forward, register
from .metadata import HDPAttentionMetadata, RingSegment
from .segments import ring_attention

__all__ = [
    "HDP_ATTENTION",
    "UnsupportedAttentionError",
    "hdp_attention_forward",
    "register",
    "get_backend",
    "LayerFeatures",
    "HDPAttentionMetadata",
    "RingSegment",
    "ring_attention",
]
