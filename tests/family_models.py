"""Tiny models of every family HDP claims (2 layers, hidden 64, GQA where the family has it).

Each entry builds a config that exercises what is particular to the family (q/k norms, fused qkv,
partial rotary, RoPE scaling, embedding scaling, multipliers, tied embeddings, NoPE layers, MoE
routing, sliding layers whose window covers every sample) with every dropout at 0, so one process
and four ranks compute the same thing up to float64 rounding (see FLOAT32_INTERNAL for the few
weights the model itself handles in float32). Test samples are at most 60 tokens; windows are 64.
"""

from __future__ import annotations

import re

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# transformers' own SDPA attention and mask under a second key: Gemma 2 refuses attn_implementation="sdpa"
# (because of its soft-capping, off here) and its eager path takes the softmax in float32, which would
# make the float64 reference float32-accurate
from tests.models import TINY_CONFIG, VOCAB  # noqa: E402,F401  (one tiny shape for every test; VOCAB re-exported)

STOCK_SDPA = "stock_scaled_dot_product"  # no "sdpa" in the key, or transformers applies its sdpa gate
AttentionInterface.register(STOCK_SDPA, sdpa_attention_forward)
AttentionMaskInterface.register(STOCK_SDPA, sdpa_mask)

WINDOW = 64  # >= every test sample, so sliding layers are plain causal attention

_BASE = dict(TINY_CONFIG, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=False)

# model_type -> (config kwargs, reference attention implementation)
FAMILIES: dict[str, tuple[dict, str]] = {
    "llama": (dict(_BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 512}), "sdpa"),
    "qwen2": (dict(_BASE), "sdpa"),
    "qwen3": (dict(_BASE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), "sdpa"),
    "mistral": (dict(_BASE, sliding_window=WINDOW), "sdpa"),
    "ministral": (dict(_BASE, head_dim=16, sliding_window=WINDOW), "sdpa"),
    "gemma": (dict(_BASE, head_dim=32, hidden_activation="gelu_pytorch_tanh"), "sdpa"),  # head_dim != hidden/heads
    # Gemma 2's attention soft-capping is refused; with it off the family trains (final soft-capping stays on)
    "gemma2": (dict(_BASE, head_dim=16, attn_logit_softcapping=None, final_logit_softcapping=30.0,
                    sliding_window=WINDOW, query_pre_attn_scalar=24), STOCK_SDPA),
    "gemma3_text": (dict(_BASE, head_dim=16, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "phi3": (dict(_BASE, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                           "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0],
                                           "original_max_position_embeddings": 1024},
                  original_max_position_embeddings=1024), "sdpa"),
    "olmo2": (dict(_BASE), "sdpa"),
    "olmo3": (dict(_BASE, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "mixtral": (dict(_BASE, **_MOE, router_jitter_noise=0.0), "sdpa"),
    "qwen2_moe": (dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, output_router_logits=False, norm_topk_prob=False), "sdpa"),
    "qwen3_moe": (dict(_BASE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       output_router_logits=False, norm_topk_prob=True), "sdpa"),
    "olmoe": (dict(_BASE, num_experts=4, num_experts_per_tok=2, output_router_logits=False), "sdpa"),
    "starcoder2": (dict(_BASE, sliding_window=WINDOW, residual_dropout=0.0, embedding_dropout=0.0), "sdpa"),
    "cohere": (dict(_BASE, logit_scale=0.5, use_qk_norm=True), "sdpa"),
    "granite": (dict(_BASE, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                     logits_scaling=4.0), "sdpa"),
    "phi": (dict(_BASE, resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=0.5, qk_layernorm=True), "sdpa"),
    "gpt_neox": (dict(_BASE, num_key_value_heads=None, hidden_dropout=0.0, rotary_pct=0.5,
                      use_parallel_residual=True), "sdpa"),
    "glm": (dict(_BASE, head_dim=16, partial_rotary_factor=0.5), "sdpa"),
    "smollm3": (dict(_BASE, no_rope_layer_interval=2), "sdpa"),
}
# Parameters whose gradient the model itself computes in float32 whatever the model's dtype: Gemma's RMSNorm
# and Cohere's LayerNorm upcast to float32 and multiply by the weight there, so these gradients are sums of
# float32 products, and summing the same tokens in another grouping (per sample vs per micro-batch) moves
# them by ~1e-7 of their size. Every other parameter of these families is checked at the float64 tolerance.
FLOAT32_INTERNAL = {
    fam: re.compile(r"norm\.weight$") for fam in ("gemma", "gemma2", "gemma3_text", "cohere")
}

# families whose equivalence the issue names explicitly
REQUIRED = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "olmo2", "mixtral", "qwen2_moe")


# None means "leave the config's default" except for these keys, where None turns a feature off
_KEEP_NONE = {"attn_logit_softcapping", "sliding_window", "final_logit_softcapping"}


def family_config(family: str, **overrides):
    """The tiny config of ``family`` (a ``model_type``), with ``overrides`` on top."""
    kwargs, _ = FAMILIES[family]
    kwargs = {k: v for k, v in dict(kwargs, **overrides).items() if v is not None or k in _KEEP_NONE}
    return AutoConfig.for_model(family, **kwargs)


def save_family_model(family: str, path: str, seed: int = 0) -> str:
    """Build a randomly initialised tiny ``family`` model and ``save_pretrained`` it to ``path``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family))
    model.save_pretrained(path)
    return path


# torch's grouped_mm (transformers' default MoE experts kernel) has no float64: the tests run the eager experts
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def load_family_model(path: str, family: str, dtype=torch.float64, attn: str | None = None):
    """``from_pretrained`` with the family's reference attention (the workers switch it to "hdp")."""
    attn = attn or FAMILIES[family][1]
    extra = {"experts_implementation": "eager"} if family in MOE and dtype == torch.float64 else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **extra)
