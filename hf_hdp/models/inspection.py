"""What HDP reads off a model: the transformers model inside a wrapper, its attention modules, whether they route
through transformers' AttentionInterface, and its layers and RoPE; and the two refusals both
:func:`~hf_hdp.models.check_model_supported` and :func:`~hf_hdp.engine.setup.enable_hdp_attention` make
(:func:`require_hdp_routable`)."""

from __future__ import annotations

from .families import STATE_LAYER_TYPES, UnsupportedModelError

STOCK = "train it with the stock transformers Trainer (no HDP)"


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


def unwrap(model):
    """``(config, transformers model or None)`` of a model, a PEFT wrapper of one, or a config."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, None
    base = hdp_base_model(model)
    return base.config, base


def attention_modules(base) -> list[tuple[str, object]]:
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


def layers_dropping_kwargs(base, modules) -> list[str]:
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
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == attr
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id == "self"
        ]
        if calls and not any(k.arg is None for c in calls for k in c.keywords):
            found.append(cls.__name__)
    return found


def routes_attention(base) -> bool:
    """Whether every attention layer of ``base`` calls transformers' AttentionInterface: the class says so
    (``_supports_attention_backend``), or it is a hybrid family whose attention layers do and whose
    state-carrying layers HDP's adapters run (transformers leaves the flag off for those: not every token mixer
    is attention)."""
    return (
        bool(getattr(base, "_supports_attention_backend", False))
        or getattr(base.config, "model_type", None) in STATE_LAYER_TYPES
    )


def layer_index(name: str) -> str:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "layer", "h", "blocks") and b.isdigit():
            return b
    return name


def layer_list(indices: list, one: str = "", many: str = "") -> str:
    """``"layer 3 is"``, ``"layers 0, 1 are"``, ``"layers 0, 1, 2, 3, 4, ... (12 layers) are"``."""
    if len(indices) == 1:
        return f"layer {indices[0]} {one}".rstrip()
    shown = (
        ", ".join(map(str, indices))
        if len(indices) <= 6
        else (f"{', '.join(map(str, indices[:5]))}, ... ({len(indices)} layers)")
    )
    return f"layers {shown} {many}".rstrip()


def rope_thresholds(config) -> list[tuple[str, str, int]]:
    """``(where, rope_type, longest sample it stays static for)`` of every batch-dependent RoPE."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    sets = (
        [("", params)]
        if "rope_type" in params or "type" in params
        else [(f" ({k})", v) for k, v in params.items() if isinstance(v, dict)]
    )
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


def model_heads(config) -> int | None:
    """The query heads of a decoder's attention (``text_config`` for multimodal configs); ``None`` when unknown."""
    if not hasattr(config, "num_attention_heads") and getattr(config, "text_config", None) is not None:
        config = config.text_config
    heads = getattr(config, "num_attention_heads", None)
    return int(heads) if isinstance(heads, int) and heads > 0 else None


def encoder_decoder_problem(config) -> str | None:
    """Why an encoder-decoder model cannot train under HDP, or ``None`` for a decoder-only one."""
    if getattr(config, "is_encoder_decoder", False):
        return (
            "it is an encoder-decoder model (bidirectional encoder, cross-attention); HDP trains decoder-only "
            "causal LMs. Use the stock Seq2SeqTrainer."
        )
    return None


def routing_problem(base) -> str | None:
    """Why ``base``'s attention cannot run as HDP's, or ``None`` when it routes through AttentionInterface."""
    if routes_attention(base):
        return None
    return (
        f"{type(base).__name__} does not route its attention through transformers' AttentionInterface, so HDP "
        "cannot keep packed samples apart or split them over ranks. Use a model class that sets "
        "`_supports_attention_backend = True` (Llama, Qwen2, Mistral, ...), or " + STOCK + "."
    )


def model_name(config, base=None) -> str:
    """``"LlamaForCausalLM (model_type 'llama')"``: how errors name a model."""
    model_type = getattr(config, "model_type", None) or "?"
    return f"{type(base).__name__ if base is not None else type(config).__name__} (model_type {model_type!r})"


def unsupported(name: str, problems: list[str]) -> UnsupportedModelError:
    """The error listing every problem found with the model ``name``."""
    return UnsupportedModelError(f"HDP cannot train {name} correctly:\n" + "\n".join(f"- {p}" for p in problems))


def require_hdp_routable(model):
    """The transformers model inside ``model``, once it is one whose attention HDP can take over: a decoder-only
    model whose attention goes through AttentionInterface. Raises :class:`UnsupportedModelError` otherwise (the
    same words :func:`~hf_hdp.models.check_model_supported` uses)."""
    base = hdp_base_model(model)
    problems = [p for p in (encoder_decoder_problem(base.config), routing_problem(base)) if p]
    if problems:
        raise unsupported(model_name(base.config, base), problems)
    return base
