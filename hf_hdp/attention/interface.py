"""The ``"hdp"`` attention implementation, registered with transformers' ``AttentionInterface``.

transformers calls ``hdp_attention_forward(module, query, key, value, attention_mask, ...)`` from
every attention layer of a model whose ``config._attn_implementation == "hdp"``, passing on the
keyword arguments of the model's forward (``TransformersKwargs``). HDP passes the micro-batch's
:class:`~hf_hdp.attention.metadata.HDPAttentionMetadata` as ``hdp_metadata``: whole local sequences
then run one varlen kernel, distributed pieces run zigzag ring attention, head-parallel (Ulysses)
or hybrid attention, as their split says (:mod:`hf_hdp.attention.segments`).

Called without ``hdp_metadata`` (generation, a plain forward on a padded batch) the function
behaves like PyTorch SDPA with a causal (and padding) mask, so a model switched to ``"hdp"`` stays
usable outside HDP training.

The attention features HDP does not implement are refused loudly rather than ignored: attention
dropout during training, logit soft-capping, attention sinks, non-causal attention, and a sliding
window shorter than a sequence of the micro-batch.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .backends import get_backend
from .metadata import HDPAttentionMetadata
from .segments import distributed_attention

HDP_ATTENTION = "hdp"


class UnsupportedAttentionError(ValueError):
    """The model asks for an attention feature HDP would otherwise silently get wrong."""


def _check_features(module, meta: HDPAttentionMetadata, dropout: float, kwargs: dict) -> None:
    where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if dropout and module.training:
        raise UnsupportedAttentionError(
            f"{where} uses attention dropout {dropout} in training, which HDP's kernels do not implement. "
            "Set config.attention_dropout = 0.0 (the usual value for fine-tuning)."
        )
    if kwargs.get("softcap") is not None:
        raise UnsupportedAttentionError(
            f"{where} uses attention logit soft-capping ({kwargs['softcap']}), which HDP does not implement. "
            "Train this model with the stock Trainer and attn_implementation='eager'."
        )
    if kwargs.get("s_aux") is not None:
        raise UnsupportedAttentionError(
            f"{where} uses attention sinks, which HDP does not implement. "
            "Train this model with the stock Trainer and attn_implementation='eager'."
        )
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise UnsupportedAttentionError(f"{where} is non-causal; HDP supports causal decoder attention only.")
    window = kwargs.get("sliding_window")
    if "sliding_window" not in kwargs:  # Qwen2-MoE's sliding layers keep their window to themselves
        window = getattr(module, "sliding_window", None)
    if window is not None and window < meta.max_seqlen:
        raise UnsupportedAttentionError(
            f"{where} uses a sliding window of {window} tokens but {meta.describe()} holds a sequence of "
            f"{meta.max_seqlen} tokens; HDP's kernels attend over the whole sequence and would train wrongly. "
            "Set config.sliding_window = None (or at least the longest sample), or keep samples within the window."
        )


def _fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """Plain SDPA: causal, with a 2-D padding mask turned into a 4-D one."""
    if attention_mask is not None and attention_mask.dim() == 2:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        kv_pos = torch.arange(kv_len, device=query.device)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        causal = kv_pos[None, :] <= q_pos[:, None]
        attention_mask = causal[None, None] & attention_mask[:, None, None, :].bool()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def hdp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query``: ``[1, Hq, T, D]``, ``key``/``value``: ``[1, Hkv, T, D]``; returns ``[1, T, Hq, D]``."""
    meta: HDPAttentionMetadata | None = kwargs.pop("hdp_metadata", None)
    if meta is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check_features(module, meta, dropout, kwargs)
    if query.shape[0] != 1 or query.shape[2] != meta.num_tokens:
        raise ValueError(
            f"hdp attention expects one packed row of {meta.num_tokens} tokens, got query of shape "
            f"{tuple(query.shape)} ({meta.describe()})"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    if not q.dtype == k.dtype == v.dtype:  # under autocast, RoPE can leave q/k in float32 beside a bf16 v
        common = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else \
            torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = (x.to(common) for x in (q, k, v))
    backend = get_backend(meta.runtime.backend, q.device, q.dtype)
    parts = []
    n_local = meta.local_len
    if n_local:
        cu = meta.local_cu_seqlens(q.device)
        m = meta.local_max_seqlen
        parts.append(
            backend.varlen(
                q[:n_local].contiguous(), k[:n_local].contiguous(), v[:n_local].contiguous(), cu, cu, m, m, True, scale
            )
        )
    if meta.rings:
        parts.append(
            distributed_attention(
                q[n_local:].contiguous(), k[n_local:].contiguous(), v[n_local:].contiguous(),
                meta.rings, scale, backend, meta.runtime.mesh,
            )
        )
    meta.runtime.calls += 1
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out.unsqueeze(0), None


def register() -> None:
    """Register ``"hdp"`` with transformers (idempotent)."""
    AttentionInterface.register(HDP_ATTENTION, hdp_attention_forward)


register()
