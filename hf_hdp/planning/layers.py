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
    "GATED_DELTANET_FAMILIES",
    "MAMBA2_FAMILIES",
    "SHORT_CONV_FAMILIES",
    "LayerBlock",
    "StateShape",
    "attention_head_dims",
    "is_heterogeneous",
    "kernel_head_dim",
    "layer_attention_shapes",
    "layer_attr",
    "layer_blocks",
    "layer_configs",
    "layer_state_shapes",
]

#: model types whose ``layer_types`` entries ``"linear_attention"`` are Gated DeltaNet layers
#: (:mod:`hf_hdp.attention.recurrent`); other families' linear layers are not priced as such
GATED_DELTANET_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
#: model types with Mamba-2 mixers (:func:`hf_hdp.attention.recurrent.adapters._mamba2_forward`): ``layer_types``
#: ``"linear_attention"`` (a Mamba-2 layer) and ``"hybrid"`` (Falcon-H1, Zamba 2: attention beside a Mamba-2 mixer)
MAMBA2_FAMILIES = ("nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "zamba2")
#: model types whose ``layer_types`` entries ``"conv"`` are gated short convolutions (LFM2)
SHORT_CONV_FAMILIES = ("lfm2", "lfm2_moe", "lfm3")
STATE_KINDS = ("delta", "ssd", "conv")


class StateShape(NamedTuple):
    """A state-carrying token mixer's shapes: ``key_heads`` query/key heads of ``key_dim``, ``value_heads`` value
    heads of ``value_dim``, and the depthwise convolution's ``kernel``. Its convolution runs over :attr:`channels`.

    ``kind``: ``"delta"``, Gated DeltaNet; ``"ssd"``, Mamba-2 (``key_heads`` = ``n_groups``, ``key_dim`` =
    ``ssm_state_size``, ``value_heads`` = its heads, ``value_dim`` = ``head_dim``: the chunked recurrence without the
    delta, and a skip ``D x``); ``"conv"``, LFM2's gated short convolution (no heads, no state: ``value_heads = 1``
    and ``value_dim`` = the convolution's channels, the hidden size)."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    kernel: int
    kind: str = "delta"

    @classmethod
    def of(cls, values) -> StateShape:
        """From a tuple or list (a JSON round trip): five ints and an optional kind."""
        values = tuple(values)
        return cls(*(int(x) for x in values[:5]), *(str(x) for x in values[5:6]))

    def describe(self) -> str:
        """``"Gated DeltaNet (16x128 key, 32x128 value heads, kernel 4)"``; ``"Mamba-2 (8 groups x 128 state, 128x64
        heads, kernel 4)"``; ``"short convolution (2048 channels, kernel 3)"``."""
        if self.kind == "conv":
            return f"short convolution ({self.channels} channels, kernel {self.kernel})"
        if self.kind == "ssd":
            groups = f"{self.key_heads} group{'s' if self.key_heads != 1 else ''}"
            return (
                f"Mamba-2 ({groups} x {self.key_dim} state, {self.value_heads}x{self.value_dim} "
                f"heads, kernel {self.kernel})"
            )
        return (
            f"Gated DeltaNet ({self.key_heads}x{self.key_dim} key, {self.value_heads}x{self.value_dim} value heads, "
            f"kernel {self.kernel})"
        )

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
        kv_heads = (
            heads
            if getattr(config, "kv_lora_rank", None)
            else int(getattr(config, "num_key_value_heads", None) or heads)
        )
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


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None and not isinstance(value, str):
            return int(value)
    raise AttributeError(f"{type(config).__name__} has none of {names}")


def mamba2_shape(config) -> StateShape:
    """A Mamba-2 mixer's :class:`StateShape` (``kind="ssd"``) from the config, under each family's names: groups
    ``n_groups``/``mamba_n_groups``/``mamba_ngroups``, state ``ssm_state_size``/``mamba_d_state``, heads
    ``mamba_num_heads``/``mamba_n_heads``/``n_mamba_heads`` of ``mamba_head_dim``/``mamba_d_head``/``mamba_headdim``,
    kernel ``conv_kernel``/``mamba_d_conv``."""
    return StateShape(
        _first(config, "n_groups", "mamba_n_groups", "mamba_ngroups"),
        _first(config, "ssm_state_size", "mamba_d_state"),
        _first(config, "mamba_num_heads", "mamba_n_heads", "n_mamba_heads"),
        _first(config, "mamba_head_dim", "mamba_d_head", "mamba_headdim"),
        _first(config, "conv_kernel", "mamba_d_conv"),
        "ssd",
    )


def _types(config) -> list:
    return list(getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or [])


def layer_state_shapes(config) -> list[StateShape | None]:
    """Per decoder layer, the :class:`StateShape` of its state-carrying mixer, ``None`` for a layer without one:
    Gated DeltaNet (``layer_types[i] == "linear_attention"`` in :data:`GATED_DELTANET_FAMILIES`), Mamba-2
    (``"linear_attention"`` or ``"hybrid"`` in :data:`MAMBA2_FAMILIES`), short convolution (``"conv"`` in
    :data:`SHORT_CONV_FAMILIES`). Multimodal configs are read from their ``text_config``."""
    if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    n = _num_layers(config)
    types = _types(config)
    family = getattr(config, "model_type", None)
    if family in GATED_DELTANET_FAMILIES and "linear_attention" in types:
        shape = StateShape(
            int(config.linear_num_key_heads),
            int(config.linear_key_head_dim),
            int(config.linear_num_value_heads),
            int(config.linear_value_head_dim),
            int(config.linear_conv_kernel_dim),
        )
        mixers = ("linear_attention",)
    elif family in MAMBA2_FAMILIES and ({"linear_attention", "hybrid"} & set(types)):
        shape, mixers = mamba2_shape(config), ("linear_attention", "hybrid")
    elif family in SHORT_CONV_FAMILIES and "conv" in types:
        shape, mixers = StateShape(0, 0, 1, int(config.hidden_size), int(config.conv_L_cache), "conv"), ("conv",)
    else:
        return [None] * n
    return [shape if i < len(types) and types[i] in mixers else None for i in range(n)]


class LayerBlock(NamedTuple):
    """What one decoder layer holds: an ``attention`` (whatever its mask), a state-carrying mixer ``state`` (or
    ``None``), and its MLP's weights a token uses (``mlp``) and does not use (``inactive``: a mixture of experts'
    other experts and router)."""

    attention: bool
    state: StateShape | None
    mlp: int
    inactive: int


def _nemotron_h_mlp(config, kind: str) -> tuple[int, int]:
    """Nemotron-H: only ``"mlp"`` and ``"moe"`` layers hold an MLP, non-gated (up and down projections); the MoE's
    routed experts of ``moe_intermediate_size`` (on ``moe_latent_size`` when set, with its two latent projections),
    ``num_experts_per_tok`` of ``n_routed_experts`` per token, and a shared expert."""
    h = int(config.hidden_size)
    if kind == "mlp":
        return 2 * h * int(config.intermediate_size), 0
    if kind != "moe":
        return 0, 0
    experts = int(getattr(config, "n_routed_experts", 0) or 0)
    top = int(getattr(config, "num_experts_per_tok", 1) or 1)
    latent = getattr(config, "moe_latent_size", None)
    width = int(latent) if latent else h
    expert = 2 * width * int(config.moe_intermediate_size)
    shared = 2 * h * int(getattr(config, "moe_shared_expert_intermediate_size", 0) or 0)
    return top * expert + shared + (2 * h * width if latent else 0), (experts - top) * expert + h * experts


def _granite_hybrid_mlp(config) -> tuple[int, int]:
    """Granite 4 hybrid: a gated shared MLP of ``shared_intermediate_size``, plus, with ``num_local_experts``, the
    ``num_experts_per_tok`` gated experts of ``intermediate_size`` a token uses."""
    h = int(config.hidden_size)
    shared = 3 * h * int(getattr(config, "shared_intermediate_size", 0) or 0)
    experts = int(getattr(config, "num_local_experts", 0) or 0)
    if not experts:
        return shared, 0
    top = int(getattr(config, "num_experts_per_tok", 1) or 1)
    expert = 3 * h * int(config.intermediate_size)
    return shared + top * expert, (experts - top) * expert + h * experts


def layer_blocks(config, mlp: int, inactive: int) -> list[LayerBlock]:
    """Per decoder layer, its :class:`LayerBlock`; ``mlp``/``inactive``: the model's usual MLP (every layer's, unless
    its family says otherwise). Attention layers are those without a state mixer, but Falcon-H1's and Zamba 2's
    ``"hybrid"`` layers hold both, and Nemotron-H's ``"mlp"``/``"moe"`` layers neither. Per family: Nemotron-H's layers
    hold ONE block each (a Mamba-2, attention, MLP or MoE mixer: :func:`_nemotron_h_mlp`); Zamba 2's Mamba layers hold
    no MLP, its hybrid layers the shared transformer block's (attention and MLP) beside their Mamba-2 mixer; Granite 4
    hybrid's MLP is :func:`_granite_hybrid_mlp`."""
    if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    states = layer_state_shapes(config)
    types = _types(config)
    family = getattr(config, "model_type", None)
    if family == "granitemoehybrid":
        mlp, inactive = _granite_hybrid_mlp(config)
    out = []
    for i, st in enumerate(states):
        kind = types[i] if i < len(types) else None
        attention = st is None or kind == "hybrid"
        m, x = mlp, inactive
        if family == "nemotron_h":
            attention = kind in ("attention", "full_attention")
            m, x = _nemotron_h_mlp(config, kind)
        elif family == "zamba2" and kind != "hybrid":
            m, x = 0, 0
        out.append(LayerBlock(attention, st, m, x))
    return out
