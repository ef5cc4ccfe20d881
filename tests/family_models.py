"""Tiny models of every family HDP claims (2 layers, hidden 64, GQA where the family has it).

Each entry of :data:`FAMILIES` builds a config that exercises what is particular to the family (q/k
norms, fused qkv, partial rotary, RoPE scaling, embedding scaling, multipliers, tied embeddings,
NoPE layers, MoE routing, sliding layers) with every dropout at 0, so one process and four ranks
compute the same thing up to float64 rounding (see FLOAT32_INTERNAL for the few weights the model
itself handles in float32). Test samples are 2 to 60 tokens; the families' own windows are 64
(plain causal attention at these lengths).

:data:`FEATURES` adds models whose attention features bite at these lengths: sliding windows of 8
tokens (Gemma 3, Gemma 2, Mistral, Qwen2, gpt-oss), attention logit soft-capping (Gemma 2),
attention sinks (gpt-oss) and chunked attention of 8 tokens (Llama 4), so the test samples are many
windows long and split samples have windows crossing rank boundaries. Their single-process side runs
:data:`DENSE_REFERENCE`, an independent dense float64 attention over transformers' own 4-D masks
(which honour sliding and chunked layers), with soft-capping and sinks applied as the families'
eager attentions do.
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
from tests.models import TINY_CONFIG, VOCAB

STOCK_SDPA = "stock_scaled_dot_product"  # no "sdpa" in the key, or transformers applies its sdpa gate
AttentionInterface.register(STOCK_SDPA, sdpa_attention_forward)
AttentionMaskInterface.register(STOCK_SDPA, sdpa_mask)

WINDOW = 64  # >= every test sample: these sliding layers are plain causal attention (the window is dropped)
SMALL = 8  # a window / attention chunk much shorter than the test samples (2 to 60 tokens)
SOFTCAP = 2.0  # a cap the tiny models' scores reach (Gemma 2's 50.0 would change nothing at this scale)


def dense_reference_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None, **kwargs
):
    """Dense attention in the model's dtype (float64 here), the single-process reference of the feature cases.

    ``attention_mask``: transformers' 4-D mask for the layer kind (boolean, True = attend, from
    ``sdpa_mask``; or additive), or None when the mask function found plain causal attention (then
    causal, aligned at the end). ``softcap``: ``softcap * tanh(scores / softcap)`` on the scaled scores,
    before the mask (Gemma 2). ``s_aux``: one logit per head joining each row's softmax denominator
    and dropped after it (gpt-oss's sinks). GQA by repeating K/V heads; no dropout.
    """
    if dropout:
        raise ValueError("the dense reference has no attention dropout")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_len, kv_len = scores.shape[-2:]
    if attention_mask is None:
        rows = torch.arange(q_len, device=scores.device)[:, None] + (kv_len - q_len)
        scores = scores.masked_fill(torch.arange(kv_len, device=scores.device)[None, :] > rows, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :kv_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :kv_len].to(scores.dtype)
    if s_aux is not None:
        sink = s_aux.to(scores.dtype).reshape(1, -1, 1, 1).expand(scores.shape[0], -1, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), probs


DENSE_REFERENCE = "dense_float64_reference"  # no "sdpa"/"flash" in the key: transformers applies no gate
AttentionInterface.register(DENSE_REFERENCE, dense_reference_attention)
AttentionMaskInterface.register(DENSE_REFERENCE, sdpa_mask)  # sliding / chunked masks per layer kind

_BASE = dict(TINY_CONFIG, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=False)
# DeepSeek-V3's multi-head latent attention at the tiny scale, and its MoE (top-2 of 4 in 2 groups, a shared expert)
_DEEPSEEK = dict(
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=2,
    output_router_logits=False,
)

# model_type -> (config kwargs, reference attention implementation)
FAMILIES: dict[str, tuple[dict, str]] = {
    "llama": (
        dict(
            _BASE,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            },
        ),
        "sdpa",
    ),
    "qwen2": (dict(_BASE), "sdpa"),
    "qwen3": (dict(_BASE, head_dim=16, use_sliding_window=True, sliding_window=SMALL, max_window_layers=1), "sdpa"),
    "mistral": (dict(_BASE, sliding_window=WINDOW), "sdpa"),
    "ministral": (dict(_BASE, head_dim=16, sliding_window=SMALL), "sdpa"),
    "gemma": (dict(_BASE, head_dim=32, hidden_activation="gelu_pytorch_tanh"), "sdpa"),  # head_dim != hidden/heads
    # Gemma 2 with its attention soft-capping off (final soft-capping on); FEATURES has it on, with a small window
    "gemma2": (
        dict(
            _BASE,
            head_dim=16,
            attn_logit_softcapping=None,
            final_logit_softcapping=30.0,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
        ),
        STOCK_SDPA,
    ),
    "gemma3_text": (
        dict(_BASE, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
        "sdpa",
    ),
    "phi3": (
        dict(
            _BASE,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.1, 1.2, 1.3],
                "long_factor": [2.0, 3.0, 4.0, 5.0],
                "original_max_position_embeddings": 1024,
            },
            original_max_position_embeddings=1024,
            sliding_window=SMALL,
        ),
        "sdpa",
    ),
    "olmo2": (dict(_BASE), "sdpa"),
    "olmo3": (dict(_BASE, sliding_window=SMALL, layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "mixtral": (dict(_BASE, **_MOE, router_jitter_noise=0.0), "sdpa"),
    "qwen2_moe": (
        dict(
            _BASE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            output_router_logits=False,
            norm_topk_prob=False,
        ),
        "sdpa",
    ),
    "qwen3_moe": (
        dict(
            _BASE,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            output_router_logits=False,
            norm_topk_prob=True,
        ),
        "sdpa",
    ),
    "olmoe": (dict(_BASE, num_experts=4, num_experts_per_tok=2, output_router_logits=False), "sdpa"),
    "starcoder2": (dict(_BASE, sliding_window=SMALL, residual_dropout=0.0, embedding_dropout=0.0), "sdpa"),
    "cohere": (dict(_BASE, logit_scale=0.5, use_qk_norm=True), "sdpa"),
    "granite": (
        dict(_BASE, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
        "sdpa",
    ),
    "phi": (dict(_BASE, resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=0.5, qk_layernorm=True), "sdpa"),
    "gpt_neox": (
        dict(_BASE, num_key_value_heads=None, hidden_dropout=0.0, rotary_pct=0.5, use_parallel_residual=True),
        "sdpa",
    ),
    "glm": (dict(_BASE, head_dim=16, partial_rotary_factor=0.5), "sdpa"),
    "smollm3": (dict(_BASE, no_rope_layer_interval=2), "sdpa"),
    # gpt-oss: a sink per head in every layer, sliding layers (here 8 tokens) alternating with full ones, MoE
    # (top-2 of 4 per token, biased router, clamped SwiGLU experts), static yarn RoPE; sinks randomised (PREPARE)
    "gpt_oss": (
        dict(_BASE, head_dim=16, **_MOE, sliding_window=SMALL, layer_types=["sliding_attention", "full_attention"]),
        DENSE_REFERENCE,
    ),
    # Llama 4 (text): layer 0 RoPE + chunked attention (8 tokens) + q/k L2 norm + dense MLP; layer 1 NoPE + full
    # attention + MoE (top-2 of 4, sigmoid router, shared expert); temperature tuning off (it is refused)
    "llama4_text": (
        dict(
            _BASE,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=32,
            intermediate_size_mlp=128,
            interleave_moe_layer_step=2,
            no_rope_layers=[1, 0],
            attention_chunk_size=SMALL,
            attn_temperature_tuning=False,
            use_qk_norm=True,
            output_router_logits=False,
        ),
        DENSE_REFERENCE,
    ),
    # DeepSeek-V3 (multi-head latent attention): q/k heads of 24 (nope 16 + rope 8, interleaved RoPE) beside v heads
    # of 16, low-rank q and kv projections; both layers dense here (first_k_dense_replace=2): its MoE router takes
    # float32 gates, see the "deepseek_v3-moe" feature case
    "deepseek_v3": (dict(_BASE, num_key_value_heads=4, **_DEEPSEEK), "sdpa"),
    # Gemma 4 (text): per-layer heads (sliding layers 2 K/V heads of 16, the full layers 1 K/V head of 32 with
    # attention_k_eq_v: V is K's projection), the last layer reusing the full layer's K/V (num_kv_shared_layers),
    # per-layer input embeddings, a window of 8 tokens (far shorter than the samples), proportional partial RoPE
    "gemma4_text": (
        dict(
            _BASE,
            num_hidden_layers=3,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            num_kv_shared_layers=1,
            sliding_window=SMALL,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
            hidden_activation="gelu_pytorch_tanh",
        ),
        "sdpa",
    ),
}

# feature case -> (model_type, config kwargs, reference attention): the families' features at lengths where they
# bite, beside the FAMILIES entries (which stay as they are)
FEATURES: dict[str, tuple[str, dict, str]] = {
    "gemma3_text-window8": ("gemma3_text", dict(FAMILIES["gemma3_text"][0], sliding_window=SMALL), DENSE_REFERENCE),
    "gemma2-softcap-window8": (
        "gemma2",
        dict(FAMILIES["gemma2"][0], attn_logit_softcapping=SOFTCAP, sliding_window=SMALL),
        DENSE_REFERENCE,
    ),
    "mistral-window8": ("mistral", dict(_BASE, sliding_window=SMALL), DENSE_REFERENCE),
    "qwen2-window8": (
        "qwen2",
        dict(_BASE, use_sliding_window=True, sliding_window=SMALL, max_window_layers=1),
        DENSE_REFERENCE,
    ),
    # DeepSeek-V3 with its MoE layer (layer 1): sigmoid router in float32, grouped top-k, a shared expert
    "deepseek_v3-moe": ("deepseek_v3", dict(FAMILIES["deepseek_v3"][0], first_k_dense_replace=1), "sdpa"),
}

# every model the tests build: name -> (model_type, config kwargs, reference attention)
MODELS: dict[str, tuple[str, dict, str]] = {
    **{family: (family, kwargs, attn) for family, (kwargs, attn) in FAMILIES.items()},
    **FEATURES,
}


def model_type_of(name: str) -> str:
    """The ``model_type`` of a model of :data:`MODELS` (a family, or a feature case of one)."""
    return MODELS[name][0]


def _scale_qk(factor: float):
    """Scale every q/k projection so the tiny model's attention scores reach the soft-cap (|scores| ~ 1-5)."""

    def prepare(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if re.search(r"\.(q_proj|k_proj)\.weight$", name):
                    p.mul_(factor)

    return prepare


def _random_sinks(model):
    """gpt-oss initialises its sinks at N(0, 0.02): make them differ per head and layer, N(0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.normal_(0.0, 1.0)


# applied right after the random initialisation (same seed), before saving
PREPARE = {"gemma2-softcap-window8": _scale_qk(4.0), "gpt_oss": _random_sinks}
# Parameters whose gradient the model itself computes in float32 whatever the model's dtype: Gemma's RMSNorm
# and Cohere's LayerNorm upcast to float32 and multiply by the weight there, so these gradients are sums of
# float32 products, and summing the same tokens in another grouping (per sample vs per micro-batch) moves
# them by ~1e-7 of their size. Every other parameter of these families is checked at the float64 tolerance.
# Keyed by model_type (feature cases of a family share its entry). (gpt-oss normalises in float32 too, but
# multiplies by the float64 weight, so its norm weights' gradients are float64 sums and need no entry.)
FLOAT32_INTERNAL = {
    fam: re.compile(r"norm\.weight$") for fam in ("gemma", "gemma2", "gemma3_text", "gemma4_text", "cohere")
}
# Families whose forward rounds a value that the whole model depends on to float32, so their loss and every gradient
# are float32-accurate rather than float64-accurate. model_type -> relative tolerance of the loss and of every
# gradient (to its largest element). Llama 4's router takes its sigmoid gates in float32
# (``sigmoid(router_scores.float())``, transformers 5.24 and 5.25 alike). torch's CPU float32 sigmoid rounds an
# element differently (one float32 ulp) in its vectorised loop body and in its tail, so a token's gate depends on
# the length of the tensor it is computed in and on the CPU's vector width (AVX-512 vs AVX2). One process routes
# each sample alone, HDP routes packed micro-batches, so a few tokens get gates one ulp (6e-8) apart. This
# moves the loss by about 3e-12 and those tokens' embedding-gradient rows by 8e-8 of their size. With the gates
# taken in float64 instead, Llama 4 matches at the float64 tolerances. 8 float32 ulps (about 1e-6) bounds a
# relative gate error of a few ulps, and a chunked-attention fault (1e-2) is still far outside it.
FLOAT32_GATES = {"llama4_text": 8 * torch.finfo(torch.float32).eps}
# DeepSeek-V3's router takes its sigmoid gates in float32 too (F.linear and sigmoid on float32 copies), keyed by case:
# its dense case stays at the float64 tolerances
FLOAT32_GATES["deepseek_v3-moe"] = FLOAT32_GATES["llama4_text"]
# Gemma 4 normalises every hidden state and every q/k/v head in float32 (Gemma4RMSNorm: hidden.float(), mean of
# squares, pow(-0.5), back to the model dtype), so the float64 model is float32-accurate throughout: packing two
# samples into one row on ONE process, with no split at all, already moves its gradients by ~1e-7 of their size (the
# loss stays within 1e-12). HDP's own attention is float64-exact (deepseek_v3 and the kernel tests); a wrong mask,
# head size or shared K/V would show at 1e-2.
FLOAT32_GATES["gemma4_text"] = FLOAT32_GATES["llama4_text"]

# families whose equivalence the issue names explicitly
REQUIRED = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "olmo2", "mixtral", "qwen2_moe")


# None means "leave the config's default" except for these keys, where None turns a feature off
_KEEP_NONE = {"attn_logit_softcapping", "sliding_window", "final_logit_softcapping"}


def family_config(family: str, **overrides):
    """The tiny config of ``family`` (a ``model_type`` of FAMILIES, or a FEATURES case), with ``overrides`` on top."""
    model_type, kwargs, _ = MODELS[family]
    kwargs = {k: v for k, v in dict(kwargs, **overrides).items() if v is not None or k in _KEEP_NONE}
    return AutoConfig.for_model(model_type, **kwargs)


def build_family_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised tiny model of ``family`` (a FAMILIES or FEATURES name), PREPARE applied."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides))
    if family in PREPARE:
        PREPARE[family](model)
    return model


def save_family_model(family: str, path: str, seed: int = 0) -> str:
    """Build a randomly initialised tiny ``family`` model and ``save_pretrained`` it to ``path``."""
    build_family_model(family, seed).save_pretrained(path)
    return path


# torch's grouped_mm (transformers' default MoE experts kernel) has no float64: the tests run the eager experts
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")


def load_family_model(path: str, family: str, dtype=torch.float64, attn: str | None = None):
    """``from_pretrained`` with the model's reference attention (the workers switch it to "hdp")."""
    attn = attn or MODELS[family][2]
    extra = {"experts_implementation": "eager"} if model_type_of(family) in MOE and dtype == torch.float64 else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **extra)
