"""What sets the cost: a decoder's shapes (:class:`ModelSpec`) and a rank's hardware (:class:`HardwareSpec`),
with named presets of each. Plain data: no time model here (that is :mod:`.model`).

Figures behind the presets are named where they are defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..layers import StateShape, layer_attention_shapes, layer_blocks
from ..reach import FULL
from ..reach import layer_masks as config_layer_masks

# forward + backward of a matmul-dominated layer is about 3x its forward FLOPs (backward = 2x forward)
FWD_BWD = 3.0
# the dK/dV accumulators of the ring backward, and hf_hdp's gradient all-reduce, are float32
FLOAT32_BYTES = 4


def _integral(x: float) -> int | float:
    """``x`` as an int when it is a whole number (so uniform models keep their exact integer counts)."""
    return int(x) if float(x).is_integer() else x


class LayerHeads(NamedTuple):
    """One attention layer's K/V heads and head sizes: q/k heads of ``qk_head_dim``, v heads of ``v_head_dim``
    (they differ under multi-head latent attention: 192 and 128 in DeepSeek-V3)."""

    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that set a decoder's cost (LLaMA-style: gated MLP, GQA, RMSNorm, untied head by default).

    ``head_dim`` is the q/k head size and ``v_head_dim`` the v head size (0: ``head_dim``). A model whose
    layers differ (Gemma 4: wider heads, and other K/V heads, on its full-attention layers) gives one
    :class:`LayerHeads` per layer in ``layer_heads``; the per-token figures are then means over the layers,
    and :class:`~.model.CostModel` prices each layer's exchange with its own heads.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0
    bytes_per_value: int = 2  # bf16 activations and K/V on the wire
    tie_word_embeddings: bool = False
    bias_params_per_layer: int = 0  # projection biases (Qwen2's q/k/v; Llama's attention_bias=True)
    # one hf_hdp.planning.reach.LayerMask per layer (sliding-window / chunked layers); () when all are full causal
    layer_masks: tuple = ()
    v_head_dim: int = 0
    # one LayerHeads per layer; () when every layer has num_kv_heads, head_dim and v_head_dim
    layer_heads: tuple = ()
    # one entry per layer: a hf_hdp.planning.layers.StateShape for a layer with a state-carrying mixer (Gated DeltaNet,
    # Mamba-2, short convolution), None for one without; () when every layer is attention
    layer_states: tuple = ()
    # one bool per layer: whether it holds an attention; () when exactly the layers without a state mixer do (Falcon-H1
    # and Zamba 2's hybrid layers hold both, Nemotron-H's MLP layers neither)
    layer_attention: tuple = ()
    # one int per layer: the weights of its MLP a token uses; () when every layer's is 3·hidden·intermediate_size
    # (Nemotron-H's Mamba and attention layers hold none, its MLPs are not gated)
    layer_mlp: tuple = ()
    # the full-attention layers gate their output by a second query-sized projection (Qwen3.5, Qwen3-Next)
    attention_output_gate: bool = False
    # weights that cost no FLOPs per token: a mixture of experts' experts a token does not use, per layer
    # (intermediate_size is then the active experts' and shared experts' total)
    inactive_params_per_layer: int = 0

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.v_head_dim == 0:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        masks = tuple(self.layer_masks)
        if masks and len(masks) != self.num_layers:
            raise ValueError(f"ModelSpec.layer_masks has {len(masks)} masks for {self.num_layers} layers")
        object.__setattr__(self, "layer_masks", () if all(m.full for m in masks) else masks)
        heads = tuple(LayerHeads(*h) for h in self.layer_heads)
        if heads and len(heads) != self.num_layers:
            raise ValueError(f"ModelSpec.layer_heads has {len(heads)} entries for {self.num_layers} layers")
        uniform = LayerHeads(self.num_kv_heads, self.head_dim, self.v_head_dim)
        object.__setattr__(self, "layer_heads", () if all(h == uniform for h in heads) else heads)
        states = tuple(None if not st else StateShape.of(st) for st in self.layer_states)
        if states and len(states) != self.num_layers:
            raise ValueError(f"ModelSpec.layer_states has {len(states)} entries for {self.num_layers} layers")
        object.__setattr__(self, "layer_states", states if any(states) else ())
        for name in ("layer_attention", "layer_mlp"):
            values = tuple(getattr(self, name))
            if values and len(values) != self.num_layers:
                raise ValueError(f"ModelSpec.{name} has {len(values)} entries for {self.num_layers} layers")
            object.__setattr__(self, name, values)
        attention = tuple(bool(a) for a in self.layer_attention)
        default = tuple(not st for st in self.layer_states) if self.layer_states else (True,) * self.num_layers
        object.__setattr__(self, "layer_attention", () if attention == default else attention)
        mlp = tuple(int(m) for m in self.layer_mlp)
        object.__setattr__(self, "layer_mlp", () if all(m == self.mlp_params for m in mlp) else mlp)

    @property
    def mlp_params(self) -> int:
        """The usual layer's gated MLP weights, ``3·h·intermediate_size``."""
        return 3 * self.hidden_size * self.intermediate_size

    def has_attention(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` holds an attention (see :attr:`layer_attention`)."""
        if self.layer_attention:
            return self.layer_attention[layer]
        return not (self.layer_states and self.layer_states[layer])

    def layer_mlp_params(self, layer: int) -> int:
        """The MLP weights a token uses in decoder layer ``layer`` (see :attr:`layer_mlp`)."""
        return self.layer_mlp[layer] if self.layer_mlp else self.mlp_params

    @property
    def num_state_layers(self) -> int:
        """Layers with a state-carrying mixer (priced linear in ``s``: :mod:`.recurrent`)."""
        return sum(1 for st in self.layer_states if st)

    @property
    def num_attention_layers(self) -> int:
        """Attention layers (full, sliding or chunked; priced by their pairs); hybrid layers count here too."""
        if self.layer_attention:
            return sum(1 for a in self.layer_attention if a)
        return self.num_layers - self.num_state_layers

    @property
    def heads_per_layer(self) -> tuple[LayerHeads, ...]:
        """:class:`LayerHeads` of every layer (the uniform ones repeated when ``layer_heads`` is empty)."""
        return self.layer_heads or (LayerHeads(self.num_kv_heads, self.head_dim, self.v_head_dim),) * self.num_layers

    def _mean(self, per_layer) -> float:
        values = [per_layer(h) for h in self.heads_per_layer]
        return sum(values) / len(values) if values else 0

    @classmethod
    def from_config(cls, config, name: str | None = None, bytes_per_value: int = 2) -> ModelSpec:
        """From a transformers ``PretrainedConfig`` (or anything with the same attribute names).

        Multimodal configs that keep the decoder in ``text_config`` are read from there. The layers'
        sliding windows and attention chunks come from :func:`hf_hdp.planning.reach.layer_masks`
        (``layer_types``, ``sliding_window``, ``attention_chunk_size``).
        """
        if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
            config = config.text_config
        heads = config.num_attention_heads
        # K/V heads and head sizes per layer (hf_hdp.planning.layers): Gemma 4 keeps them per layer, multi-head
        # latent attention has wider q/k heads than v heads
        layer_heads = tuple(LayerHeads(*h) for h in layer_attention_shapes(config))
        first = layer_heads[0]
        kv_heads, head_dim, v_head_dim = first
        q = _integral(sum(heads * h.qk_head_dim for h in layer_heads) / len(layer_heads))
        kv = _integral(
            sum(h.num_kv_heads * (h.qk_head_dim + h.v_head_dim) for h in layer_heads) / (2 * len(layer_heads))
        )
        if getattr(config, "attention_bias", False):  # Llama-style: q, k, v and o
            bias = q + 2 * kv + config.hidden_size
        elif getattr(config, "model_type", "").startswith("qwen2"):  # Qwen2: q, k, v always
            bias = q + 2 * kv
        else:
            bias = 0
        intermediate, inactive = _mlp_sizes(config)
        blocks = layer_blocks(config, 3 * int(config.hidden_size) * intermediate, inactive)
        if any(b.inactive != inactive for b in blocks):
            inactive = _integral(sum(b.inactive for b in blocks) / len(blocks))
        if getattr(config, "mlp_bias", False):
            bias += 2 * intermediate + config.hidden_size
        masks = tuple(config_layer_masks(config))[: config.num_hidden_layers]
        masks += (FULL,) * (config.num_hidden_layers - len(masks))
        return cls(
            name=name or getattr(config, "name_or_path", "") or type(config).__name__,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=intermediate,
            vocab_size=config.vocab_size,
            head_dim=head_dim,
            bytes_per_value=bytes_per_value,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            bias_params_per_layer=bias,
            layer_masks=masks,
            v_head_dim=v_head_dim,
            layer_heads=layer_heads,
            layer_states=tuple(b.state for b in blocks),
            layer_attention=tuple(b.attention for b in blocks),
            layer_mlp=tuple(b.mlp for b in blocks),
            attention_output_gate=bool(getattr(config, "attn_output_gate", False))
            or getattr(config, "model_type", "") in _GATED_ATTENTION,
            inactive_params_per_layer=inactive,
        )

    @property
    def q_dim(self) -> float:
        """Query values per token per layer, ``H·Dqk`` (mean over the layers)."""
        if not self.layer_heads:
            return self.num_heads * self.head_dim
        return _integral(self._mean(lambda h: self.num_heads * h.qk_head_dim))

    @property
    def kv_dim(self) -> float:
        """Half the K and V values per token per layer, ``Hkv·(Dqk + Dv) / 2`` (``Hkv·D`` with one head size;
        mean over the layers)."""
        if not self.layer_heads and self.v_head_dim == self.head_dim:
            return self.num_kv_heads * self.head_dim
        return _integral(self._mean(lambda h: h.num_kv_heads * (h.qk_head_dim + h.v_head_dim) / 2))

    @property
    def attention_out_dim(self) -> float:
        """Attention output values per token per layer, ``H·Dv`` (mean over the layers)."""
        if not self.layer_heads:
            return self.num_heads * self.v_head_dim
        return _integral(self._mean(lambda h: self.num_heads * h.v_head_dim))

    @property
    def layer_params(self) -> int:
        """Weights of one layer's projections and gated MLP (norms ignored; mean over the layers when they differ;
        multi-head latent attention's low-rank projections are counted as plain q/k/v projections). A Gated DeltaNet
        layer has :meth:`state_layer_params` instead of the attention's projections."""
        q = self.hidden_size * self.q_dim * (2 if self.attention_output_gate else 1)
        kv = 2 * self.hidden_size * self.kv_dim
        o = self.attention_out_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        if not self.layer_states and not self.layer_attention and not self.layer_mlp:
            return _integral(q + kv + o + mlp)
        if not self.layer_attention and not self.layer_mlp:
            mixers = self.num_attention_layers * (q + kv + o) + sum(
                self.state_layer_params(st) for st in self.layer_states if st
            )
            return _integral(mixers / self.num_layers + mlp)
        total = sum(
            (q + kv + o if self.has_attention(i) else 0)
            + self.layer_mlp_params(i)
            + (self.state_layer_params(self.layer_states[i]) if self.layer_states and self.layer_states[i] else 0)
            for i in range(self.num_layers)
        )
        return _integral(total / self.num_layers)

    def state_layer_params(self, shape: StateShape) -> int:
        """Weights of a state-carrying mixer. Gated DeltaNet: ``in_proj_qkv`` (``h -> C``), ``in_proj_z``
        (``h -> Hv·dv``), ``in_proj_b`` and ``in_proj_a`` (``h -> Hv`` each), ``out_proj`` (``Hv·dv -> h``) and the
        depthwise convolution (``C·kernel``); Qwen3-Next's fused ``in_proj_qkvz``/``in_proj_ba`` hold the same weights.
        Mamba-2: ``in_proj`` (``h -> Hv·dv + C + Hv``: the gate ``z``, the convolution's ``x, B, C`` and ``dt``),
        ``out_proj`` (``Hv·dv -> h``) and the convolution. Short convolution: ``in_proj`` (``h -> 3C``, ``C = h``),
        ``out_proj`` (``C -> h``) and the convolution. Per-head vectors and norms are left out."""
        h, vd, c = self.hidden_size, shape.value_heads * shape.value_dim, shape.channels
        if shape.kind == "conv":
            return 3 * h * c + c * h + c * shape.kernel
        if shape.kind == "ssd":
            return h * (vd + c + shape.value_heads) + vd * h + c * shape.kernel
        return h * c + h * vd + 2 * h * shape.value_heads + vd * h + c * shape.kernel

    @property
    def num_params(self) -> int:
        """All weights: layers (with their two RMSNorms and any biases), embedding, final norm and LM head."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        per_layer = (
            self.layer_params + 2 * self.hidden_size + self.bias_params_per_layer + self.inactive_params_per_layer
        )
        return self.num_layers * per_layer + embeddings + self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int | float:
        """Bytes of one token's K and V in one layer (KV heads unrepeated; K at the q/k head size, V at the v
        head size; mean over the layers when they differ)."""
        return 2 * self.kv_dim * self.bytes_per_value

    # forward FLOPs, used by CostModel.from_specs and hardware_from_coefficients
    @property
    def attention_flops_per_s2(self) -> float:
        """Forward FLOPs of causal attention per layer, per ``s²``: QKᵀ (``Dqk``) and PV (``Dv``), 2 FLOPs a MAC,
        half the pairs (mean over the layers when they differ)."""
        if not self.layer_heads:
            return 1.0 * self.num_heads * (self.head_dim + self.v_head_dim)
        return self._mean(lambda h: 1.0 * self.num_heads * (h.qk_head_dim + h.v_head_dim))

    @property
    def linear_flops_per_token(self) -> float:
        """Forward FLOPs per token per layer of the projections and MLP, plus the LM head spread over the layers (a
        Gated DeltaNet layer's projections included; its convolution and recurrence are priced apart,
        :mod:`.recurrent`)."""
        return 2.0 * (self.layer_params + self.vocab_size * self.hidden_size / self.num_layers)


# attention layers with a sigmoid output gate from a doubled q_proj
_GATED_ATTENTION = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")


def _mlp_sizes(config) -> tuple[int, int]:
    """``(intermediate size a token uses, inactive weights per layer)``: a dense MLP's ``intermediate_size``; for a
    mixture of experts (``num_experts`` and ``moe_intermediate_size``), the ``num_experts_per_tok`` routed experts plus
    the shared expert, and the other experts' weights (and the router's) as inactive."""
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "n_routed_experts", 0) or 0)
    moe = getattr(config, "moe_intermediate_size", None)
    dense = getattr(config, "intermediate_size", None)
    if experts and moe and (dense is None or getattr(config, "model_type", "") in _GATED_ATTENTION):
        top = int(getattr(config, "num_experts_per_tok", 1) or 1)
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        h = int(config.hidden_size)
        return top * int(moe) + shared, 3 * h * int(moe) * (experts - top) + h * experts
    return int(dense), 0


# Llama presets (Touvron et al. 2023, Llama 2 configs; 30B is LLaMA-1 33B's shape)
MODEL_PRESETS = {
    "llama-7b": ModelSpec("llama-7b", 4096, 32, 32, 32, 11008, 32000),
    "llama-13b": ModelSpec("llama-13b", 5120, 40, 40, 40, 13824, 32000),
    "llama-30b": ModelSpec("llama-30b", 6656, 60, 52, 52, 17920, 32000),
    "llama-70b": ModelSpec("llama-70b", 8192, 80, 64, 8, 28672, 32000),
}


@dataclass(frozen=True)
class HardwareSpec:
    """One rank's compute and its links to other ranks."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s of one rank
    attention_efficiency: float  # achieved fraction of peak in attention kernels
    linear_efficiency: float  # achieved fraction of peak in GEMMs
    intra_bandwidth: float  # bytes/s one way between ranks of a node
    intra_latency: float  # seconds per message inside a node
    inter_bandwidth: float  # bytes/s one way between nodes
    inter_latency: float
    ranks_per_node: int = 8
    overhead_per_layer: float = 0.0  # seconds per layer per micro-batch (launches, norms)
    memory_bytes: float = 80e9
    # bytes/s one way between the rank's device memory and pinned host memory, for activation offloading
    # (hf_hdp.engine.offload); 0: unknown, then offload_ratio="auto" never offloads
    host_bandwidth: float = 0.0


HARDWARE_PRESETS = {
    # H100 SXM: 989 TFLOP/s dense bf16; NVLink 4 450 GB/s per direction; 400 Gb/s InfiniBand NDR per GPU.
    # Efficiencies: FlashAttention-2/3 causal fwd+bwd reaches 40-50% of peak at long context, large bf16
    # GEMMs 60-70%. ByteScale's per-layer LLaMA-7B times imply exactly 2x these rates (CostModel.bytescale).
    # Host link: PCIe Gen5 x16, 32 GT/s x 16 lanes = 63 GB/s raw per direction; pinned-memory copies reach about
    # 50 GB/s per direction (an assumption: the usual ~80% of raw PCIe, not measured here).
    "h100": HardwareSpec("h100", 989e12, 0.45, 0.60, 450e9, 5e-6, 50e9, 15e-6, 8, 2e-5, 80e9, 50e9),
    # This project's CPU machine (2 Xeon cores, 24 GB), ONE rank on one thread (torch.set_num_threads(1), float32,
    # the "reference" attention), from `python benchmarks/calibrate.py --p2p` on the tiny stdlib Llama (hidden 128,
    # 4 layers, vocab 2048): a = 9.9e-8, b = 1.39e-5, c = 1.16e-3 s per layer, residuals within 25% over 64..2048
    # tokens and packed micro-batches. peak_flops is one thread's float32 1024^3 matmul rate (process CPU time);
    # the efficiencies are the fitted rates over it: the reference attention reaches 3.7% (explicit, memory-bound
    # scores), the GEMMs 50%. P2P: gloo two-way exchange between two local processes, 80 us + 2.2 GB/s. "Host"
    # copies on a CPU rank are memory copies into freshly allocated tensors: 1.5-2.0 GB/s on one thread for 4-64 MB
    # (measured with torch.empty_like + copy_), 1.5 GB/s taken.
    "cpu": HardwareSpec("cpu", 2.12e11, 0.0365, 0.495, 2.2e9, 8e-5, 2.2e9, 8e-5, 64, 1.16e-3, 24e9, 1.5e9),
    # One H200 measured with `python benchmarks/calibrate.py --model llama-7b-layers` (torch 2.11, bf16, the
    # "hdp" attention on torch_varlen, 1K-32K tokens and packed micro-batches): a = 9.32e-11, b = 3.20e-6,
    # c = 1.35e-3 s per layer, residuals within 3.5%; a dense bf16 matmul ran at 737 TFLOP/s, attention at
    # 264 (36%) and the GEMMs at 503 (68%). Links as the H100 preset (one GPU was lent: NVLink/IB not measured),
    # the host link too (PCIe Gen5 x16, 50 GB/s per direction assumed, not measured).
    "h200": HardwareSpec("h200", 737e12, 0.358, 0.682, 450e9, 5e-6, 50e9, 15e-6, 8, 1.35e-3, 141e9, 50e9),
    # H100 links with the compute rates fitted to ByteScale's LLaMA-7B per-layer times, usable with any model:
    # from_specs(llama-7b, HARDWARE_PRESETS["bytescale"]) equals CostModel.bytescale() (efficiencies over 989 TFLOP/s:
    # attention about 0.90, linear about 1.18 -- above 1, see CostModel.bytescale for why). The figures are
    # fit.bytescale_hardware(), stored so that importing runs no fit; tests/test_cost.py checks that they match it.
    "bytescale": HardwareSpec(
        "bytescale",
        989e12,
        0.9049421898371894,
        1.1753512268386268,
        450e9,
        5e-6,
        50e9,
        15e-6,
        8,
        0.0003015157858242302,
        80e9,
        50e9,
    ),
}
