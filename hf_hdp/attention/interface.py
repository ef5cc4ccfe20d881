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

Each layer's features are honoured, and only by the layers that have them (:mod:`.features`): a
sliding window (the ``sliding_window`` keyword transformers passes, or the module's own), attention
logit soft-capping (``softcap``), attention sinks (``s_aux``, gpt-oss's learned per-head logits) and
chunked attention (the layer's ``"chunked_attention"`` type in ``config.layer_types``, with
``config.attention_chunk_size``, as transformers builds Llama 4's masks). A window or chunk at least as
long as every sequence of the micro-batch is plain causal attention and runs as such.

Refused loudly rather than ignored: attention dropout during training and non-causal attention.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..planning.reach import LayerMask, layer_mask
from .backends import get_backend
from .features import LayerFeatures
from .metadata import HDPAttentionMetadata
from .segments import distributed_attention
from .sinks import LocalAttention

HDP_ATTENTION = "hdp"


class UnsupportedAttentionError(ValueError):
    """The model asks for an attention feature HDP would otherwise silently get wrong."""


def _where(module) -> str:
    return f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"


def _check_features(module, dropout: float, kwargs: dict) -> None:
    where = _where(module)
    if dropout and module.training:
        raise UnsupportedAttentionError(
            f"{where} uses attention dropout {dropout} in training, which HDP's kernels do not implement. "
            "Set config.attention_dropout = 0.0 (the usual value for fine-tuning)."
        )
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise UnsupportedAttentionError(f"{where} is non-causal; HDP supports causal decoder attention only.")


def _layer_chunk(module) -> int | None:
    """The attention chunk of a ``"chunked_attention"`` layer (from its config), else ``None``."""
    config, idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if config is None or not isinstance(idx, int) or not getattr(config, "attention_chunk_size", None):
        return None
    return layer_mask(config, idx).chunk


def layer_features(module, meta: HDPAttentionMetadata, kwargs: dict) -> tuple[LayerFeatures, torch.Tensor | None]:
    """The features this layer's call asks for (reduced to what this micro-batch's sequences can feel), and its
    sinks (``None`` without)."""
    window = kwargs.get("sliding_window")
    if "sliding_window" not in kwargs:  # Qwen2-MoE's sliding layers keep their window to themselves
        window = getattr(module, "sliding_window", None)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UnsupportedAttentionError(f"{_where(module)} passes sliding_window={window!r}; expected a positive int")
    softcap = kwargs.get("softcap")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise UnsupportedAttentionError(f"{_where(module)} passes softcap={softcap}; expected a positive cap")
    sinks = kwargs.get("s_aux")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != _module_heads(module, sinks)):
        raise UnsupportedAttentionError(
            f"{_where(module)} passes attention sinks of shape {tuple(sinks.shape)}; expected one logit per query head"
        )
    mask = LayerMask(window=window, chunk=_layer_chunk(module)).for_length(meta.max_seqlen)
    return LayerFeatures(mask, softcap), sinks


def _module_heads(module, sinks: torch.Tensor) -> int:
    """The layer's query heads (as its config says), or the sinks' own length when the module does not say."""
    heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    return int(heads) if isinstance(heads, int) else sinks.shape[0]


def _chunked_cu(seqlens: tuple[int, ...], chunk: int | None) -> tuple[int, ...]:
    """Local sequences cut at attention-chunk boundaries (each piece is then plain causal attention)."""
    if chunk is None:
        return seqlens
    return tuple(min(chunk, s - a) for s in seqlens for a in range(0, s, chunk))


def _local_attention(q, k, v, meta: HDPAttentionMetadata, features: LayerFeatures, sinks, scale, backend):
    """The micro-batch's whole local sequences: one varlen call, the layer's window and soft-cap in the kernel,
    chunked layers as the sequences' chunks, sinks merged by :class:`~.sinks.LocalAttention`."""
    if features.mask.chunk is None:
        cu, longest = meta.local_cu_seqlens(q.device), meta.local_max_seqlen
    else:
        pieces = _chunked_cu(meta.local_seqlens, features.mask.chunk)
        cu = torch.tensor([0, *accumulate(pieces)], dtype=torch.int32, device=q.device)
        longest = max(pieces, default=0)
    kernel = features.kernel()
    if sinks is None:
        return backend.varlen(q, k, v, cu, cu, longest, longest, True, scale, **kernel)
    return LocalAttention.apply(q, k, v, sinks, cu, longest, scale, backend, kernel)


def _fallback_mask(module, query, key, attention_mask, kwargs):
    """The 4-D boolean mask of a call without HDP metadata: causal, the layer's window and attention chunk, and
    the 2-D padding mask (left padding shifts the chunk boundaries, as in transformers' chunked masks). A 4-D
    mask the caller built is used as it is."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    q_len, kv_len = query.shape[-2], key.shape[-2]
    kv_pos = torch.arange(kv_len, device=query.device)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
    allowed = (kv_pos[None, :] <= q_pos[:, None])[None, None]
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window:
        allowed = allowed & (q_pos[:, None] - kv_pos[None, :] < window)[None, None]
    chunk = _layer_chunk(module)
    if chunk:
        pad = torch.zeros(query.shape[0], device=query.device, dtype=torch.long)
        if attention_mask is not None:
            pad = (attention_mask == 0).long().cumprod(-1).sum(-1)
        pad = pad[:, None, None, None]
        allowed = allowed & (
            (kv_pos[None, None, None, :] - pad) // chunk == (q_pos[None, None, :, None] - pad) // chunk
        )
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return allowed


def _eager(query, key, value, mask, scaling, softcap, sinks):
    """Explicit scores for the features SDPA lacks (soft-capping, sinks); ``[B, T, Hq, D]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:
        column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        scores = torch.cat([scores, column], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """Without HDP metadata (generation, evaluation on a padded batch): the layer's own attention, its window,
    chunk, soft-cap and sinks included, on the padded batch. SDPA where it has every feature, else explicit
    scores."""
    mask = _fallback_mask(module, query, key, attention_mask, kwargs)
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if softcap is None and sinks is None:
        plain = (
            attention_mask is None
            and not kwargs.get("sliding_window", getattr(module, "sliding_window", None))
            and not _layer_chunk(module)
        )
        return sdpa_attention_forward(
            module, query, key, value, None if plain else mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise UnsupportedAttentionError(
            f"{_where(module)}: attention dropout with soft-capping or sinks is not "
            "implemented outside HDP training; set config.attention_dropout = 0.0"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _eager(query, key, value, mask, scale, softcap, sinks), None


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
    _check_features(module, dropout, kwargs)
    features, sinks = layer_features(module, meta, kwargs)
    if query.shape[0] != 1 or query.shape[2] != meta.num_tokens:
        raise ValueError(
            f"hdp attention expects one packed row of {meta.num_tokens} tokens, got query of shape "
            f"{tuple(query.shape)} ({meta.describe()})"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    if not q.dtype == k.dtype == v.dtype:  # under autocast, RoPE can leave q/k in float32 beside a bf16 v
        common = (
            torch.get_autocast_dtype(q.device.type)
            if torch.is_autocast_enabled(q.device.type)
            else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        )
        q, k, v = (x.to(common) for x in (q, k, v))
    backend = get_backend(meta.runtime.backend, q.device, q.dtype)
    parts = []
    n_local = meta.local_len
    if n_local:
        parts.append(
            _local_attention(
                q[:n_local].contiguous(),
                k[:n_local].contiguous(),
                v[:n_local].contiguous(),
                meta,
                features,
                sinks,
                scale,
                backend,
            )
        )
    if meta.rings:
        parts.append(
            distributed_attention(
                q[n_local:].contiguous(),
                k[n_local:].contiguous(),
                v[n_local:].contiguous(),
                meta.rings,
                scale,
                backend,
                meta.runtime.mesh,
                features,
                sinks,
            )
        )
    meta.runtime.calls += 1
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out.unsqueeze(0), None


def register() -> None:
    """Register ``"hdp"`` with transformers (idempotent)."""
    AttentionInterface.register(HDP_ATTENTION, hdp_attention_forward)


register()
