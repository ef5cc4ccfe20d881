""":func:`check_model_supported`: every check of a model against HDP's assumptions, one function per topic.

Each ``_check_*`` reads the config (and the model's modules, when it has them) and adds to one
:class:`_Findings`: the problems that refuse the model, what was checked, and notes for an accepted model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .families import ATTENTION_LAYER_TYPES, REFUSED, STATE_LAYER_TYPES, SUPPORTED_FAMILIES
from .inspection import (
    STOCK,
    attention_modules,
    encoder_decoder_problem,
    layer_index,
    layer_list,
    layers_dropping_kwargs,
    model_name,
    rope_thresholds,
    routing_problem,
    unsupported,
    unwrap,
)

logger = logging.getLogger("hf_hdp.models")

_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
_TOKEN_DROPOUT_KEYS = ("hidden_dropout", "resid_pdrop", "embd_pdrop", "residual_dropout", "embedding_dropout")
_HYBRID_KEYS = ("layers_block_type", "hybrid_override_pattern", "layer_block_types", "block_types")
_MULTIMODAL_KEYS = ("vision_config", "audio_config", "text_config", "vision_tower_config")
_CAPACITY_KEYS = ("expert_capacity", "capacity_factor", "moe_capacity_factor")
_STOCK_S = STOCK[0].upper() + STOCK[1:]


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


@dataclass
class _Findings:
    """What the checks found: ``problems`` refuse the model; ``checked`` and ``notes`` describe an accepted one."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
    config, base = unwrap(model)
    model_type = getattr(config, "model_type", None) or "?"
    name = model_name(config, base)
    modules = attention_modules(base)
    found = _Findings()
    family = SUPPORTED_FAMILIES.get(model_type)
    if family is not None and family.status == REFUSED:
        found.problems.append(f"the {model_type} family is not supported: {family.note}; {STOCK}.")
    _check_model_kind(config, base, modules, found)
    _check_token_mixers(config, model_type, found)
    _check_causality(config, modules, found)
    _record_attention_features(config, modules, max_sequence_length, found)
    _check_temperature_tuning(config, found)
    _check_dropout(config, modules, found)
    _check_rope(config, max_sequence_length, found)
    _check_moe(config, found)
    if found.problems:
        raise unsupported(name, found.problems)
    status = _family_status(name, model_type, found)
    per_token = [
        k for k in _TOKEN_DROPOUT_KEYS if isinstance(getattr(config, k, None), (int, float)) and getattr(config, k) > 0
    ]
    if per_token:
        found.notes.append(f"{', '.join(per_token)} > 0: per-token dropout, random but not packing-dependent")
    return ModelSupport(
        model=name,
        model_type=model_type,
        family=status,
        max_sequence_length=max_sequence_length,
        checked=tuple(found.checked),
        notes=tuple(found.notes),
    )


def _family_status(name: str, model_type: str, found: _Findings) -> str:
    """The family's status for an accepted model (``"unverified"``, with a warning, for a family not listed), and
    the notes that go with it."""
    family = SUPPORTED_FAMILIES.get(model_type)
    if family is None:
        status = "unverified"
        msg = (
            f"{name}: hf_hdp has not verified gradient equivalence for the {model_type!r} family (see "
            "hf_hdp.models.SUPPORTED_FAMILIES); every generic check passed, so HDP trains it, but compare a step "
            "against one process before relying on it (tests/test_model_families.py shows how)."
        )
        found.notes.append(msg)
        logger.warning(msg)
    else:
        status = family.status
        found.notes.append(family.note)
    return status


def _check_model_kind(config, base, modules, found: _Findings) -> None:
    """A decoder-only, text-only causal LM whose attention (and the layers calling it) HDP can take over."""
    problem = encoder_decoder_problem(config)
    if problem:
        found.problems.append(problem)
    multimodal = [k for k in _MULTIMODAL_KEYS if getattr(config, k, None) is not None]
    if multimodal:
        found.problems.append(
            f"it is a composite (multimodal) model ({', '.join(multimodal)}); HDP packs text tokens with 1-D positions "
            "only. Load the text-only causal LM of the family (e.g. Gemma3ForCausalLM), or " + STOCK + "."
        )
    if base is not None:
        problem = routing_problem(base)
        dropping = [] if problem else layers_dropping_kwargs(base, modules)
        if dropping:
            problem = (
                f"{dropping[0]}.forward calls its attention without passing on its keyword arguments (**kwargs), so "
                "the packing metadata HDP hands the model's forward never reaches the attention (transformers' "
                f"{type(base).__name__} drops them). {_STOCK_S}, or use a transformers release whose decoder layer "
                "passes **kwargs to its attention."
            )
        if problem:
            found.problems.append(problem)
    found.checked.append("decoder-only causal LM routed through AttentionInterface")


def _check_token_mixers(config, model_type: str, found: _Findings) -> None:
    """Every layer that mixes tokens is attention, or a state-carrying layer HDP has an adapter for."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    stateful = STATE_LAYER_TYPES.get(model_type, set())
    others = sorted({str(t) for t in layer_types} - ATTENTION_LAYER_TYPES - stateful)
    linear = [i for i, t in enumerate(layer_types) if t in stateful and t not in ("mlp", "moe")]
    if linear:
        found.checked.append(
            f"state-carrying {layer_list(linear)}: the state and the convolution restart at every sample, and a split "
            "sample passes its state head-parallel or by a state scan (hf_hdp.attention.recurrent)"
        )
    if others:
        idx = [i for i, t in enumerate(layer_types) if t not in ATTENTION_LAYER_TYPES]
        found.problems.append(
            f"{layer_list(idx, 'is', 'are')} of type {others}: they mix tokens outside the attention interface "
            "(linear attention, state-space or convolution layers) and carry a recurrent state (or a convolution "
            "window) along the sequence, so packed samples would leak into each other and a sample split over ranks "
            f"would lose its state. HDP resets and passes such state (hf_hdp.attention.recurrent) only for the "
            f"layers it has an adapter for (Gated DeltaNet, Mamba-2, short convolutions: "
            f"{', '.join(sorted(STATE_LAYER_TYPES))}); the "
            f"{model_type} family has no adapter for these layers yet. {_STOCK_S}."
        )
    hybrid = [k for k in _HYBRID_KEYS if getattr(config, k, None)]
    if hybrid and model_type not in STATE_LAYER_TYPES:  # those families' layer_types say what each layer is
        found.problems.append(
            f"config.{hybrid[0]} declares non-attention (hybrid) layers that mix tokens outside the attention "
            "interface and carry a recurrent state along the sequence (packing would need it reset at sample "
            f"boundaries, splitting would need it passed between ranks). {_STOCK_S}."
        )
    found.checked.append("every layer that mixes tokens is attention or a state-carrying layer HDP runs")


def _check_causality(config, modules, found: _Findings) -> None:
    """HDP's kernels are causal: bidirectional attention and encoder layers are refused."""
    bidirectional = getattr(config, "use_bidirectional_attention", None)
    if bidirectional:
        found.problems.append(
            "config.use_bidirectional_attention is set: its attention is not causal and HDP computes causal attention "
            "only. Set use_bidirectional_attention=False (a causal LM), or " + STOCK + "."
        )
    non_causal = [layer_index(n) for n, m in modules if m.is_causal is False]
    if non_causal and not bidirectional:
        found.problems.append(
            f"attention {layer_list(non_causal, 'is', 'are')} non-causal (is_causal=False, an encoder); HDP computes "
            f"causal decoder attention only. {_STOCK_S}."
        )
    found.checked.append("causal attention")


def _record_attention_features(config, modules, longest: int, found: _Findings) -> None:
    """Sliding windows, chunked attention, soft-capping and sinks: implemented by the "hdp" attention, recorded.

    The config is the source of truth (transformers builds the masks from it; layer modules are no guide: Exaone 4
    keeps sliding_window on its full layers too), read the way the attention and the planner read it."""
    from hf_hdp.planning.reach import layer_masks

    masks = layer_masks(config)
    for kind, verb in (("window", ("slides", "slide")), ("chunk", ("attends", "attend"))):
        by_size: dict[int, list[int]] = {}
        for i, m in enumerate(masks):
            if getattr(m, kind) is not None:
                by_size.setdefault(getattr(m, kind), []).append(i)
        for size, idx in sorted(by_size.items()):
            what = (
                f"over {size} tokens"
                if kind == "window"
                else (f"within chunks of {size} tokens (counted from each sample's first token)")
            )
            if size < longest:
                found.checked.append(
                    f"{layer_list(idx, *verb)} {what}: {kind}ed kernels, and ring pieces exchange "
                    f"only the rows a {kind} reaches"
                )
            else:
                found.checked.append(
                    f"{layer_list(idx, *verb)} {what}, which covers every sample of up to {longest} "
                    "tokens (plain causal attention)"
                )
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        found.checked.append(f"attention logit soft-capping (attn_logit_softcapping={softcap}) in every kernel")
    if getattr(config, "final_logit_softcapping", None) is not None:
        found.notes.append("final logit soft-capping works on each token's logits and is honoured")
    sinks = [layer_index(n) for n, m in modules if getattr(m, "sinks", None) is not None]
    if sinks:
        found.checked.append(
            f"attention sinks on {layer_list(sinks)} (a learned logit per head in each row's softmax denominator, "
            "counted once per row however the row's keys are split)"
        )


def _check_temperature_tuning(config, found: _Findings) -> None:
    """Llama 4's attention temperature tuning scales queries by the row index of the forward's input: refused."""
    nope = [i for i, r in enumerate(getattr(config, "no_rope_layers", None) or []) if not r]
    if getattr(config, "attn_temperature_tuning", False) and nope:
        floor = getattr(config, "floor_scale", None)
        found.problems.append(
            f"config.attn_temperature_tuning=True: the NoPE {layer_list(nope)} scale each query by "
            f"1 + attn_scale*log1p(floor((i + 1) / floor_scale)) with i the row index of the forward's input "
            "(transformers takes torch.arange of the row, not position_ids). HDP packs several samples into a row "
            "and splits long ones over ranks, so i is not the token's position in its sample and the scale would "
            f"be wrong. Set config.attn_temperature_tuning=False (this changes the model for tokens at positions "
            f"{(floor or 1) - 1} and beyond; it is the same model while every sample and every packed row stays "
            f"under floor_scale={floor} tokens), or " + STOCK + "."
        )
    elif getattr(config, "attn_temperature_tuning", None) is False:
        found.checked.append("no attention temperature tuning (attn_temperature_tuning=False)")
    elif hasattr(config, "attn_temperature_tuning"):
        found.checked.append("attention temperature tuning applies to NoPE layers only, and there are none")


def _check_dropout(config, modules, found: _Findings) -> None:
    """Attention dropout is refused: HDP's kernels have none (per-token dropouts are fine)."""
    drops = {k: getattr(config, k) for k in _DROPOUT_KEYS if isinstance(getattr(config, k, None), (int, float))}
    drops.update(
        {
            f"layer {layer_index(n)}.attention_dropout": m.attention_dropout
            for n, m in modules
            if isinstance(getattr(m, "attention_dropout", None), (int, float))
            and not isinstance(m.attention_dropout, bool)
        }
    )
    bad = {k: v for k, v in drops.items() if v and v > 0}
    if bad:
        k, v = next(iter(bad.items()))
        found.problems.append(
            f"it uses attention dropout ({k}={v}) in training, which HDP's kernels do not implement (matching one "
            "process would need the same random mask per sample, head, query and key on every rank). "
            f"Set config.{k.split('.')[-1]} = 0.0 (the usual value for fine-tuning) before building the trainer."
        )
    else:
        found.checked.append("no attention dropout")


def _check_rope(config, longest: int, found: _Findings) -> None:
    """RoPE whose frequencies depend on the batch is refused once a sample reaches past where it stays static."""
    for where, rope_type, limit in rope_thresholds(config):
        if longest > limit:
            found.problems.append(
                f"its RoPE{where} is {rope_type!r}, whose frequencies depend on the largest position in the batch once "
                f"it passes {limit}; samples reach {longest} tokens, and under HDP a micro-batch mixes samples and "
                f"holds only parts of a split one, so positions past {limit} would get the wrong frequencies (it would "
                f"need each token's frequencies chosen from its own sample's length). Keep samples within {limit} "
                f"tokens, use a static scaling (rope_type 'linear', 'yarn' or 'llama3'), or {STOCK}."
            )
        else:
            found.checked.append(f"RoPE {rope_type!r}{where} stays static for samples of up to {limit} tokens")


def _check_moe(config, found: _Findings) -> None:
    """MoE: per-token routing is fine; the router auxiliary loss and expert capacities are refused."""
    if getattr(config, "output_router_logits", False):
        coef = getattr(config, "router_aux_loss_coef", None)
        found.problems.append(
            f"config.output_router_logits=True asks for the MoE router auxiliary loss (router_aux_loss_coef={coef}). "
            "That load-balancing loss is a product of batch-wide averages, so it does not split into a sum over "
            "HDP's micro-batches and ranks (it would need the per-expert counts and router probabilities "
            "all-reduced over the whole step before the product), and HDP would drop it. Set "
            "config.output_router_logits=False (HDP then "
            "trains the token-level LM loss, as transformers does with the default), or " + STOCK + "."
        )
    elif hasattr(config, "output_router_logits"):
        found.checked.append("MoE: per-token routing, no router auxiliary loss (output_router_logits=False)")
        if getattr(config, "router_jitter_noise", 0):
            found.notes.append(
                "router jitter noise is drawn per token in training: it is random, not packing-dependent"
            )
    for key in _CAPACITY_KEYS:
        if getattr(config, key, None):
            found.problems.append(
                f"its MoE routing has an expert capacity (config.{key}={getattr(config, key)}), so which tokens an "
                f"expert drops depends on the other tokens of the batch, which HDP changes. {_STOCK_S}."
            )
