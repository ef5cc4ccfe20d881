"""Which transformers model families HDP trains correctly, and the checks that refuse the rest.

HDP packs several samples into one row and splits long samples over ranks. Its ``"hdp"`` attention
(:mod:`hf_hdp.attention.interface`) keeps samples apart and runs causal attention over each whole
sample, so a model trains exactly as on one device when every part of it that mixes tokens is that
attention, and everything else works token by token (norms, MLPs, per-token MoE routing, RoPE from
global ``position_ids``). :func:`check_model_supported` inspects the config and the attention
modules for the features that break this, and raises :class:`UnsupportedModelError` naming the
model, the layer feature and what to do instead. It never lets a model train silently wrong:

- **sliding window** smaller than the longest sample (HDP's kernels attend over the whole sample);
  a window at least as long as every sample is plain causal attention and is accepted;
- **chunked attention** (Llama 4's ``attention_chunk_size``), the same way;
- **attention logit soft-capping** (Gemma 2's ``attn_logit_softcapping``); the *final* logit
  soft-capping works on each token's logits and is fine;
- **attention sinks** (gpt-oss and others: a ``sinks`` parameter per attention layer);
- **non-causal attention** (encoder-decoder models, bidirectional attention, encoders);
- **attention dropout** > 0 (HDP's kernels have no dropout); other dropouts are per token and fine;
- **layers that are not attention** but mix tokens (linear attention, Mamba, convolutions), which
  would carry state from one packed sample into the next and lose it where a sample is split;
- **RoPE whose frequencies depend on the batch** (``dynamic`` NTK, ``longrope``) once a sample is
  longer than the original context: they pick frequencies from the largest position in the
  micro-batch, which under HDP mixes samples and holds only parts of a split one;
- **MoE router auxiliary loss** (``output_router_logits=True``): the load-balancing loss is a
  product of batch-wide averages, not a sum over tokens, so it does not split over micro-batches
  and ranks; HDP trains the token-level LM loss only, which is also what transformers trains with
  ``output_router_logits=False`` (the default). MoE routing itself is per token (top-k over each
  token's router logits, no expert capacity), so packing does not change it.
- **multimodal** models (vision/audio towers, M-RoPE position ids): HDP packs text tokens only.

:data:`SUPPORTED_FAMILIES` records what ``tests/test_model_families.py`` verified: 4 CPU ranks
against one process, loss and every gradient, float64. A family not listed there is allowed when
every check passes, with a warning that its equivalence has not been verified; a family listed as
refused is refused whatever its config says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

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
      note says which).
    - ``"refused"``: the family needs a feature HDP does not implement.
    """

    status: Literal["verified", "conditional", "refused"]
    note: str


_V, _C, _R = "verified", "conditional", "refused"
_AUX = "output_router_logits must stay False (the router aux loss is refused)"

SUPPORTED_FAMILIES: dict[str, FamilySupport] = {
    # --- verified by tests/test_model_families.py: loss and every gradient, 4 gloo ranks vs 1 process,
    # float64, within 1e-9 of each gradient's largest element
    "llama": FamilySupport(_V, "GQA; static RoPE scaling (llama3, linear, yarn)"),
    "qwen2": FamilySupport(_V, "GQA, q/k/v bias; sliding layers (use_sliding_window) need samples within the window"),
    "qwen3": FamilySupport(_V, "GQA, per-head q/k RMSNorm; sliding layers need samples within the window"),
    "mistral": FamilySupport(
        _C, "GQA; sliding_window (4096 in Mistral 7B v0.1, None from v0.2) must be None or at least the longest sample"
    ),
    "ministral": FamilySupport(_C, "GQA; every layer slides: samples must fit within sliding_window"),
    "gemma": FamilySupport(_V, "GQA, sqrt(hidden) embedding scale, head_dim apart from hidden size, tied embeddings"),
    "gemma2": FamilySupport(
        _C,
        "only with attn_logit_softcapping=None (its 50.0 is refused) and samples within sliding_window (4096); "
        "the final logit soft-capping is per token and fine",
    ),
    "gemma3_text": FamilySupport(
        _C, "q/k norm, local-layer RoPE; samples must fit within sliding_window (1024 in the released checkpoints, "
        "512 in Gemma 3 1B)"
    ),
    "phi3": FamilySupport(
        _C, "fused qkv, partial rotary; samples within sliding_window (2047 in Phi-3-mini-4k) and, with longrope "
        "(the 128k models), within original_max_position_embeddings (4096)",
    ),
    "olmo2": FamilySupport(_V, "GQA, q/k RMSNorm over all heads, post-norm blocks"),
    "olmo3": FamilySupport(_C, "sliding layers: samples must fit within sliding_window (4096)"),
    "mixtral": FamilySupport(_V, f"MoE, top-2 per token (also float32 with grouped_mm experts); {_AUX}"),
    "qwen2_moe": FamilySupport(_V, f"MoE with a gated shared expert, per token; {_AUX}"),
    "qwen3_moe": FamilySupport(_V, f"MoE, q/k norm, per token; {_AUX}"),
    "olmoe": FamilySupport(_V, f"MoE, q/k norm, per token; {_AUX}"),
    "starcoder2": FamilySupport(
        _V, "GQA, biases, LayerNorm; sliding_window must be None or at least the longest sample"
    ),
    "cohere": FamilySupport(_V, "parallel attention/MLP block, q/k LayerNorm, logit scale, tied embeddings"),
    "granite": FamilySupport(_V, "embedding, residual, attention and logit multipliers"),
    "phi": FamilySupport(_V, "partial rotary, q/k LayerNorm, parallel block, biases"),
    "gpt_neox": FamilySupport(_V, "fused qkv, partial rotary, parallel residual (no GQA)"),
    "glm": FamilySupport(_V, "partial rotary, fused gate/up"),
    "smollm3": FamilySupport(_V, "NoPE layers (no rotary on every 4th layer)"),
    # --- refused: the feature is built into the family
    "gpt_oss": FamilySupport(_R, "attention sinks in every layer (and a 128-token sliding window)"),
    "granite_swa": FamilySupport(_R, "attention sinks"),
    "granitemoe_swa": FamilySupport(_R, "attention sinks"),
    "mimo_v2_flash": FamilySupport(_R, "attention sinks"),
    "deepseek_v4": FamilySupport(_R, "attention sinks and compressed/indexed attention"),
    "vaultgemma": FamilySupport(_R, "attention logit soft-capping (50.0) by default, like Gemma 2"),
    "qwen3_next": FamilySupport(_R, "linear-attention (Gated DeltaNet) layers carry state across tokens"),
    "minimax": FamilySupport(_R, "lightning (linear) attention layers carry state across tokens"),
    "lfm2": FamilySupport(_R, "short convolution layers mix neighbouring tokens outside attention"),
    "t5gemma": FamilySupport(_R, "encoder-decoder"),
    "llama4_text": FamilySupport(
        _R, "the attention temperature tuning of its NoPE layers takes positions from the row index, not "
        "position_ids, so packing and splitting change it; chunked attention (8192) besides"
    ),
}

# layer_types HDP runs: its own causal attention, with or without a window or chunk HDP can check
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
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


def _sliding_layers(config) -> dict[int, int]:
    """Layer -> sliding window, from the config (``layer_types``, else ``use_sliding_window``).

    The config is the source of truth: transformers builds the sliding masks from it. Layer modules
    are no guide (Exaone 4 keeps ``sliding_window`` on its full-attention layers too).
    """
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        return {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {i: window for i, t in enumerate(layer_types) if t == "sliding_attention"}
    if getattr(config, "use_sliding_window", True) is False:
        return {}
    return {i: window for i in range(getattr(config, "num_hidden_layers", None) or 1)}


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
    without one); sliding windows, chunked attention and batch-dependent RoPE are accepted when no
    sample reaches past them.

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
    if base is not None and not getattr(base, "_supports_attention_backend", False):
        problems.append(
            f"{type(base).__name__} does not route its attention through transformers' AttentionInterface, so HDP "
            "cannot keep packed samples apart or split them over ranks. Use a model class that sets "
            "`_supports_attention_backend = True` (Llama, Qwen2, Mistral, ...), or " + _STOCK + "."
        )
    checked.append("decoder-only causal LM routed through AttentionInterface")

    # --- layers that mix tokens outside attention
    layer_types = list(getattr(config, "layer_types", None) or [])
    others = sorted({str(t) for t in layer_types} - _ATTENTION_LAYER_TYPES)
    if others:
        idx = [i for i, t in enumerate(layer_types) if t not in _ATTENTION_LAYER_TYPES]
        problems.append(
            f"{_layers(idx, 'is', 'are')} of type {others}: they mix tokens outside the attention interface "
            "(linear attention, state-space or convolution layers), so packed samples would leak into each other "
            f"and a sample split over ranks would lose its state. {_STOCK_S}."
        )
    hybrid = [k for k in _HYBRID_KEYS if getattr(config, k, None)]
    if hybrid:
        problems.append(
            f"config.{hybrid[0]} declares non-attention (hybrid) layers that mix tokens outside the attention "
            f"interface. {_STOCK_S}."
        )
    checked.append("every layer that mixes tokens is attention")

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

    # --- sliding window / chunked attention
    windows = _sliding_layers(config)
    short = sorted(k for k, w in windows.items() if w < L)
    if short:
        w = min(windows[k] for k in short)
        problems.append(
            f"{_layers(short, 'uses', 'use')} sliding-window attention with a window of {w} tokens but samples reach "
            f"{L} tokens; HDP's kernels attend over the whole sample and would train these layers wrongly. Keep "
            f"every sample within {w} tokens "
            "(truncate or filter the dataset), or " + _STOCK + ". (Setting config.sliding_window=None changes the "
            "model's attention: only do it if the model was trained with full attention at this length.)"
        )
    elif windows:
        checked.append(f"sliding windows ({min(windows.values())}+ tokens) cover every sample of up to {L} tokens")
    chunk = getattr(config, "attention_chunk_size", None)
    if isinstance(chunk, int) and chunk > 0 and chunk < L:
        problems.append(
            f"it uses chunked attention (attention_chunk_size={chunk}) but samples reach {L} tokens; HDP attends "
            f"over whole samples. Keep every sample within {chunk} tokens, or " + _STOCK + "."
        )

    # --- soft-capping, sinks
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        problems.append(
            f"its attention uses logit soft-capping (config.attn_logit_softcapping={softcap}), which HDP's kernels do "
            "not implement. Train it with the stock Trainer and attn_implementation='eager', or set "
            "attn_logit_softcapping=None (this changes the model)."
        )
    else:
        checked.append("no attention logit soft-capping")
    if getattr(config, "final_logit_softcapping", None) is not None:
        notes.append("final logit soft-capping works on each token's logits and is honoured")
    sinks = [_layer_index(n) for n, m in modules if getattr(m, "sinks", None) is not None]
    if sinks:
        problems.append(
            f"attention {_layers(sinks, 'has', 'have')} attention sinks (a learned `sinks` logit per head), which "
            "HDP's kernels do not implement. Train it with the stock Trainer and attn_implementation='eager'."
        )
    else:
        checked.append("no attention sinks")

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
            f"it uses attention dropout ({k}={v}) in training, which HDP's kernels do not implement. "
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
                f"only parts of a split one, so positions past {limit} would get the wrong frequencies. Keep samples "
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
            "HDP's micro-batches and ranks, and HDP would drop it. Set config.output_router_logits=False (HDP then "
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
