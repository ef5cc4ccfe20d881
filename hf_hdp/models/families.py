"""The model families HDP knows (:data:`SUPPORTED_FAMILIES`: verified, conditional or refused, each with a note),
and the layer types it runs: its own attention, and the state-carrying layers it has adapters for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..planning.layers import GATED_DELTANET_FAMILIES, MAMBA2_FAMILIES, SHORT_CONV_FAMILIES


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
REFUSED = _R
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
        _V,
        "attention logit soft-capping (50.0) and sliding layers (4096) alternating with full ones; final logit "
        "soft-capping (30.0) per token",
    ),
    "gemma3_text": FamilySupport(
        _V, "q/k norm, local-layer RoPE; sliding layers (1024 in the released checkpoints, 512 in Gemma 3 1B)"
    ),
    "phi3": FamilySupport(
        _C,
        "fused qkv, partial rotary, sliding_window (2047 in Phi-3-mini-4k); with longrope (the 128k models) "
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
        _V,
        f"attention sinks in every layer, sliding layers (128) alternating with full ones, MoE (biased top-k "
        f"router, clamped SwiGLU experts) per token, static yarn RoPE; {_AUX}",
    ),
    "llama4_text": FamilySupport(
        _C,
        "chunked attention (8192) on its RoPE layers, NoPE full layers, q/k L2 norm, MoE with a shared expert "
        "(sigmoid top-k router) per token; only with attn_temperature_tuning=False: the released checkpoints' "
        "temperature tuning of the NoPE layers takes positions from the packed row index, not position_ids "
        "(refused; it is a no-op while every sample and packed row stays under floor_scale=8192 tokens, so "
        "setting it False then changes nothing)",
    ),
    "deepseek_v3": FamilySupport(
        _V,
        "multi-head latent attention (q/k heads of qk_nope_head_dim + qk_rope_head_dim = 192, v heads of "
        f"v_head_dim = 128: every kernel and split carries K and V at their own sizes), low-rank q/kv projections, "
        f"MoE with grouped top-k sigmoid routing and a shared expert per token (Kimi K2 shares the family); {_AUX}",
    ),
    "gemma4_text": FamilySupport(
        _V,
        "per-layer heads (global_head_dim and num_global_key_value_heads on the full layers, read per layer), "
        "attention_k_eq_v, K/V shared across layers (num_kv_shared_layers: the reusing layers attend the same rows' "
        "K/V), per-layer input embeddings (per token), sliding layers (512) beside full ones",
    ),
    # --- refused: the feature is built into the family, or the family is not verified by the tests (an entry
    # here keeps it from the generic "unverified" path: each note says why)
    "granite_swa": FamilySupport(
        _R,
        "not verified: its sinks (a post-attention sigmoid(lse - sink) scale, the same maths as a denominator "
        "logit) and sliding layers are what HDP implements, but no test compares it with one process yet",
    ),
    "granitemoe_swa": FamilySupport(_R, "not verified: sinks and sliding layers as granite_swa, plus MoE; no test yet"),
    "mimo_v2_flash": FamilySupport(
        _R,
        "not verified: sinks on its sliding layers only, which have twice the K/V heads of its full layers, and "
        "q/k and v head dims that differ; no test yet",
    ),
    "deepseek_v4": FamilySupport(
        _R,
        "compressed/indexed attention (a learned selection of which keys each query reads, over the whole "
        "sequence): not HDP's attention, it would need the indexer run over the sample's keys across ranks",
    ),
    "vaultgemma": FamilySupport(
        _R,
        "not verified: Gemma 2's attention (soft-capping, sliding layers), which HDP implements, but no test "
        "compares it with one process yet (it is trained with DP-SGD: per-sample gradient clipping, which HDP "
        "does not do)",
    ),
    # --- verified by tests/test_linear_families.py (4 gloo ranks vs 1 process, float64, the same tolerances): Gated
    # DeltaNet layers restart their state and convolution at every sample; split samples run head-parallel or the
    # state scan (hf_hdp.attention.recurrent), both forced in the tests
    "qwen3_5_text": FamilySupport(
        _V,
        "Gated DeltaNet layers (3 of every 4 in the released models) with their causal convolution, gated "
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
        _V,
        "Mamba-2 layers (grouped B/C, conv bias, D skip, grouped gated RMSNorm), attention, MLP-only and MoE "
        "layers; its logits are float32 (lm_head(...).float()), as in transformers",
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
    "lfm2": FamilySupport(
        _V, "gated short convolutions (kernel 3) restarted per sample, halos across ranks; attention"
    ),
    "lfm2_moe": FamilySupport(_V, f"LFM2's short convolutions and attention, MoE per token; {_AUX}"),
    "lfm3": FamilySupport(_V, "LFM2's gated short convolutions and attention"),
    "minimax": FamilySupport(
        _R,
        "lightning attention (linear attention with a fixed decay per head, no convolution) carries a state along "
        "the sequence; HDP's state scan and head-parallel split would run it (it is Mamba-2's state space dual form "
        "with the decay per head and no dt), but no adapter for MiniMaxLightningAttention's projections, activation, "
        "norm and output gate is written or verified yet",
    ),
    "kimi_linear": FamilySupport(
        _R,
        "Kimi Delta Attention decays its state per key channel (a vector gate per head and token), while HDP's "
        "chunked delta rule takes one decay per head and token; it would need the chunk quantities with per-channel "
        "decays (q e^c and k e^-c per channel) and an adapter for KimiLinearDeltaAttention, then the same splits",
    ),
    "t5gemma": FamilySupport(_R, "encoder-decoder: a bidirectional encoder and cross-attention, not causal attention"),
}

# layer_types HDP runs: its own causal attention, with or without a window or chunk HDP can check
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# state-carrying layer types HDP runs, per family with an adapter (hf_hdp.attention.recurrent.adapters); the families
# are the planner's (hf_hdp.planning.layers), each with the layer types its configs use
STATE_LAYER_TYPES = {
    **{f: {"linear_attention"} for f in GATED_DELTANET_FAMILIES + MAMBA2_FAMILIES},
    # Nemotron-H also has layers that are only an MLP or MoE (no token mixing); Falcon-H1's "hybrid" layers run
    # attention and a Mamba-2 mixer side by side, Zamba 2's a shared attention block beside one
    "nemotron_h": {"linear_attention", "mlp", "moe"},
    "falcon_h1": {"hybrid"},
    "zamba2": {"linear_attention", "hybrid"},
    # LFM2's gated short convolutions (a convolution only: a split sample passes its halo, no state)
    **{f: {"conv"} for f in SHORT_CONV_FAMILIES},
}
