"""Memory: the peak bytes of one rank, and the per-rank capacity ``C`` (``tokens_per_rank``) a budget allows.

:func:`activation_bytes_per_token`, :func:`model_state_bytes`, :func:`memory_per_rank` and
:func:`tokens_per_rank_for_memory` turn a memory budget into ``C`` instead of guessing it.
"""

from __future__ import annotations

from .specs import FLOAT32_BYTES, HardwareSpec, ModelSpec


def layer_activation_bytes_per_token(model: ModelSpec) -> float:
    """Bytes one layer keeps for backward, per token, without recomputation, flash attention.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    §4.1) count ``34·h`` bytes per token per layer for a GPT layer in 16-bit (plus ``5·a·s`` for
    the attention scores, which flash attention never stores). The same accounting for a LLaMA
    layer (RMSNorm, GQA, SwiGLU MLP, no dropout), in the model dtype of ``bytes_per_value``:

    - attention: norm input ``h``, norm output ``h``, Q after RoPE ``H·D``, K and V ``2·Hkv·D``,
      attention output ``H·D`` (the O projection's input), plus the float32 log-sum-exp ``4·H`` bytes;
    - MLP: norm input ``h``, norm output ``h``, gate, up, SiLU(gate) and their product ``4·i``.

    LLaMA-7B: ``2·(8h + 4i) + 4H = 153,728`` bytes, about ``37.5·h``. HF's eager RMSNorm also
    keeps a float32 copy of its input (``+4h`` each, ~20% more): leave headroom (``reserve_fraction``).
    """
    h, i = model.hidden_size, model.intermediate_size
    values = 4 * h + 2 * model.q_dim + 2 * model.kv_dim + 4 * i
    return float(model.bytes_per_value * values + FLOAT32_BYTES * model.num_heads)


def logits_bytes_per_token(model: ModelSpec) -> float:
    """The head: final-norm input ``h``, logits ``V`` in the model dtype, their float32 copy and the
    float32 log-softmax that cross-entropy keeps (hf_hdp's loss upcasts the logits)."""
    return float(model.bytes_per_value * (model.hidden_size + model.vocab_size) + 2 * FLOAT32_BYTES * model.vocab_size)


def activation_bytes_per_token(model: ModelSpec, checkpointing: bool = True) -> float:
    """Peak activation bytes per token of a micro-batch, whole model.

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
        return model.num_layers * model.bytes_per_value * model.hidden_size + per_layer + head
    return model.num_layers * per_layer + head


def model_state_bytes(model: ModelSpec, *, weight_bytes: float = 2, grad_bytes: float = 4,
                      optimizer_bytes: float = 12, zero1_ranks: int = 1) -> float:
    """Weights, gradients and optimizer states of one rank.

    Defaults: bf16 weights, float32 gradients, Adam's float32 master weights, momentum and
    variance (12 bytes a parameter), the optimizer states ZeRO-1-sharded over ``zero1_ranks``
    (Rajbhandari et al. 2020; ByteScale shards them over all ranks). HF Trainer with
    ``bf16=True`` autocast keeps float32 weights: ``weight_bytes=4, optimizer_bytes=8``.
    """
    if zero1_ranks < 1:
        raise ValueError(f"zero1_ranks must be at least 1, got {zero1_ranks}")
    return model.num_params * (weight_bytes + grad_bytes + optimizer_bytes / zero1_ranks)


def _memory_budget(memory: float | HardwareSpec) -> float:
    return float(memory.memory_bytes if isinstance(memory, HardwareSpec) else memory)


def memory_per_rank(model: ModelSpec, tokens: int, *, checkpointing: bool = True, zero1_ranks: int = 1,
                    weight_bytes: float = 2, grad_bytes: float = 4, optimizer_bytes: float = 12) -> float:
    """Estimated peak bytes of a rank running micro-batches of ``tokens`` tokens: model states + activations."""
    states = model_state_bytes(model, weight_bytes=weight_bytes, grad_bytes=grad_bytes,
                               optimizer_bytes=optimizer_bytes, zero1_ranks=zero1_ranks)
    return states + tokens * activation_bytes_per_token(model, checkpointing)


def tokens_per_rank_for_memory(model: ModelSpec, memory: float | HardwareSpec, *, checkpointing: bool = True,
                               zero1_ranks: int = 1, weight_bytes: float = 2, grad_bytes: float = 4,
                               optimizer_bytes: float = 12, reserve_fraction: float = 0.1) -> int:
    """The largest ``tokens_per_rank`` whose :func:`memory_per_rank` fits ``memory`` (bytes, or a
    :class:`HardwareSpec`'s ``memory_bytes``) after keeping ``reserve_fraction`` of it back for the
    CUDA context, communication buffers and fragmentation.

    Example: LLaMA-7B on an 80 GB H100, ZeRO-1 over 1,024 ranks: about 42K tokens with full
    checkpointing, 6.0K without; with bf16 gradients (``grad_bytes=2``) 8.6K without, close to the
    C = 8K ByteScale used for this model.
    """
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    budget = _memory_budget(memory) * (1.0 - reserve_fraction)
    states = model_state_bytes(model, weight_bytes=weight_bytes, grad_bytes=grad_bytes,
                               optimizer_bytes=optimizer_bytes, zero1_ranks=zero1_ranks)
    free = budget - states
    per_token = activation_bytes_per_token(model, checkpointing)
    if free < per_token:
        raise ValueError(
            f"{model.name}: model states need {states / 1e9:.1f} GB of the {budget / 1e9:.1f} GB usable per rank, "
            f"leaving no room for activations; shard the optimizer (zero1_ranks), use fewer bytes per state, or "
            f"a larger device"
        )
    t = int(free // per_token)
    # guard against float rounding at the boundary
    while t > 0 and states + t * per_token > budget:
        t -= 1
    return t
