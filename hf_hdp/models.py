"""Which transformers model families HDP trains correctly, and the checks that refuse the rest.

HDP packs several samples into one row and splits long samples over ranks. Its ``"hdp"`` attention
(:mod:`hf_hdp.attention.interface`) keeps samples apart and runs causal attention within each
sample, so a model trains exactly as on one device when every part of it that mixes tokens is that
attention, and everything else works token by token (norms, MLPs, per-token MoE routing, RoPE from
global ``position_ids``).

The attention implements, locally, in ring pieces and in head-parallel pieces alike:

- **sliding windows** of any length (``sliding_window`` on the layers ``layer_types`` or
  ``use_sliding_window`` make slide): a window is counted in positions of the sample, so a split
  sample's window runs across rank boundaries, and ring pieces exchange only the rows a window
  reaches (:mod:`hf_hdp.planning.reach`);
- **chunked attention** (Llama 4's ``attention_chunk_size``), chunks counted from each sample's first
  token;
- **attention logit soft-capping** (Gemma 2's ``attn_logit_softcapping``: ``c·tanh(s/c)`` on the
  scaled scores, before the mask); the *final* logit soft-capping works on each token's logits;
- **attention sinks** (gpt-oss's ``sinks``, passed to the attention as ``s_aux``): one learned logit
  per head joining each row's softmax denominator.

:func:`check_model_supported` records those and inspects the config and the attention modules for
the features that break HDP's assumptions, raising :class:`UnsupportedModelError` naming the model,
the layer feature, why it breaks and what to do instead. It never lets a model train silently wrong:

- **non-causal attention** (encoder-decoder models, bidirectional attention, encoders): HDP's kernels
  are causal; supporting it would take bidirectional kernels per sample (and, for encoder-decoders,
  cross-attention with its own packing of the encoder side);
- **attention dropout** > 0: HDP's kernels have no dropout, and a dropout mask that matches one
  process's would need the same random stream per (sample, head, query, key) on every rank; other
  dropouts are per token and fine;
- **layers that are not attention** but mix tokens: linear attention (Gated DeltaNet in qwen3_next,
  lightning attention in minimax), Mamba / state-space layers, short convolutions (lfm2). They carry
  a recurrent state (or a convolution window) along the sequence: packing would need the state reset
  at every sample boundary, and splitting a sample would need the state (or the convolution's last
  ``kernel - 1`` rows, a halo) passed from rank to rank in order, a scan over the group. That is a
  different kernel family from attention's, not implemented;
- **RoPE whose frequencies depend on the batch** (``dynamic`` NTK, ``longrope``) once a sample is
  longer than the original context: transformers picks the frequencies from the largest position in
  the forward's ``position_ids``, which under HDP is the longest sample part of the packed row (other
  samples' and other ranks' lengths). Supporting it would need each token's frequencies chosen from
  its own sample's full length, passed per token into the rotary embedding;
- **MoE router auxiliary loss** (``output_router_logits=True``): the load-balancing loss is a
  product of batch-wide averages, not a sum over tokens, so it does not split over micro-batches
  and ranks; it would need the per-expert token counts and router probabilities all-reduced over the
  step before the product. HDP trains the token-level LM loss only, which is also what transformers
  trains with ``output_router_logits=False`` (the default). MoE routing itself is per token (top-k
  over each token's router logits, no expert capacity), so packing does not change it; an **expert
  capacity** would (tokens dropped depend on the batch) and is refused;
- **Llama 4's attention temperature tuning** (``attn_temperature_tuning=True``, on its NoPE layers):
  it scales each query by ``1 + attn_scale·log1p(floor((i + 1) / floor_scale))`` with ``i`` the row
  index of the forward's input (``torch.arange`` of the row), not ``position_ids``, so packing and
  splitting change the scale of every token past ``floor_scale - 1`` rows. Supporting it would need
  transformers to take ``i`` from ``position_ids``;
- **multimodal** models (vision/audio towers, M-RoPE position ids): HDP packs text tokens with 1-D
  positions only; it would need the image/audio tokens placed and the 3-D positions packed with them.

:data:`SUPPORTED_FAMILIES` records what ``tests/test_model_families.py`` verified: 4 CPU ranks
against one process, loss and every gradient, float64. A family not listed there is allowed when
every check passes, with a warning that its equivalence has not been verified; a family listed as
refused is refused whatever its config says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from .planning.layers import GATED_DELTANET_FAMILIES, MAMBA2_FAMILIES, SHORT_CONV_FAMILIES

logger = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model cannot be trained with HDP as it is."""


@dataclass(frozen=True)
class FamilySupport:
    """What HDP does with one ``config.model_type``.

    ``status``:

    - ``"verified"``: ``tests/test_model_families.py`` shows HDP's loss and gradients equal one
      process's (4 gloo ranks, float64); the usual checkpoints of the family pass every check.
    - ``"conditional"``: verified the same way, but the family's usual checkpoints use a feature
      :func:`check_model_supported` refuses beyond some sample length, or unless turned off (the
      note says which: Phi-3's longrope past its original context, Llama 4's temperature tuning).
    - ``"refused"``: the family needs a feature HDP does not implement.
    """

    status: Literal["verified", "conditional", "refused"]
    note: str


_V, _C, _R = "verified", "conditional", "refused"
_AUX = "output_router_logits must stay False (the router aux loss is refused)"

SUPPORTED_FAMILIES: dict[str, FamilySupport] = {
    # --- verified by tests/test_model_families.py: loss and every gradient, 4 gloo ranks vs 1 process,
    # float64, within 1e-9 of each gradient's largest element; windows and chunks of 8 tokens over samples of
    # up to 60 (split over 3 and 4 ranks), soft-capping and sinks that change the output
    "llama": FamilySupport(_V, "GQA; static RoPE scaling (llama3, linear, yarn)"),
    "qwen2": FamilySupport(_V, "GQA, q/k/v bias; sliding layers (use_sliding_window, from max_window_layers on)"),
    "qwen3": FamilySupport(_V, "GQA, per-head q/k RMSNorm; sliding layers (use_sliding_window)"),
    "mistral": FamilySupport(_V, "GQA; sliding_window (4096 in Mistral 7B v0.1, None from v0.2) on every layer"),
    "ministral": FamilySupport(_V, "GQA; every layer slides over sliding_window"),
    "gemma": FamilySupport(_V, "GQA, sqrt(hidden) embedding scale, head_dim apart from hidden size, tied embeddings"),
    "gemma2": FamilySupport(
        _V, "attention logit soft-capping (50.0) and sliding layers (4096) alternating with full ones; final logit "
        "soft-capping (30.0) per token",
    ),
    "gemma3_text": FamilySupport(
        _V, "q/k norm, local-layer RoPE; sliding layers (1024 in the released checkpoints, 512 in Gemma 3 1B)"
    ),
    "phi3": FamilySupport(
        _C, "fused qkv, partial rotary, sliding_window (2047 in Phi-3-mini-4k); with longrope (the 128k models) "
        "samples must stay within original_max_position_embeddings (4096)",
    ),
    "olmo2": FamilySupport(_V, "GQA, q/k RMSNorm over all heads, post-norm blocks"),
    "olmo3": FamilySupport(_V, "sliding layers (4096) alternating with full ones"),
    "mixtral": FamilySupport(_V, f"MoE, top-2 per token (also float32 with grouped_mm experts); {_AUX}"),
    "qwen2_moe": FamilySupport(_V, f"MoE with a gated shared expert, per token; {_AUX}"),
    "qwen3_moe": FamilySupport(_V, f"MoE, q/k norm, per token; {_AUX}"),
    "olmoe": FamilySupport(_V, f"MoE, q/k norm, per token; {_AUX}"),
    "starcoder2": FamilySupport(_V, "GQA, biases, LayerNorm; sliding_window on every layer"),
    "cohere": FamilySupport(_V, "parallel attention/MLP block, q/k LayerNorm, logit scale, tied embeddings"),
    "granite": FamilySupport(_V, "embedding, residual, attention and logit multipliers"),
    "phi": FamilySupport(_V, "partial rotary, q/k LayerNorm, parallel block, biases"),
    "gpt_neox": FamilySupport(_V, "fused qkv, partial rotary, parallel residual (no GQA)"),
    "glm": FamilySupport(_V, "partial rotary, fused gate/up"),
    "smollm3": FamilySupport(_V, "NoPE layers (no rotary on every 4th layer)"),
    "gpt_oss": FamilySupport(
        _V, f"attention sinks in every layer, sliding layers (128) alternating with full ones, MoE (biased top-k "
        f"router, clamped SwiGLU experts) per token, static yarn RoPE; {_AUX}",
    ),
    "llama4_text": FamilySupport(
        _C, "chunked attention (8192) on its RoPE layers, NoPE full layers, q/k L2 norm, MoE with a shared expert "
        "(sigmoid top-k router) per token; only with attn_temperature_tuning=False: the released checkpoints' "
        "temperature tuning of the NoPE layers takes positions from the packed row index, not position_ids "
        "(refused; it is a no-op while every sample and packed row stays under floor_scale=8192 tokens, so "
        "setting it False then changes nothing)",
    ),
    "deepseek_v3": FamilySupport(
        _V, "multi-head latent attention (q/k heads of qk_nope_head_dim + qk_rope_head_dim = 192, v heads of "
        f"v_head_dim = 128: every kernel and split carries K and V at their own sizes), low-rank q/kv projections, "
        f"MoE with grouped top-k sigmoid routing and a shared expert per token (Kimi K2 shares the family); {_AUX}",
    ),
    "gemma4_text": FamilySupport(
        _V, "per-layer heads (global_head_dim and num_global_key_value_heads on the full layers, read per layer), "
        "attention_k_eq_v, K/V shared across layers (num_kv_shared_layers: the reusing layers attend the same rows' "
        "K/V), per-layer input embeddings (per token), sliding layers (512) beside full ones",
    ),
    # --- refused: the feature is built into the family, or the family is not verified by the tests (an entry
    # here keeps it from the generic "unverified" path: each note says why)
    "granite_swa": FamilySupport(
        _R, "not verified: its sinks (a post-attention sigmoid(lse - sink) scale, the same maths as a denominator "
        "logit) and sliding layers are what HDP implements, but no test compares it with one process yet",
    ),
    "granitemoe_swa": FamilySupport(_R, "not verified: sinks and sliding layers as granite_swa, plus MoE; no test yet"),
    "mimo_v2_flash": FamilySupport(
        _R, "not verified: sinks on its sliding layers only, which have twice the K/V heads of its full layers, and "
        "q/k and v head dims that differ; no test yet",
    ),
    "deepseek_v4": FamilySupport(
        _R, "compressed/indexed attention (a learned selection of which keys each query reads, over the whole "
        "sequence): not HDP's attention, it would need the indexer run over the sample's keys across ranks",
    ),
    "vaultgemma": FamilySupport(
        _R, "not verified: Gemma 2's attention (soft-capping, sliding layers), which HDP implements, but no test "
        "compares it with one process yet (it is trained with DP-SGD: per-sample gradient clipping, which HDP "
        "does not do)",
    ),
    # --- verified by tests/test_linear_families.py (4 gloo ranks vs 1 process, float64, the same tolerances): Gated
    # DeltaNet layers restart their state and convolution at every sample; split samples run head-parallel or the
    # state scan (hf_hdp.attention.recurrent), both forced in the tests
    "qwen3_5_text": FamilySupport(
        _V, "Gated DeltaNet layers (3 of every 4 in the released models) with their causal convolution, gated "
        "attention layers with q/k norm and partial M-RoPE (text positions only)",
    ),
    "qwen3_5_moe_text": FamilySupport(
        _V, f"Qwen3.5's Gated DeltaNet and gated attention layers, MoE with a gated shared expert per token; {_AUX}"
    ),
    "qwen3_next": FamilySupport(
        _V, f"Gated DeltaNet layers (fused qkvz/ba projections) and gated attention, MoE with a shared expert; {_AUX}"
    ),
    # Mamba-2 (state space dual) mixers, the same two splits (tests/test_linear_families.py)
    "nemotron_h": FamilySupport(
        _V, "Mamba-2 layers (grouped B/C, conv bias, D skip, grouped gated RMSNorm), attention, MLP-only and MoE layers; "
        "its logits are float32 (lm_head(...).float()), as in transformers",
    ),
    "bamba": FamilySupport(_V, "Mamba-2 layers with attention layers at attn_layer_indices"),
    "granitemoehybrid": FamilySupport(
        _V, f"Granite 4 hybrid: Mamba-2 layers and attention layers, Granite's multipliers, MoE per token; {_AUX}"
    ),
    "falcon_h1": FamilySupport(
        _V, "attention and a Mamba-2 mixer side by side in every layer, with Falcon-H1's input and mup multipliers"
    ),
    "zamba2": FamilySupport(
        _V, "Mamba-2 layers and hybrid layers (the shared attention block beside a Mamba-2 mixer), one memory block"
    ),
    "lfm2": FamilySupport(_V, "gated short convolutions (kernel 3) restarted per sample, halos across ranks; attention"),
    "lfm2_moe": FamilySupport(_V, f"LFM2's short convolutions and attention, MoE per token; {_AUX}"),
    "lfm3": FamilySupport(_V, "LFM2's gated short convolutions and attention"),
    "minimax": FamilySupport(
        _R, "lightning attention (linear attention with a fixed decay per head, no convolution) carries a state along "
        "the sequence; HDP's state scan and head-parallel split would run it (it is Mamba-2's state space dual form "
        "with the decay per head and no dt), but no adapter for MiniMaxLightningAttention's projections, activation, "
        "norm and output gate is written or verified yet",
    ),
    "kimi_linear": FamilySupport(
        _R, "Kimi Delta Attention decays its state per key channel (a vector gate per head and token), while HDP's "
        "chunked delta rule takes one decay per head and token; it would need the chunk quantities with per-channel "
        "decays (q e^c and k e^-c per channel) and an adapter for KimiLinearDeltaAttention, then the same splits",
    ),
    "t5gemma": FamilySupport(_R, "encoder-decoder: a bidirectional encoder and cross-attention, not causal attention"),
}

# layer_types HDP runs: its own causal attention, with or without a window or chunk HDP can check
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# state-carrying layer types HDP runs, per family with an adapter (hf_hdp.attention.recurrent.adapters); the families
# are the planner's (hf_hdp.planning.layers), each with the layer types its configs use
_STATE_LAYER_TYPES = {
    **{f: {"linear_attention"} for f in GATED_DELTANET_FAMILIES + MAMBA2_FAMILIES},
    # Nemotron-H also has layers that are only an MLP or MoE (no token mixing); Falcon-H1's "hybrid" layers run
    # attention and a Mamba-2 mixer side by side, Zamba 2's a shared attention block beside one
    "nemotron_h": {"linear_attention", "mlp", "moe"},
    "falcon_h1": {"hybrid"},
    "zamba2": {"linear_attention", "hybrid"},
    # LFM2's gated short convolutions (a convolution only: a split sample passes its halo, no state)
    **{f: {"conv"} for f in SHORT_CONV_FAMILIES},
}
_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
_HYBRID_KEYS = ("layers_block_type", "hybrid_override_pattern", "layer_block_types", "block_types")
_MULTIMODAL_KEYS = ("vision_config", "audio_config", "text_config", "vision_tower_config")
_STOCK = "train it with the stock transformers Trainer (no HDP)"
_STOCK_S = _STOCK[0].upper() + _STOCK[1:]


@dataclass(frozen=True)
class ModelSupport:
    """What :func:`check_model_supported` looked at, for a model it accepted."""

    model: str
    model_type: str
    family: str  # SUPPORTED_FAMILIES status, or "unverified"
    max_sequence_length: int
    checked: tuple[str, ...]
    notes: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"{self.model}: {self.family} for samples of up to {self.max_sequence_length} tokens"]
        lines += [f"  ok: {c}" for c in self.checked]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def hdp_base_model(model):
    """The transformers model inside ``model``: itself, the LM of a PEFT wrapper, or a model it wraps."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        # a PeftModel: its `base_model.base_model` would be the inner decoder (LlamaModel), not the LM
        base = model.get_base_model()
        if isinstance(base, PreTrainedModel):
            return base
    seen = model
    for _ in range(4):
        if isinstance(seen, PreTrainedModel):
            return seen
        seen = getattr(seen, "base_model", None) or getattr(seen, "model", None)
        if seen is None:
            break
    raise UnsupportedModelError(
        f"HDP needs a transformers PreTrainedModel (or a PEFT wrapper of one); got {type(model).__name__}."
    )


def _unwrap(model):
    """``(config, transformers model or None)`` of a model, a PEFT wrapper of one, or a config."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, None
    base = hdp_base_model(model)
    return base.config, base


def _attention_modules(base) -> list[tuple[str, object]]:
    """The model's attention layers: modules that declare ``is_causal`` and own projections."""
    if base is None:
        return []
    found = []
    for name, module in base.named_modules():
        if isinstance(getattr(module, "is_causal", None), bool) and any(
            hasattr(module, p) for p in ("q_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "query", "q_a_proj")
        ):
            found.append((name, module))
    return found


def _layers_dropping_kwargs(base, modules) -> list[str]:
    """Classes of the layers holding an attention module whose ``forward`` calls it without ``**kwargs`` (read from
    the source; a layer whose source cannot be read, or whose call is not found, is not listed)."""
    import ast
    import inspect
    import textwrap

    named = dict(base.named_modules())
    found: list[str] = []
    for name, _ in modules:
        parent_name, _, attr = name.rpartition(".")
        parent = named.get(parent_name)
        cls = type(parent)
        if parent is None or cls.__name__ in found:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
        except (OSError, TypeError, SyntaxError):
            continue
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr == attr and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"]
        if calls and not any(k.arg is None for c in calls for k in c.keywords):
            found.append(cls.__name__)
    return found


def routes_attention(base) -> bool:
    """Whether every attention layer of ``base`` calls transformers' AttentionInterface: the class says so
    (``_supports_attention_backend``), or it is a hybrid family whose attention layers do and whose
    state-carrying layers HDP's adapters run (transformers leaves the flag off for those: not every token mixer
    is attention)."""
    return bool(getattr(base, "_supports_attention_backend", False)) or \
        getattr(base.config, "model_type", None) in _STATE_LAYER_TYPES


def _layer_index(name: str) -> str:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "layer", "h", "blocks") and b.isdigit():
            return b
    return name


def _layers(indices: list, one: str = "", many: str = "") -> str:
    """``"layer 3 is"``, ``"layers 0, 1 are"``, ``"layers 0, 1, 2, 3, 4, ... (12 layers) are"``."""
    if len(indices) == 1:
        return f"layer {indices[0]} {one}".rstrip()
    shown = ", ".join(map(str, indices)) if len(indices) <= 6 else (
        f"{', '.join(map(str, indices[:5]))}, ... ({len(indices)} layers)"
    )
    return f"layers {shown} {many}".rstrip()


def _rope_thresholds(config) -> list[tuple[str, str, int]]:
    """``(where, rope_type, longest sample it stays static for)`` of every batch-dependent RoPE."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    sets = [("", params)] if "rope_type" in params or "type" in params else [
        (f" ({k})", v) for k, v in params.items() if isinstance(v, dict)
    ]
    out = []
    max_pos = getattr(config, "max_position_embeddings", None)
    for where, p in sets:
        rope_type = str(p.get("rope_type", p.get("type", "default")))
        if "dynamic" in rope_type and max_pos:
            out.append((where, rope_type, int(max_pos)))
        elif rope_type == "longrope":
            orig = p.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
            out.append((where, rope_type, int(orig or max_pos or 0)))
    return out


def check_model_supported(model, max_sequence_length: int) -> ModelSupport:
    """Refuse a model HDP would train wrongly; return what was checked for one it accepts.

    ``model``: a transformers ``PreTrainedModel``, a PEFT wrapper of one, or a ``PretrainedConfig``
    (then only the config is inspected). ``max_sequence_length``: the longest sample HDP will see
    (HDPTrainer passes the longest sample of the training set, or ``world_size * tokens_per_rank``
    without one); batch-dependent RoPE is accepted when no sample reaches past its original context.
    Sliding windows, chunked attention, soft-capping and sinks are implemented by the attention and
    recorded in ``checked``.

    Raises :class:`UnsupportedModelError` listing every problem found, each with the layers
    concerned and what to do instead.
    """
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
    config, base = _unwrap(model)
    L = max_sequence_length
    model_type = getattr(config, "model_type", None) or "?"
    name = f"{type(base).__name__ if base is not None else type(config).__name__} (model_type {model_type!r})"
    family = SUPPORTED_FAMILIES.get(model_type)
    modules = _attention_modules(base)
    problems: list[str] = []
    checked: list[str] = []
    notes: list[str] = []

    if family is not None and family.status == _R:
        problems.append(f"the {model_type} family is not supported: {family.note}; {_STOCK}.")

    # --- model kind
    if getattr(config, "is_encoder_decoder", False):
        problems.append(
            "it is an encoder-decoder model (bidirectional encoder, cross-attention); HDP trains decoder-only causal "
            "LMs. Use the stock Seq2SeqTrainer."
        )
    multimodal = [k for k in _MULTIMODAL_KEYS if getattr(config, k, None) is not None]
    if multimodal:
        problems.append(
            f"it is a composite (multimodal) model ({', '.join(multimodal)}); HDP packs text tokens with 1-D positions "
            "only. Load the text-only causal LM of the family (e.g. Gemma3ForCausalLM), or " + _STOCK + "."
        )
    if base is not None and not routes_attention(base):
        problems.append(
            f"{type(base).__name__} does not route its attention through transformers' AttentionInterface, so HDP "
            "cannot keep packed samples apart or split them over ranks. Use a model class that sets "
            "`_supports_attention_backend = True` (Llama, Qwen2, Mistral, ...), or " + _STOCK + "."
        )
    elif base is not None:
        dropping = _layers_dropping_kwargs(base, modules)
        if dropping:
            problems.append(
                f"{dropping[0]}.forward calls its attention without passing on its keyword arguments (**kwargs), so "
                "the packing metadata HDP hands the model's forward never reaches the attention (transformers' "
                f"{type(base).__name__} drops them). {_STOCK_S}, or use a transformers release whose decoder layer "
                "passes **kwargs to its attention."
            )
    checked.append("decoder-only causal LM routed through AttentionInterface")

    # --- layers that mix tokens outside attention
    layer_types = list(getattr(config, "layer_types", None) or [])
    stateful = _STATE_LAYER_TYPES.get(model_type, set())
    others = sorted({str(t) for t in layer_types} - _ATTENTION_LAYER_TYPES - stateful)
    linear = [i for i, t in enumerate(layer_types) if t in stateful and t not in ("mlp", "moe")]
    if linear:
        checked.append(
            f"state-carrying {_layers(linear)}: the state and the convolution restart at every sample, and a split "
            "sample passes its state head-parallel or by a state scan (hf_hdp.attention.recurrent)"
        )
    if others:
        idx = [i for i, t in enumerate(layer_types) if t not in _ATTENTION_LAYER_TYPES]
        problems.append(
            f"{_layers(idx, 'is', 'are')} of type {others}: they mix tokens outside the attention interface "
            "(linear attention, state-space or convolution layers) and carry a recurrent state (or a convolution "
            "window) along the sequence, so packed samples would leak into each other and a sample split over ranks "
            f"would lose its state. HDP resets and passes such state (hf_hdp.attention.recurrent) only for the "
            f"layers it has an adapter for (Gated DeltaNet, Mamba-2, short convolutions: "
            f"{', '.join(sorted(_STATE_LAYER_TYPES))}); the "
            f"{model_type} family has no adapter for these layers yet. {_STOCK_S}."
        )
    hybrid = [k for k in _HYBRID_KEYS if getattr(config, k, None)]
    if hybrid and model_type not in _STATE_LAYER_TYPES:  # those families' layer_types say what each layer is
        problems.append(
            f"config.{hybrid[0]} declares non-attention (hybrid) layers that mix tokens outside the attention "
            "interface and carry a recurrent state along the sequence (packing would need it reset at sample "
            f"boundaries, splitting would need it passed between ranks). {_STOCK_S}."
        )
    checked.append("every layer that mixes tokens is attention or a state-carrying layer HDP runs")

    # --- causality
    if getattr(config, "use_bidirectional_attention", None):
        problems.append(
            "config.use_bidirectional_attention is set: its attention is not causal and HDP computes causal attention "
            "only. Set use_bidirectional_attention=False (a causal LM), or " + _STOCK + "."
        )
    non_causal = [_layer_index(n) for n, m in modules if m.is_causal is False]
    if non_causal and not getattr(config, "use_bidirectional_attention", None):
        problems.append(
            f"attention {_layers(non_causal, 'is', 'are')} non-causal (is_causal=False, an encoder); HDP computes "
            f"causal decoder attention only. {_STOCK_S}."
        )
    checked.append("causal attention")

    # --- sliding windows, chunked attention, soft-capping, sinks: implemented by the "hdp" attention
    # the config is the source of truth (transformers builds the masks from it; layer modules are no guide:
    # Exaone 4 keeps sliding_window on its full layers too), read the way the attention and the planner read it
    from hf_hdp.planning.reach import layer_masks

    masks = layer_masks(config)
    for kind, attr, verb in (("window", "window", ("slides", "slide")), ("chunk", "chunk", ("attends", "attend"))):
        by_size: dict[int, list[int]] = {}
        for i, m in enumerate(masks):
            if getattr(m, attr) is not None:
                by_size.setdefault(getattr(m, attr), []).append(i)
        for size, idx in sorted(by_size.items()):
            what = f"over {size} tokens" if kind == "window" else (
                f"within chunks of {size} tokens (counted from each sample's first token)")
            if size < L:
                checked.append(f"{_layers(idx, *verb)} {what}: {kind}ed kernels, and ring pieces exchange only the "
                               f"rows a {kind} reaches")
            else:
                checked.append(f"{_layers(idx, *verb)} {what}, which covers every sample of up to {L} tokens "
                               "(plain causal attention)")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        checked.append(f"attention logit soft-capping (attn_logit_softcapping={softcap}) in every kernel")
    if getattr(config, "final_logit_softcapping", None) is not None:
        notes.append("final logit soft-capping works on each token's logits and is honoured")
    sinks = [_layer_index(n) for n, m in modules if getattr(m, "sinks", None) is not None]
    if sinks:
        checked.append(
            f"attention sinks on {_layers(sinks)} (a learned logit per head in each row's softmax denominator, "
            "counted once per row however the row's keys are split)"
        )

    # --- Llama 4's attention temperature tuning: scales queries by the row index of the forward's input
    nope = [i for i, r in enumerate(getattr(config, "no_rope_layers", None) or []) if not r]
    if getattr(config, "attn_temperature_tuning", False) and nope:
        floor = getattr(config, "floor_scale", None)
        problems.append(
            f"config.attn_temperature_tuning=True: the NoPE {_layers(nope)} scale each query by "
            f"1 + attn_scale*log1p(floor((i + 1) / floor_scale)) with i the row index of the forward's input "
            "(transformers takes torch.arange of the row, not position_ids). HDP packs several samples into a row "
            "and splits long ones over ranks, so i is not the token's position in its sample and the scale would "
            f"be wrong. Set config.attn_temperature_tuning=False (this changes the model for tokens at positions "
            f"{(floor or 1) - 1} and beyond; it is the same model while every sample and every packed row stays "
            f"under floor_scale={floor} tokens), or " + _STOCK + "."
        )
    elif getattr(config, "attn_temperature_tuning", None) is False:
        checked.append("no attention temperature tuning (attn_temperature_tuning=False)")
    elif hasattr(config, "attn_temperature_tuning"):
        checked.append("attention temperature tuning applies to NoPE layers only, and there are none")

    # --- dropout
    drops = {k: getattr(config, k) for k in _DROPOUT_KEYS if isinstance(getattr(config, k, None), (int, float))}
    drops.update({
        f"layer {_layer_index(n)}.attention_dropout": m.attention_dropout for n, m in modules
        if isinstance(getattr(m, "attention_dropout", None), (int, float)) and not isinstance(m.attention_dropout, bool)
    })
    bad = {k: v for k, v in drops.items() if v and v > 0}
    if bad:
        k, v = next(iter(bad.items()))
        problems.append(
            f"it uses attention dropout ({k}={v}) in training, which HDP's kernels do not implement (matching one "
            "process would need the same random mask per sample, head, query and key on every rank). "
            f"Set config.{k.split('.')[-1]} = 0.0 (the usual value for fine-tuning) before building the trainer."
        )
    else:
        checked.append("no attention dropout")

    # --- RoPE that depends on the batch
    for where, rope_type, limit in _rope_thresholds(config):
        if L > limit:
            problems.append(
                f"its RoPE{where} is {rope_type!r}, whose frequencies depend on the largest position in the batch once "
                f"it passes {limit}; samples reach {L} tokens, and under HDP a micro-batch mixes samples and holds "
                f"only parts of a split one, so positions past {limit} would get the wrong frequencies (it would need "
                f"each token's frequencies chosen from its own sample's length). Keep samples "
                f"within {limit} tokens, use a static scaling (rope_type 'linear', 'yarn' or 'llama3'), or {_STOCK}."
            )
        else:
            checked.append(f"RoPE {rope_type!r}{where} stays static for samples of up to {limit} tokens")

    # --- MoE
    if getattr(config, "output_router_logits", False):
        coef = getattr(config, "router_aux_loss_coef", None)
        problems.append(
            f"config.output_router_logits=True asks for the MoE router auxiliary loss (router_aux_loss_coef={coef}). "
            "That load-balancing loss is a product of batch-wide averages, so it does not split into a sum over "
            "HDP's micro-batches and ranks (it would need the per-expert counts and router probabilities "
            "all-reduced over the whole step before the product), and HDP would drop it. Set "
            "config.output_router_logits=False (HDP then "
            "trains the token-level LM loss, as transformers does with the default), or " + _STOCK + "."
        )
    elif hasattr(config, "output_router_logits"):
        checked.append("MoE: per-token routing, no router auxiliary loss (output_router_logits=False)")
        if getattr(config, "router_jitter_noise", 0):
            notes.append("router jitter noise is drawn per token in training: it is random, not packing-dependent")
    for key in ("expert_capacity", "capacity_factor", "moe_capacity_factor"):
        if getattr(config, key, None):
            problems.append(
                f"its MoE routing has an expert capacity (config.{key}={getattr(config, key)}), so which tokens an "
                f"expert drops depends on the other tokens of the batch, which HDP changes. {_STOCK_S}."
            )

    if problems:
        raise UnsupportedModelError(
            f"HDP cannot train {name} correctly:\n" + "\n".join(f"- {p}" for p in problems)
        )

    if family is None:
        status = "unverified"
        msg = (
            f"{name}: hf_hdp has not verified gradient equivalence for the {model_type!r} family (see "
            "hf_hdp.models.SUPPORTED_FAMILIES); every generic check passed, so HDP trains it, but compare a step "
            "against one process before relying on it (tests/test_model_families.py shows how)."
        )
        notes.append(msg)
        logger.warning(msg)
    else:
        status = family.status
        notes.append(family.note)
    dropout_other = [
        k for k in ("hidden_dropout", "resid_pdrop", "embd_pdrop", "residual_dropout", "embedding_dropout")
        if isinstance(getattr(config, k, None), (int, float)) and getattr(config, k) > 0
    ]
    if dropout_other:
        notes.append(f"{', '.join(dropout_other)} > 0: per-token dropout, random but not packing-dependent")
    return ModelSupport(
        model=name, model_type=model_type, family=status, max_sequence_length=L,
        checked=tuple(checked), notes=tuple(notes),
    )


__all__ = [
    "FamilySupport",
    "ModelSupport",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "check_model_supported",
    "hdp_base_model",
]


def model_heads(config) -> int | None:
    """The query heads of a decoder's attention (``text_config`` for multimodal configs); ``None`` when unknown."""
    if not hasattr(config, "num_attention_heads") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    heads = getattr(config, "num_attention_heads", None)
    return int(heads) if isinstance(heads, int) and heads > 0 else None
