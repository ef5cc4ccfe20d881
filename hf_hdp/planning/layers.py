"""What each attention layer of a transformers config looks like: its K/V heads and head sizes, read per layer.

Two things make "the model's head size" ambiguous, and HDP reads neither from a single global attribute:

- **Per-layer configs.** transformers' heterogeneous configs (``config.per_layer_config``, e.g. Gemma 4)
  keep attributes such as ``head_dim`` and ``num_key_value_heads`` per layer: Gemma 4's full-attention
  layers have ``global_head_dim`` heads (512 beside 256) and, with ``attention_k_eq_v``,
  ``num_global_key_value_heads`` K/V heads. Reading ``config.head_dim`` there raises transformers'
  ``AmbiguousGlobalPerLayerAttributeError``; :func:`layer_attr` reads ``config.per_layer_config[i]``.
- **Multi-head latent attention** (DeepSeek-V2/V3, Kimi K2, GLM-4 MoE Lite, MiniCPM3, ...): the
  attention receives q/k heads of ``qk_nope_head_dim + qk_rope_head_dim`` and v heads of
  ``v_head_dim`` (192 and 128 in DeepSeek-V3), and as many K/V heads as query heads (the latent is
  expanded per head before the attention). Such configs set ``head_dim`` to the rope part only, so
  ``config.head_dim`` is not the attention's head size at all.

:func:`layer_attention_shapes` gives ``(num_kv_heads, qk_head_dim, v_head_dim)`` per layer, as the
attention interface will see the tensors; the cost model prices each layer's K/V messages with them and
the trainer checks the kernels against every head size. Pure Python: no torch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "GATED_DELTANET_FAMILIES", "StateShape", "attention_head_dims", "is_heterogeneous", "kernel_head_dim",
    "layer_attention_shapes", "layer_attr", "layer_configs", "layer_state_shapes",
]

#: model types whose ``layer_types`` entries ``"linear_attention"`` are Gated DeltaNet layers
#: (:mod:`hf_hdp.attention.recurrent`); other families' linear layers are not priced as such
GATED_DELTANET_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")


class StateShape(NamedTuple):
    """A Gated DeltaNet layer's shapes: ``key_heads`` query/key heads of ``key_dim``, ``value_heads`` value heads of
    ``value_dim``, and the depthwise convolution's ``kernel``. Its convolution runs over :attr:`channels`."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    kernel: int

    @property
    def channels(self) -> int:
        """The convolution's channels ``C = 2·Hk·dk + Hv·dv`` (queries, keys, values)."""
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim

_MISSING = object()


def is_heterogeneous(config) -> bool:
    """Whether ``config`` keeps some attributes per layer (transformers' ``per_layer_config``)."""
    try:
        return bool(getattr(config, "is_heterogeneous", False))
    except Exception:  # noqa: BLE001 - a config that cannot say is not heterogeneous
        return False


def _num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def layer_configs(config) -> list:
    """One config per layer: ``config.per_layer_config[i]`` for a heterogeneous config, else ``config`` itself."""
    n = _num_layers(config)
    if is_heterogeneous(config):
        per_layer = config.per_layer_config
        return [per_layer[i] for i in range(n)]
    return [config] * max(n, 1)


def layer_attr(config, name: str, layer: int, default: Any = None) -> Any:
    """Attribute ``name`` of layer ``layer``: from its per-layer config where the config keeps one, else the global
    one; ``default`` when the config has none (``None`` values count as missing)."""
    source = config.per_layer_config[layer] if is_heterogeneous(config) else config
    value = getattr(source, name, _MISSING)
    return default if value is _MISSING or value is None else value


def _shape(config) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    if getattr(config, "qk_nope_head_dim", None) is not None and getattr(config, "v_head_dim", None) is not None:
        # multi-head latent attention: K/V expanded to every query head, q/k = nope + rope, v its own size
        qk = int(config.qk_nope_head_dim) + int(getattr(config, "qk_rope_head_dim", 0) or 0)
        kv_heads = heads if getattr(config, "kv_lora_rank", None) else int(getattr(config, "num_key_value_heads", None) or heads)
        return kv_heads, qk, int(config.v_head_dim)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    v_dim = getattr(config, "v_head_dim", None) or head_dim
    return int(kv_heads), int(head_dim), int(v_dim)


def layer_attention_shapes(config) -> list[tuple[int, int, int]]:
    """``(num_kv_heads, qk_head_dim, v_head_dim)`` of every decoder layer's attention, read per layer (see the module
    docstring). Multimodal configs are read from their ``text_config``."""
    if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    return [_shape(c) for c in layer_configs(config)]


def attention_head_dims(config) -> tuple[int, ...]:
    """Every head size the attention kernels will see (q/k and v, all layers), sorted."""
    return tuple(sorted({d for _, qk, v in layer_attention_shapes(config) for d in (qk, v)}))


def kernel_head_dim(config) -> int:
    """The head size to check the fused kernels against: each layer's kernel runs q/k and v at one size, the larger
    of the two (:mod:`hf_hdp.attention.backends._fused` pads the other), so this is the first layer's size that is
    not a multiple of 8 if there is one, else the largest (what ``HDPConfig.check_attention_backend`` checks)."""
    sizes = [max(qk, v) for _, qk, v in layer_attention_shapes(config)]
    return next((d for d in sizes if d % 8), max(sizes))


def layer_state_shapes(config) -> list[StateShape | None]:
    """Per decoder layer, the :class:`StateShape` of a Gated DeltaNet layer (``layer_types[i] == "linear_attention"``
    in a family of :data:`GATED_DELTANET_FAMILIES`), ``None`` for an attention layer. Multimodal configs are read from
    their ``text_config``."""
    if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    n = _num_layers(config)
    types = list(getattr(config, "layer_types", None) or [])
    if getattr(config, "model_type", None) not in GATED_DELTANET_FAMILIES or "linear_attention" not in types:
        return [None] * n
    shape = StateShape(int(config.linear_num_key_heads), int(config.linear_key_head_dim),
                       int(config.linear_num_value_heads), int(config.linear_value_head_dim),
                       int(config.linear_conv_kernel_dim))
    return [shape if i < len(types) and types[i] == "linear_attention" else None for i in range(n)]
