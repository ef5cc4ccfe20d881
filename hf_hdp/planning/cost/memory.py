"""Memory: the peak bytes of one rank, and the per-rank capacity ``C`` (``tokens_per_rank``) a budget allows.

:func:`memory_breakdown` is the one estimate: the peak bytes of a rank running micro-batches of
``tokens`` tokens, split into weights, gradients, optimizer states, activations and the LM head's
logits, for a ZeRO stage or an FSDP mode, with or without gradient checkpointing, activation
offloading and the chunked loss. :func:`tokens_per_rank_for_memory` inverts it: the largest ``C``
whose peak fits a budget after an explicit reserve. :func:`memory_per_rank`,
:func:`activation_bytes_per_token` and :func:`model_state_bytes` are its older, narrower views.

Where the peak is. HDP accumulates each rank's micro-batches into whole local gradients and reduces
them once per step, after the rank's last backward (ranks run different numbers of micro-batches),
so the peak is during a backward: weights, the whole gradients, the optimizer states and one
micro-batch's activations at once. Consequences, each counted below:

- ZeRO stage 1 shards the optimizer states ``1/world``; stage 2 shards the gradients only from the
  reduction to the end of the optimizer step, so its *peak* equals stage 1's
  (:mod:`hf_hdp.engine.zero` says the same);
- ``fsdp="shard_grad_op"``: the whole weights are gathered for the whole step, beside the rank's
  own shard, and the gradients accumulate unsharded (reduce-scattered once per step); the optimizer
  states are sharded;
- ``fsdp="full_shard"``: weights, gradients and optimizer states are sharded ``1/world``, and a
  layer's whole weights (and, in backward, gradients) are gathered around its use: two decoder
  layers at a time (the one running and the one prefetched), plus the root unit (embeddings, final
  norm, LM head), which FSDP2 does not reshard between forward and backward.

Pure Python: no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..layers import StateShape
from ..sharding import resolve_sharding
from .recurrent import CHUNK
from .specs import FLOAT32_BYTES, HardwareSpec, ModelSpec

# layers of restored activations on the device during an offloaded backward: the layer whose backward
# runs, and the one before it, prefetched behind it (hf_hdp.engine.offload)
OFFLOAD_PREFETCH_LAYERS = 2
# layers whose whole weights and gradients FSDP's full_shard holds at a time: the one running, the one prefetched
FSDP_GATHERED_LAYERS = 2


def layer_activation_bytes_per_token(model: ModelSpec) -> float:
    """Bytes one layer keeps for backward, per token, without recomputation, flash attention.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    §4.1) count ``34·h`` bytes per token per layer for a GPT layer in 16-bit (plus ``5·a·s`` for
    the attention scores, which flash attention never stores). The same accounting for a LLaMA
    layer (RMSNorm, GQA, SwiGLU MLP, no dropout), in the model dtype of ``bytes_per_value``:

    - attention: norm input ``h``, norm output ``h``, Q after RoPE ``H·D``, K and V ``2·Hkv·D``,
      attention output ``H·D`` (the O projection's input), plus the float32 log-sum-exp ``4·H`` bytes
      (with multi-head latent attention Q and K at the q/k head size, V and the output at the v one);
    - MLP: norm input ``h``, norm output ``h``, gate, up, SiLU(gate) and their product ``4·i``.

    LLaMA-7B: ``2·(8h + 4i) + 4H = 153,728`` bytes, about ``37.5·h``. HF's eager RMSNorm also
    keeps a float32 copy of its input (``+4h`` each, ~20% more): leave headroom (``reserve_fraction``).

    A model with state layers, hybrid layers or layers without attention or MLP (:attr:`ModelSpec.layer_states`,
    ``layer_attention``, ``layer_mlp``): the mean over its layers of :func:`layer_activation_bytes`.
    """
    if model.layer_states or model.layer_attention or model.layer_mlp:
        return sum(layer_activation_bytes(model, i) for i in range(model.num_layers)) / model.num_layers
    h, i = model.hidden_size, model.intermediate_size
    values = 4 * h + model.q_dim + model.attention_out_dim + 2 * model.kv_dim + 4 * i
    return float(model.bytes_per_value * values + FLOAT32_BYTES * model.num_heads)


def max_layer_activation_bytes_per_token(model: ModelSpec) -> float:
    """The most any one layer keeps per token (:func:`layer_activation_bytes`): the working set a recomputed layer
    rebuilds in backward. :func:`layer_activation_bytes_per_token` when every layer is alike."""
    if model.layer_states or model.layer_attention or model.layer_mlp:
        return max(layer_activation_bytes(model, i) for i in range(model.num_layers))
    return layer_activation_bytes_per_token(model)


def state_activation_bytes_per_token(shape: StateShape, hidden_size: int, bytes_per_value: int) -> float:
    """Bytes a state-carrying mixer keeps for backward per token, approximately: what its forward's autograd graph
    holds (:mod:`hf_hdp.attention.recurrent`), the projections' outputs in the model dtype, the convolution and the
    recurrence in the compute dtype (float32, or the model's if wider). ``C`` channels, ``Hv`` value heads,
    ``c =`` :data:`~.recurrent.CHUNK` rows a chunk:

    - Gated DeltaNet: ``in_proj`` outputs ``C + Hv·dv + 2·Hv`` (channels, gate ``z``, ``b``, ``a``) and the gated
      norm's output ``Hv·dv``; the convolution's input and output ``2·C``; queries and keys repeated to the value heads
      and the values ``Hv·(2·dk + dv)``; the chunk quantities ``Qd``, ``A`` (``c`` a row), ``U``, ``W``, ``Kd``
      (``Hv·(3·dk + dv + c)``); the output ``Hv·dv``; the state entering each chunk ``Hv·dk·dv / c``.
    - Mamba-2: ``in_proj`` outputs ``Hv·dv + C + Hv`` (gate, ``x B C``, ``dt``) and the norm's output ``Hv·dv``;
      the convolution ``2·C``; ``C``, ``B`` repeated and ``dt·x`` ``Hv·(2·dk + dv)``; ``Qd``, ``A``, ``Kd``
      (``Hv·(2·dk + c)``, no ``W``, ``U`` is the values); the output and the states as above.
    - short convolution: ``in_proj``'s ``3·h``, ``B·x`` and ``C·conv`` (``2·h``); the convolution's input and
      output in the compute dtype (``2·h``).

    Temporaries that live only inside one operation (the triangular solve, the chunk loop's products) are not
    counted; the head-parallel split's all-to-all buffers (a member's rows of its heads) are about the same size
    as what they replace."""
    cb = max(FLOAT32_BYTES, bytes_per_value)
    if shape.kind == "conv":
        return float(bytes_per_value * 5 * hidden_size + cb * 2 * hidden_size)
    c, hv, dk, dv = shape.channels, shape.value_heads, shape.key_dim, shape.value_dim
    vd = hv * dv
    if shape.kind == "ssd":
        model_values = vd + c + hv + vd
        compute = 2 * c + hv * (2 * dk + dv) + hv * (2 * dk + CHUNK) + vd + hv * dk * dv / CHUNK
    else:
        model_values = c + vd + 2 * hv + vd
        compute = 2 * c + hv * (2 * dk + dv) + hv * (3 * dk + dv + CHUNK) + vd + hv * dk * dv / CHUNK
    return float(bytes_per_value * model_values + cb * compute)


def layer_activation_bytes(model: ModelSpec, layer: int) -> float:
    """Bytes decoder layer ``layer`` keeps for backward per token: its mixers' norm input and output (``2·h``) when
    it has a mixer; an attention's Q, K, V, output and log-sum-exp (as :func:`layer_activation_bytes_per_token`);
    a state mixer's :func:`state_activation_bytes_per_token`; and an MLP's norm input and output and ``4`` values
    per ``3·h`` of its weights (a gated MLP's gate, up, SiLU and product; a non-gated one, Nemotron-H's, is counted
    alike)."""
    h, b = model.hidden_size, model.bytes_per_value
    st = model.layer_states[layer] if model.layer_states else None
    attention = model.has_attention(layer)
    out = 0.0
    if attention or st:
        out += b * 2 * h
    if attention:
        out += b * (model.q_dim + model.attention_out_dim + 2 * model.kv_dim) + FLOAT32_BYTES * model.num_heads
    if st:
        out += state_activation_bytes_per_token(st, h, b)
    mlp = model.layer_mlp_params(layer)
    if mlp:
        out += b * (2 * h + 4 * mlp / (3 * h))
    return out


def layer_input_bytes_per_token(model: ModelSpec) -> float:
    """Bytes a recomputed (checkpointed) layer keeps per token: its input, ``h`` values."""
    return float(model.bytes_per_value * model.hidden_size)


def logits_bytes_per_token(model: ModelSpec) -> float:
    """The head: final-norm input ``h``, logits ``V`` in the model dtype, their float32 copy and the
    float32 log-softmax that cross-entropy keeps (hf_hdp's loss upcasts the logits)."""
    return float(model.bytes_per_value * (model.hidden_size + model.vocab_size) + 2 * FLOAT32_BYTES * model.vocab_size)


def activation_bytes_per_token(model: ModelSpec, checkpointing: bool = True) -> float:
    """Peak activation bytes per token of a micro-batch, whole model, full logits, no offloading.

    - ``checkpointing=False``: every layer's :func:`layer_activation_bytes_per_token`, plus the head.
    - ``checkpointing=True`` (full per-layer recomputation, ``gradient_checkpointing_enable()``):
      each layer keeps only its input (``h`` values), and backward rebuilds one layer's working set
      at a time, plus the head (Korthikanti et al. 2022, §4.2; Chen et al. 2016).

    Not counted: the ring's K/V receive buffers and float32 output accumulators of a distributed
    piece (a few ``h`` per token for one layer), and temporaries of the backward kernels.
    """
    per_layer = layer_activation_bytes_per_token(model)
    head = logits_bytes_per_token(model)
    if checkpointing:
        return (
            model.num_layers * layer_input_bytes_per_token(model) + max_layer_activation_bytes_per_token(model) + head
        )
    return model.num_layers * per_layer + head


def check_offload_ratio(ratio, what: str = "offload_ratio") -> float:
    """``ratio`` as a float in [0, 1], or a ``ValueError`` naming ``what`` and the value."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(
            f"{what} must be a number in [0, 1] (the fraction of the decoder layers whose saved activations go to "
            f"host memory; 0 = off), got {ratio!r}"
        )
    return float(ratio)


def offloaded_layers(ratio: float, num_layers: int) -> int:
    """Decoder layers a fixed ``offload_ratio`` offloads: the first ``ceil(ratio · num_layers)``.

    ByteScale offloads whole layers; rounding up gives at least the fraction asked for, and float
    noise is ignored (0.3 of 10 layers is 3 layers, not 4).
    """
    ratio = check_offload_ratio(ratio)
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    return min(num_layers, math.ceil(round(ratio * num_layers, 9)))


def device_layers(num_layers: int, offloaded: int) -> int:
    """Layers' worth of saved activations on the device at the peak, when the first ``offloaded`` of
    ``num_layers`` layers are offloaded: the kept layers at the start of backward, or, once backward
    reaches the offloaded layers, the restored layer and the one prefetched behind it
    (:data:`OFFLOAD_PREFETCH_LAYERS`), whichever is more."""
    if not 0 <= offloaded <= num_layers:
        raise ValueError(f"offloaded layers must be in [0, {num_layers}], got {offloaded}")
    if offloaded == 0:
        return num_layers
    return max(num_layers - offloaded, min(offloaded, OFFLOAD_PREFETCH_LAYERS))


def model_state_bytes(
    model: ModelSpec,
    *,
    weight_bytes: float = 2,
    grad_bytes: float = 4,
    optimizer_bytes: float = 12,
    zero1_ranks: int = 1,
) -> float:
    """Weights, gradients and optimizer states of one rank.

    Defaults: bf16 weights, float32 gradients, Adam's float32 master weights, momentum and
    variance (12 bytes a parameter), the optimizer states ZeRO-1-sharded over ``zero1_ranks``
    (Rajbhandari et al. 2020; ByteScale shards them over all ranks). HF Trainer with
    ``bf16=True`` autocast keeps float32 weights: ``weight_bytes=4, optimizer_bytes=8``.
    """
    if zero1_ranks < 1:
        raise ValueError(f"zero1_ranks must be at least 1, got {zero1_ranks}")
    return model.num_params * (weight_bytes + grad_bytes + optimizer_bytes / zero1_ranks)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes of one rank, by kind (see :func:`memory_breakdown`); ``total`` includes ``reserve``."""

    tokens: int
    weights: float
    gradients: float
    optimizer: float
    activations: float  # the decoder layers' saved activations (offloading and checkpointing applied)
    logits: float  # the LM head and the loss: the final hidden states and the logits (a chunk's, when chunked)
    reserve: float = 0.0  # kept back for the CUDA context, communication buffers and fragmentation

    @property
    def states(self) -> float:
        """Weights, gradients and optimizer states: what does not depend on ``tokens``."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations + self.logits + self.reserve

    def to_dict(self) -> dict:
        return {**asdict(self), "states": self.states, "total": self.total}

    def describe(self) -> str:
        """One line: ``weights 1.2 GB, gradients ..., total 71.9 GB``."""
        parts = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
        ]
        if self.reserve:
            parts.append(("reserve", self.reserve))
        parts.append(("total", self.total))
        return ", ".join(f"{name} {fmt_gb(value)}" for name, value in parts)


def fmt_gb(nbytes: float) -> str:
    """Bytes in decimal GB (1e9), three significant decimals below 1 GB."""
    gb = nbytes / 1e9
    return f"{gb:.3f} GB" if gb < 1 else f"{gb:.2f} GB"


def _sharding(zero_stage: int | None, fsdp: str | None, world_size: int) -> tuple[int, str | None]:
    """:func:`~hf_hdp.planning.sharding.resolve_sharding` of this module's arguments, where ``zero_stage=0`` beside
    ``fsdp`` is the default, not a stage given."""
    return resolve_sharding(None if fsdp is not None and zero_stage == 0 else zero_stage, fsdp, world_size)


def head_bytes(model: ModelSpec, tokens: int, loss_chunk_tokens: int | None = None, weight_bytes: float = 2) -> float:
    """The LM head and the loss of a micro-batch of ``tokens`` tokens.

    ``loss_chunk_tokens=None``: :func:`logits_bytes_per_token` for every token (the full logits).
    Chunked (:mod:`hf_hdp.engine.loss`): every token's final hidden state (``h`` values) and the
    log-sum-exp of its logits (float32, or the model dtype if wider), plus one chunk of
    ``min(chunk, tokens)`` rows of logits, their float32 copy and softmax; and a float32 ``[V, h]``
    accumulator of the head's weight gradient when the weight is 16-bit (``weight_bytes < 4``).
    """
    if loss_chunk_tokens is None:
        return tokens * logits_bytes_per_token(model)
    if isinstance(loss_chunk_tokens, bool) or not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 1:
        raise ValueError(f"loss_chunk_tokens must be a positive integer or None, got {loss_chunk_tokens!r}")
    b, h, v = model.bytes_per_value, model.hidden_size, model.vocab_size
    rows = tokens * (b * h + max(FLOAT32_BYTES, b))
    chunk = min(loss_chunk_tokens, tokens) * (b * v + 2 * FLOAT32_BYTES * v)
    accumulator = FLOAT32_BYTES * v * h if weight_bytes < FLOAT32_BYTES and tokens > 0 else 0
    return float(rows + chunk + accumulator)


def memory_breakdown(
    model: ModelSpec,
    tokens: int,
    *,
    world_size: int = 1,
    zero_stage: int = 0,
    fsdp: str | None = None,
    checkpointing: bool = True,
    offload_ratio: float = 0.0,
    loss_chunk_tokens: int | None = None,
    weight_bytes: float = 2,
    grad_bytes: float = 4,
    optimizer_bytes: float = 12,
    params: int | None = None,
    trainable_params: int | None = None,
    reserve: float = 0.0,
) -> MemoryBreakdown:
    """Peak bytes of one rank running micro-batches of ``tokens`` tokens, by kind.

    - ``weights``: ``params · weight_bytes``; with ``fsdp="shard_grad_op"`` the gathered whole
      weights plus the rank's shard (``1 + 1/world``); with ``"full_shard"`` the shard (``1/world``)
      plus the gathered root unit (embeddings, final norm, head) and two decoder layers.
    - ``gradients``: ``trainable_params · grad_bytes``, whole at every ZeRO stage and with
      ``shard_grad_op`` (HDP reduces once per step, after the last backward); with ``"full_shard"``
      sharded plus the root unit's and two layers' whole gradients.
    - ``optimizer``: ``trainable_params · optimizer_bytes``, over ``world_size`` at ZeRO stage 1/2
      and with FSDP.
    - ``activations``: per token, each decoder layer's :func:`layer_activation_bytes_per_token`
      (``checkpointing=False``), or each layer's input and one layer's working set
      (``checkpointing=True``). ``offload_ratio=r`` moves the first ``ceil(r · layers)`` layers'
      saved activations to host memory (:func:`offloaded_layers`); what stays is
      :func:`device_layers` layers' worth (the kept layers, or the two restored in backward).
    - ``logits``: :func:`head_bytes` (``loss_chunk_tokens``: chunk × vocab, not tokens × vocab).

    ``params`` / ``trainable_params`` (default: the spec's :attr:`ModelSpec.num_params`, all
    trainable) let a caller that holds the model give its exact counts (a PEFT model trains few).
    ``reserve``: bytes kept back, reported as such and included in ``total``.

    Bytes per state, for what ``transformers.Trainer`` does: ``bf16=True`` autocast keeps float32
    weights, gradients and AdamW moments (4, 4, 8) and bf16 activations (``bytes_per_value=2``); a
    model loaded in bf16 without autocast keeps bf16 ones (2, 2, 4).
    """
    zero_stage, fsdp = _sharding(zero_stage, fsdp, world_size)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
    ratio = check_offload_ratio(offload_ratio)
    P = float(model.num_params if params is None else params)
    Pt = P if trainable_params is None else float(trainable_params)
    W = world_size
    L = model.num_layers
    layer = float(model.layer_params + 2 * model.hidden_size + model.bias_params_per_layer)
    if fsdp is None:
        weights = P * weight_bytes
        gradients = Pt * grad_bytes
        optimizer = Pt * optimizer_bytes / (W if zero_stage >= 1 else 1)
    elif fsdp == "shard_grad_op":
        weights = P * weight_bytes * (1.0 + 1.0 / W)
        gradients = Pt * grad_bytes
        optimizer = Pt * optimizer_bytes / W
    else:  # full_shard
        root = max(P - L * layer, 0.0)  # embeddings, final norm, head: FSDP2's root unit
        gathered = min(P, root + min(L, FSDP_GATHERED_LAYERS) * layer)
        trainable = Pt / P if P else 0.0
        weights = weight_bytes * (P / W + gathered)
        gradients = grad_bytes * trainable * (P / W + gathered)
        optimizer = Pt * optimizer_bytes / W
    kept = device_layers(L, offloaded_layers(ratio, L))
    if checkpointing:
        activations = tokens * (kept * layer_input_bytes_per_token(model) + max_layer_activation_bytes_per_token(model))
    else:
        activations = tokens * kept * layer_activation_bytes_per_token(model)
    logits = head_bytes(model, tokens, loss_chunk_tokens, weight_bytes)
    return MemoryBreakdown(
        tokens=tokens,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=float(activations),
        logits=float(logits),
        reserve=float(reserve),
    )


def _memory_budget(memory: float | HardwareSpec) -> float:
    return float(memory.memory_bytes if isinstance(memory, HardwareSpec) else memory)


def memory_per_rank(
    model: ModelSpec,
    tokens: int,
    *,
    checkpointing: bool = True,
    zero1_ranks: int = 1,
    weight_bytes: float = 2,
    grad_bytes: float = 4,
    optimizer_bytes: float = 12,
) -> float:
    """Estimated peak bytes of a rank running micro-batches of ``tokens`` tokens: model states +
    activations + full logits, the optimizer states sharded over ``zero1_ranks`` (:func:`memory_breakdown`'s total)."""
    if zero1_ranks < 1:
        raise ValueError(f"zero1_ranks must be at least 1, got {zero1_ranks}")
    return memory_breakdown(
        model,
        int(tokens),
        world_size=zero1_ranks,
        zero_stage=1 if zero1_ranks > 1 else 0,
        checkpointing=checkpointing,
        weight_bytes=weight_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
    ).total


def tokens_per_rank_for_memory(
    model: ModelSpec,
    memory: float | HardwareSpec,
    *,
    checkpointing: bool = True,
    zero1_ranks: int = 1,
    weight_bytes: float = 2,
    grad_bytes: float = 4,
    optimizer_bytes: float = 12,
    reserve_fraction: float = 0.1,
    world_size: int | None = None,
    zero_stage: int | None = None,
    fsdp: str | None = None,
    offload_ratio: float = 0.0,
    loss_chunk_tokens: int | None = None,
    params: int | None = None,
    trainable_params: int | None = None,
) -> int:
    """The largest ``tokens_per_rank`` whose :func:`memory_breakdown` fits ``memory`` (bytes, or a
    :class:`HardwareSpec`'s ``memory_bytes``) after keeping ``reserve_fraction`` of it back for the
    CUDA context, communication buffers and fragmentation.

    The sharding is either ``world_size`` with ``zero_stage`` (None: 1 on several ranks, 0 on one,
    as HDPConfig) or ``fsdp``, or, in the older form, ``zero1_ranks``: ZeRO-1 over that many ranks.
    The other keywords are :func:`memory_breakdown`'s (``loss_chunk_tokens=None``: full logits).

    Example: LLaMA-7B on an 80 GB H100, ZeRO-1 over 1,024 ranks: about 42K tokens with full
    checkpointing, 6.0K without; with bf16 gradients (``grad_bytes=2``) 8.6K without, close to the
    C = 8K ByteScale used for this model.

    Raises a ``ValueError`` naming the model states' size and what would shrink them when not even
    one token fits.
    """
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    if zero1_ranks < 1:
        raise ValueError(f"zero1_ranks must be at least 1, got {zero1_ranks}")
    legacy = world_size is None
    if legacy:
        if zero_stage not in (None, 0) and zero1_ranks == 1:
            raise ValueError(f"zero_stage={zero_stage} needs world_size (the ranks it shards over)")
        world_size, zero_stage = zero1_ranks, None  # ZeRO-1 over zero1_ranks, unless fsdp
    elif zero1_ranks != 1:
        raise ValueError(
            f"give world_size and zero_stage, or zero1_ranks, not both (zero1_ranks={zero1_ranks}, "
            f"world_size={world_size})"
        )
    zero_stage, fsdp = _sharding(zero_stage, fsdp, world_size)
    budget = _memory_budget(memory)
    usable = budget * (1.0 - reserve_fraction)
    kw = dict(
        world_size=world_size,
        zero_stage=zero_stage,
        fsdp=fsdp,
        checkpointing=checkpointing,
        offload_ratio=offload_ratio,
        loss_chunk_tokens=loss_chunk_tokens,
        weight_bytes=weight_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
        params=params,
        trainable_params=trainable_params,
    )

    def fits(t: int) -> bool:
        return memory_breakdown(model, t, **kw).total <= usable

    if not fits(1):
        _refuse(model, memory_breakdown(model, 1, **kw), budget, usable, reserve_fraction, legacy, kw)
    lo, hi = 1, 2  # fits(lo), then double hi until it does not fit, then bisect
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 60:
            raise ValueError(
                f"{model.name}: the activations of one token cost nothing in this estimate; check the model spec"
            )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _refuse(
    model: ModelSpec,
    one: MemoryBreakdown,
    budget: float,
    usable: float,
    reserve_fraction: float,
    legacy: bool,
    kw: dict,
) -> None:
    """The ``ValueError`` of a budget that holds no token: the states' size, what is left, what would help
    (the activation settings only when the states alone fit)."""
    left = usable - one.states
    hints = []
    if kw["fsdp"] != "full_shard":
        if legacy:
            hints.append("shard the optimizer states over more ranks (zero1_ranks)")
        elif kw["zero_stage"] == 0 and kw["fsdp"] is None:
            hints.append("shard the optimizer states over the ranks (zero_stage=1)")
        hints.append("shard the weights and gradients too (fsdp='full_shard')")
    if left > 0:
        if not kw["checkpointing"]:
            hints.append("recompute the activations (gradient checkpointing)")
        if kw["offload_ratio"] < 1:
            hints.append("offload activations to host memory (offload_ratio)")
        if kw["loss_chunk_tokens"] is None:
            hints.append("chunk the loss (loss_chunk_tokens)")
    hints.append("use fewer bytes per state, or a device with more memory")
    if left <= 0:
        room = "leaving no room for activations"
    else:
        room = (
            f"leaving {fmt_gb(left)}, less than the activations and logits of one token need "
            f"({fmt_gb(one.activations + one.logits)})"
        )
    raise ValueError(
        f"{model.name}: model states need {fmt_gb(one.states)} (weights {fmt_gb(one.weights)}, gradients "
        f"{fmt_gb(one.gradients)}, optimizer {fmt_gb(one.optimizer)}) of the {fmt_gb(usable)} usable per rank "
        f"({fmt_gb(budget)} less the {reserve_fraction:.0%} reserve), {room}. To fit: " + "; ".join(hints) + "."
    )
