"""Cost model: how long a sequence, a piece and a micro-batch take on one rank (pure Python).

Time
----
Per layer, a whole sequence of ``s`` tokens costs ``a·s² + b·s + c`` seconds for forward plus
backward (the form ByteScale's balance scheduler uses): the quadratic term is causal attention,
the linear term the projections, the MLP and (spread over the layers) the LM head, the constant
the per-layer overheads of one forward/backward (kernel launches, norms, host work). ``c`` is
charged once per *micro-batch*, not per sequence: a packed micro-batch runs its projections once
over all its tokens (see :meth:`CostModel.micro_batch_time`), and one sequence alone in a
micro-batch costs exactly :meth:`CostModel.sequence_time`.

A sequence split over ``k`` ranks with zigzag chunks costs each member ``1/k`` of the compute
(zigzag balances the causal work) plus the ring communication that compute does not hide. The
model follows :mod:`hf_hdp.attention.ring` message by message: per layer and member,

- forward: ``k-1`` hops of K/V (model dtype), each overlapped with one forward attention block;
- backward: ``k-1`` hops of K/V overlapped with one backward block, and ``k`` hops of the dK/dV
  accumulator in float32. ``ring.py`` sends the accumulator after the block and waits for it at
  once, so those hops are *exposed*; set ``overlap_grad_hops=True`` to model an implementation that
  overlaps them with the next block (ring-flash-attention, ByteScale).

All the pieces of one micro-batch that share a group form ONE ring segment in ``ring.py``: they
share every message, and their blocks add up. :meth:`CostModel.segment_time` models that.

Derivation
----------
``a``, ``b`` and ``c`` come from a transformers config and a hardware spec
(:meth:`CostModel.from_specs`), from ByteScale's published per-layer times
(:meth:`CostModel.bytescale`), or from timings measured on the current machine
(:func:`calibrate`, :func:`fit_coefficients`; ``benchmarks/calibrate.py`` does it for a real model).

Memory
------
:func:`activation_bytes_per_token`, :func:`model_state_bytes`, :func:`memory_per_rank` and
:func:`tokens_per_rank_for_memory` turn a memory budget into the per-rank capacity ``C``
(``tokens_per_rank``) instead of guessing it.

Figures behind the presets are named where they are defined.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Sequence

from .layout import zigzag_member_sizes

# forward + backward of a matmul-dominated layer is about 3x its forward FLOPs (backward = 2x forward)
FWD_BWD = 3.0
# the dK/dV accumulators of the ring backward, and hf_hdp's gradient all-reduce, are float32
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that set a decoder's cost (LLaMA-style: gated MLP, GQA, RMSNorm, untied head by default)."""

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

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_config(cls, config, name: str | None = None, bytes_per_value: int = 2) -> "ModelSpec":
        """From a transformers ``PretrainedConfig`` (or anything with the same attribute names).

        Multimodal configs that keep the decoder in ``text_config`` are read from there.
        """
        if not hasattr(config, "num_hidden_layers") and getattr(config, "text_config", None) is not None:
            config = config.text_config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        q, kv = heads * head_dim, kv_heads * head_dim
        if getattr(config, "attention_bias", False):  # Llama-style: q, k, v and o
            bias = q + 2 * kv + config.hidden_size
        elif getattr(config, "model_type", "").startswith("qwen2"):  # Qwen2: q, k, v always
            bias = q + 2 * kv
        else:
            bias = 0
        if getattr(config, "mlp_bias", False):
            bias += 2 * config.intermediate_size + config.hidden_size
        return cls(
            name=name or getattr(config, "name_or_path", "") or type(config).__name__,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            head_dim=head_dim,
            bytes_per_value=bytes_per_value,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            bias_params_per_layer=bias,
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one layer's projections and gated MLP (norms ignored)."""
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q + kv + o + mlp

    @property
    def num_params(self) -> int:
        """All weights: layers (with their two RMSNorms and any biases), embedding, final norm and LM head."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        per_layer = self.layer_params + 2 * self.hidden_size + self.bias_params_per_layer
        return self.num_layers * per_layer + embeddings + self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's K and V in one layer (KV heads unrepeated)."""
        return 2 * self.num_kv_heads * self.head_dim * self.bytes_per_value

    # forward FLOPs, used by CostModel.from_specs and hardware_from_coefficients
    @property
    def attention_flops_per_s2(self) -> float:
        """Forward FLOPs of causal attention per layer, per ``s²``: QKᵀ and PV, 2 FLOPs a MAC, half the pairs."""
        return 2.0 * self.num_heads * self.head_dim

    @property
    def linear_flops_per_token(self) -> float:
        """Forward FLOPs per token per layer of the projections and MLP, plus the LM head spread over the layers."""
        return 2.0 * (self.layer_params + self.vocab_size * self.hidden_size / self.num_layers)


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


HARDWARE_PRESETS = {
    # H100 SXM: 989 TFLOP/s dense bf16; NVLink 4 450 GB/s per direction; 400 Gb/s InfiniBand NDR per GPU.
    # Efficiencies: FlashAttention-2/3 causal fwd+bwd reaches 40-50% of peak at long context, large bf16
    # GEMMs 60-70%. ByteScale's per-layer LLaMA-7B times imply exactly 2x these rates (CostModel.bytescale).
    "h100": HardwareSpec("h100", 989e12, 0.45, 0.60, 450e9, 5e-6, 50e9, 15e-6, 8, 2e-5, 80e9),
    # This project's CPU machine (2 Xeon cores, 24 GB), ONE rank on one thread (torch.set_num_threads(1), float32,
    # the "reference" attention), from `python benchmarks/calibrate.py --p2p` on the tiny stdlib Llama (hidden 128,
    # 4 layers, vocab 2048): a = 9.9e-8, b = 1.39e-5, c = 1.16e-3 s per layer, residuals within 25% over 64..2048
    # tokens and packed micro-batches. peak_flops is one thread's float32 1024^3 matmul rate (process CPU time);
    # the efficiencies are the fitted rates over it: the reference attention reaches 3.7% (explicit, memory-bound
    # scores), the GEMMs 50%. P2P: gloo two-way exchange between two local processes, 80 us + 2.2 GB/s.
    "cpu": HardwareSpec("cpu", 2.12e11, 0.0365, 0.495, 2.2e9, 8e-5, 2.2e9, 8e-5, 64, 1.16e-3, 24e9),
    # One H200 measured with `python benchmarks/calibrate.py --model llama-7b-layers` (torch 2.11, bf16, the
    # "hdp" attention on torch_varlen, 1K-32K tokens and packed micro-batches): a = 9.32e-11, b = 3.20e-6,
    # c = 1.35e-3 s per layer, residuals within 3.5%; a dense bf16 matmul ran at 737 TFLOP/s, attention at
    # 264 (36%) and the GEMMs at 503 (68%). Links as the H100 preset (one GPU was lent: NVLink/IB not measured).
    "h200": HardwareSpec("h200", 737e12, 0.358, 0.682, 450e9, 5e-6, 50e9, 15e-6, 8, 1.35e-3, 141e9),
}


@dataclass(frozen=True)
class CostModel:
    """Seconds per layer for a sequence: ``a·s² + b·s + c``; plus ring communication and the gradient all-reduce.

    ``a``, ``b``, ``c`` are per layer, forward + backward; every ``*_time`` method returns seconds
    for all ``num_layers`` layers.
    """

    a: float
    b: float
    c: float
    num_layers: int = 1
    kv_bytes_per_token: float = 0.0
    intra_bandwidth: float = float("inf")
    intra_latency: float = 0.0
    inter_bandwidth: float = float("inf")
    inter_latency: float = 0.0
    ranks_per_node: int = 1 << 30
    value_bytes: int = 2
    label: str = "custom"
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # bytes each rank all-reduces once per optimizer step (0: not modelled)
    grad_bytes: float = 0.0
    # True: the backward dK/dV hops overlap the next block (not so in hf_hdp's ring.py, see module docstring)
    overlap_grad_hops: bool = False

    # ------------------------------------------------------------ derivation
    @classmethod
    def from_specs(cls, model: ModelSpec, hw: HardwareSpec) -> "CostModel":
        """Roofline estimate: forward FLOPs x :data:`FWD_BWD` over the achieved FLOP/s of each kind.

        ``a`` counts causal attention (``2·H·D`` forward FLOPs per ``s²`` per layer), ``b`` the
        projections, the gated MLP and the LM head (``2·(layer_params + V·h/L)`` per token),
        ``c`` is the hardware's per-layer overhead. The gradient all-reduce moves every parameter
        in float32 (hf_hdp's :meth:`~hf_hdp.mesh.DynamicMesh.reduce_gradients` reduces in float32).
        """
        return cls(
            a=FWD_BWD * model.attention_flops_per_s2 / (hw.peak_flops * hw.attention_efficiency),
            b=FWD_BWD * model.linear_flops_per_token / (hw.peak_flops * hw.linear_efficiency),
            c=hw.overhead_per_layer,
            num_layers=model.num_layers,
            kv_bytes_per_token=model.kv_bytes_per_token,
            intra_bandwidth=hw.intra_bandwidth,
            intra_latency=hw.intra_latency,
            inter_bandwidth=hw.inter_bandwidth,
            inter_latency=hw.inter_latency,
            ranks_per_node=hw.ranks_per_node,
            value_bytes=model.bytes_per_value,
            label=f"{model.name} on {hw.name}",
            grad_bytes=float(model.num_params * FLOAT32_BYTES),
        )

    @classmethod
    def from_config(cls, config, hardware: str | HardwareSpec = "h100", bytes_per_value: int = 2,
                    name: str | None = None) -> "CostModel":
        """:meth:`from_specs` for a transformers config and a hardware preset name (or spec)."""
        hw = HARDWARE_PRESETS[hardware] if isinstance(hardware, str) else hardware
        return cls.from_specs(ModelSpec.from_config(config, name=name, bytes_per_value=bytes_per_value), hw)

    @classmethod
    def default(cls) -> "CostModel":
        """LLaMA-7B on H100: the planners' default when no cost model is given."""
        return cls.from_specs(MODEL_PRESETS["llama-7b"], HARDWARE_PRESETS["h100"])

    @classmethod
    def bytescale(cls) -> "CostModel":
        """LLaMA-7B with ``a``, ``b``, ``c`` fitted to ByteScale's published per-layer times (see
        :func:`bytescale_fit`), and the H100 preset's links for the ring and the all-reduce.

        Assumptions, since the paper states neither: the published figures are the *forward* time
        of one layer on one HDP rank, and backward costs twice forward for every term
        (``x FWD_BWD``). The fitted forward rates are about twice the ``h100`` preset's: causal
        attention at 895 TFLOP/s (90% of one H100's 989 TFLOP/s dense bf16 peak), the projections
        and MLP at 1,140 TFLOP/s (115%, beyond one GPU). The figures are consistent with a rank of
        two GPUs (tensor parallel 2) at 45% / 58% of peak, or with FP8 GEMMs. ``b`` holds no LM
        head share (the figures are per layer). Use this preset to compare with the paper,
        :meth:`default` for one GPU.
        """
        fit = bytescale_fit()
        base = cls.default()
        return replace(
            base.with_coefficients(FWD_BWD * fit["a"], FWD_BWD * fit["b"], FWD_BWD * fit["c"]),
            label="llama-7b fitted to ByteScale's per-layer times (H100 links)",
            extra={"fit": fit},
        )

    def with_coefficients(self, a: float, b: float, c: float) -> "CostModel":
        return replace(self, a=a, b=b, c=c)

    @property
    def grad_hop_bytes(self) -> int:
        """Bytes per value of the ring's dK/dV accumulators: float32, or float64 for a float64 model."""
        return max(FLOAT32_BYTES, self.value_bytes)

    def to_dict(self) -> dict:
        """The model's fields as JSON-friendly values (``extra`` left out; infinities as ``None``)."""
        d = asdict(self)
        d.pop("extra", None)
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    # ----------------------------------------------------------------- terms
    def attention_time(self, s: float) -> float:
        """The quadratic (attention) part of a whole sequence's time, all layers."""
        return self.num_layers * self.a * s * s

    def linear_time(self, s: float) -> float:
        """The linear part of a whole sequence's time, all layers."""
        return self.num_layers * self.b * s

    def overhead_time(self) -> float:
        """The per-micro-batch constant, all layers: ``num_layers · c``."""
        return self.num_layers * self.c

    def sequence_time(self, s: float) -> float:
        """Forward + backward of a whole sequence alone on one rank (all layers, overhead included)."""
        return self.num_layers * (self.a * s * s + self.b * s + self.c)

    def local_time(self, s: float) -> float:
        """A whole sequence packed into a micro-batch with others: :meth:`sequence_time` without ``c``."""
        return self.num_layers * (self.a * s * s + self.b * s)

    def group_spans_nodes(self, group) -> bool:
        return len({r // self.ranks_per_node for r in group}) > 1

    def message_time(self, nbytes: float, spans_nodes: bool) -> float:
        """One P2P message of ``nbytes``: latency plus bytes over the one-way bandwidth."""
        bw, lat = (self.inter_bandwidth, self.inter_latency) if spans_nodes else (self.intra_bandwidth, self.intra_latency)
        return lat + nbytes / bw

    def hop_time(self, tokens: float, spans_nodes: bool) -> float:
        """One ring hop of ``tokens`` tokens' K/V, all layers: forward K/V, backward K/V, and the
        backward dK/dV in float32 (three messages, none hidden)."""
        kv = tokens * self.kv_bytes_per_token
        grad = kv * self.grad_hop_bytes / self.value_bytes
        return self.num_layers * (
            2 * self.message_time(kv, spans_nodes) + self.message_time(grad, spans_nodes)
        )

    def piece_compute_time(self, s: int, k: int) -> float:
        """One member's compute for a sequence of ``s`` tokens on ``k`` ranks: ``1/k`` of the
        sequence's attention and linear work (no overhead, no communication)."""
        k = max(int(k), 1)
        return self.num_layers * (self.a * s * s + self.b * s) / k

    def segment_breakdown(self, lengths: Sequence[int], k: int, spans_nodes: bool = False) -> tuple[float, float]:
        """``(compute, exposed communication)`` of one member of a ring segment, all layers, overhead excluded.

        The segment holds this member's chunks of every sequence in ``lengths``, all on the same
        ``k`` ranks. Each ring step's block is ``1/k²`` of the segment's attention (zigzag: every
        step of every member does the same causal work); a K/V hop carries the member's share of
        all the sequences (``Σs/k`` tokens) in one message. Forward K/V hops overlap the forward
        block (``1/FWD_BWD`` of it), backward K/V hops the backward block; the ``k`` dK/dV hops are
        exposed unless ``overlap_grad_hops``.
        """
        lengths = [int(s) for s in lengths]
        if k <= 1:
            return sum(self.local_time(s) for s in lengths), 0.0
        sum_s = float(sum(lengths))
        sum_s2 = float(sum(s * s for s in lengths))
        compute = self.num_layers * (self.a * sum_s2 + self.b * sum_s) / k
        block = self.a * sum_s2 / (k * k)
        block_fwd = block / FWD_BWD
        block_bwd = block - block_fwd
        kv = (sum_s / k) * self.kv_bytes_per_token
        t_kv = self.message_time(kv, spans_nodes)
        t_grad = self.message_time(kv * self.grad_hop_bytes / self.value_bytes, spans_nodes)
        exposed = (k - 1) * max(0.0, t_kv - block_fwd)
        if self.overlap_grad_hops:
            exposed += (k - 1) * max(0.0, t_kv + t_grad - block_bwd) + t_grad
        else:
            exposed += (k - 1) * max(0.0, t_kv - block_bwd) + k * t_grad
        return compute, self.num_layers * exposed

    def segment_time(self, lengths: Sequence[int], k: int, spans_nodes: bool = False) -> float:
        """Time one member spends on a ring segment (compute + exposed communication, no overhead)."""
        compute, comm = self.segment_breakdown(lengths, k, spans_nodes)
        return compute + comm

    def piece_time(self, s: int, k: int, spans_nodes: bool = False) -> float:
        """Time one member of a ``k``-rank group spends on a sequence of ``s`` tokens alone in its
        micro-batch: ``1/k`` of the compute, the exposed ring communication, and the overhead.
        ``piece_time(s, 1) == sequence_time(s)``."""
        if k <= 1:
            return self.sequence_time(s)
        return self.overhead_time() + self.segment_time([s], k, spans_nodes)

    def micro_batch_time(self, mb) -> float:
        """Forward + backward of one :class:`~hf_hdp.planning.plan.MicroBatch` on its rank.

        ``num_layers · c`` once, :meth:`local_time` for each whole (``k == 1``) sequence, and
        :meth:`segment_time` for each ring segment: the distributed pieces that share a group, as
        :mod:`hf_hdp.attention.ring` runs them. A micro-batch of one piece costs :meth:`piece_time`.
        """
        return self.micro_batch_breakdown(mb)[0]

    def micro_batch_breakdown(self, mb, segment_cache: dict | None = None) -> tuple[float, float]:
        """``(total time, exposed communication time)`` of a micro-batch (see :meth:`micro_batch_time`).

        ``segment_cache`` (optional, any dict) memoises :meth:`segment_breakdown` by group and
        lengths, so the ``k`` members of a large group cost one evaluation, not ``k``.
        """
        total = self.overhead_time()
        comm = 0.0
        for group, lengths in ring_segments(mb.pieces).items():
            if len(group) <= 1:
                total += sum(self.local_time(s) for s in lengths)
                continue
            key = (group, tuple(lengths))
            found = segment_cache.get(key) if segment_cache is not None else None
            if found is None:
                found = self.segment_breakdown(lengths, len(group), self.group_spans_nodes(group))
                if segment_cache is not None:
                    segment_cache[key] = found
            total += found[0] + found[1]
            comm += found[1]
        return total, comm

    # ------------------------------------------------------------ communication volume
    def ring_bytes(self, s: int, k: int) -> float:
        """Bytes one member sends for a sequence on ``k`` ranks in one step (K/V forward and backward
        in the model dtype, dK/dV in float32), taking the member's share as ``s / k``. Summed over
        the ``k`` members this is exact (:meth:`segment_bytes_sent` gives each member's own figure)."""
        if k <= 1:
            return 0.0
        per_hop = (s / k) * self.kv_bytes_per_token
        grad_hop = per_hop * self.grad_hop_bytes / self.value_bytes  # dK/dV accumulate in float32
        return self.num_layers * ((k - 1) * 2 * per_hop + k * grad_hop)

    def segment_bytes_sent(self, lengths: Sequence[int], k: int, member: int) -> float:
        """Exact bytes member ``member`` of a ring segment sends in one step, all layers.

        In :mod:`hf_hdp.attention.ring`, member ``i`` forwards at step ``t`` the rows of member
        ``i - t``: ``k - 1`` K/V messages in forward and again in backward (every member's rows but
        those of ``i + 1``), and ``k`` float32 dK/dV accumulators (every member's rows once).
        """
        return self.segment_bytes_by_member(lengths, k)[member] if k > 1 else 0.0

    def segment_bytes_by_member(self, lengths: Sequence[int], k: int) -> list[float]:
        """:meth:`segment_bytes_sent` for every member ``0..k-1`` at once."""
        if k <= 1:
            return [0.0] * max(k, 1)
        rows = [0] * k
        for s in lengths:
            for m, n in enumerate(zigzag_member_sizes(int(s), k)):
                rows[m] += n
        total = sum(rows)
        per_row = self.num_layers * self.kv_bytes_per_token
        grad = total * self.grad_hop_bytes / self.value_bytes
        return [per_row * (2 * (total - rows[(i + 1) % k]) + grad) for i in range(k)]

    def segment_messages(self, k: int) -> int:
        """P2P messages one member of a ``k``-rank ring segment sends in one step, all layers:
        ``k - 1`` forward K/V, ``k - 1`` backward K/V and ``k`` dK/dV per layer."""
        return 0 if k <= 1 else self.num_layers * (3 * k - 2)

    def allreduce_time(self, nbytes: float | None = None, world_size: int = 1) -> float:
        """One all-reduce of ``nbytes`` (default :attr:`grad_bytes`) over ``world_size`` ranks.

        Bandwidth term of a ring all-reduce, ``2·(W-1)/W · bytes / bw``, over the inter-node link
        when the world spans nodes; latency ``2·ceil(log2 W)`` messages (NCCL switches to trees
        at scale, where a ring's ``2(W-1)`` latencies would overstate it).
        """
        nbytes = self.grad_bytes if nbytes is None else nbytes
        if world_size <= 1 or nbytes <= 0:
            return 0.0
        spans = world_size > self.ranks_per_node
        bw, lat = (self.inter_bandwidth, self.inter_latency) if spans else (self.intra_bandwidth, self.intra_latency)
        return 2.0 * (world_size - 1) / world_size * nbytes / bw + 2 * math.ceil(math.log2(world_size)) * lat


def ring_segments(pieces) -> dict[tuple[int, ...], list[int]]:
    """The lengths of ``pieces`` by group, as :mod:`hf_hdp.attention.ring` runs them: the key ``(rank,)``
    of a whole local sequence groups the local pieces; every other key is one ring segment."""
    out: dict[tuple[int, ...], list[int]] = {}
    for p in pieces:
        out.setdefault(tuple(p.group), []).append(int(p.length))
    return out


# ---------------------------------------------------------------------------- fitting


def _sums(item) -> tuple[float, float]:
    """``(Σs², Σs)`` of one measurement: a sequence length, or the lengths of a packed micro-batch."""
    if isinstance(item, (int, float)):
        return float(item) * item, float(item)
    items = [float(s) for s in item]
    return sum(s * s for s in items), sum(items)


def fit_coefficients(lengths: list, seconds: list[float], num_layers: int = 1, *, relative: bool = False,
                     quadratic: bool = True) -> tuple[float, float, float]:
    """Least-squares fit of per-layer ``a, b, c >= 0`` to measured whole-model times.

    Each entry of ``lengths`` is one measurement: a sequence length ``s`` (time
    ``L·(a·s² + b·s + c)``), or the lengths of the whole sequences packed into one micro-batch
    (``L·(a·Σs² + b·Σs + c)``). Packed short sequences pin down ``b``: their attention is small.

    ``relative=True`` minimises relative rather than absolute residuals (weights ``1/t``), so short
    sequences count as much as long ones; use it for timings that span orders of magnitude.
    ``quadratic=False`` fixes ``a = 0`` (a purely linear part, e.g. an MLP). Negative coefficients
    are not physical: the most negative term is dropped and the rest refitted (an active-set step).
    """
    if len(lengths) != len(seconds) or len(lengths) < 3:
        raise ValueError("calibration needs at least 3 (length, seconds) measurements of equal count")
    if relative and any(t <= 0 for t in seconds):
        raise ValueError("a relative fit needs positive times")
    rows = [(*_sums(item), 1.0) for item in lengths]
    ys = [t / num_layers for t in seconds]
    weights = [1.0 / y for y in ys] if relative else [1.0] * len(ys)
    # scale columns so the normal equations are well conditioned
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(3)]
    X = [[w * r[j] / scale[j] for j in range(3)] for r, w in zip(rows, weights)]
    yw = [w * y for w, y in zip(weights, ys)]
    active = [0, 1, 2] if quadratic else [1, 2]
    while True:
        coef = _lstsq([[x[j] for j in active] for x in X], yw)
        if all(c >= 0 for c in coef) or len(active) == 1:
            break
        active.pop(min(range(len(coef)), key=lambda i: coef[i]))  # drop the most negative term
    full = [0.0, 0.0, 0.0]
    for j, c in zip(active, coef):
        full[j] = max(c, 0.0) / scale[j]
    return full[0], full[1], full[2]


def _lstsq(X: list[list[float]], y: list[float]) -> list[float]:
    """Least squares via the normal equations (columns pre-scaled by the caller), Gauss-Jordan with pivoting."""
    n = len(X[0])
    A = [[sum(r[i] * r[j] for r in X) for j in range(n)] for i in range(n)]
    v = [sum(r[i] * yy for r, yy in zip(X, y)) for i in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(A[r][col]))
        A[col], A[piv] = A[piv], A[col]
        v[col], v[piv] = v[piv], v[col]
        if abs(A[col][col]) < 1e-300:
            continue
        for r in range(n):
            if r != col:
                f = A[r][col] / A[col][col]
                A[r] = [x - f * y for x, y in zip(A[r], A[col])]
                v[r] -= f * v[col]
    return [v[i] / A[i][i] if abs(A[i][i]) > 1e-300 else 0.0 for i in range(n)]


def predicted_time(cost: CostModel, item) -> float:
    """The model's time of one calibration measurement (a length, or the lengths packed in a micro-batch)."""
    s2, s1 = _sums(item)
    return cost.num_layers * (cost.a * s2 + cost.b * s1 + cost.c)


def relative_residuals(cost: CostModel, lengths: Sequence, seconds: Sequence[float]) -> list[float]:
    """``model / measured - 1`` of each measurement (see :func:`fit_coefficients` for the entries)."""
    return [predicted_time(cost, item) / t - 1.0 for item, t in zip(lengths, seconds)]


def calibrate(measure: Callable, lengths: Iterable, *, base: CostModel | None = None,
              num_layers: int | None = None, repeats: int = 3, warmup: int = 1, relative: bool = True,
              statistic: Callable[[list[float]], float] = statistics.median) -> CostModel:
    """Fit ``a, b, c`` to timings of this machine and return the cost model with them.

    ``measure(s)`` runs forward + backward of one sequence of ``s`` tokens through the whole model
    and returns its seconds; an entry of ``lengths`` may also be a tuple of lengths, which
    ``measure`` runs packed as one micro-batch (see :func:`fit_coefficients`). Each length is measured ``warmup`` times unrecorded, then ``repeats``
    times; ``statistic`` of those counts (the median; ``min`` resists noise from other processes).
    The fit is per layer (``num_layers`` defaults to ``base.num_layers``)
    and relative by default (see :func:`fit_coefficients`). Everything but ``a, b, c`` (links,
    K/V size, gradient bytes) comes from ``base``. ``result.extra["calibration"]`` holds the
    lengths, the counted seconds, the relative residuals and the coefficients.
    """
    lengths = [int(s) if isinstance(s, (int, float)) else tuple(int(x) for x in s) for s in lengths]
    base = base or CostModel(0.0, 0.0, 0.0, num_layers=num_layers or 1, label="calibrated")
    num_layers = num_layers or base.num_layers
    seconds = []
    for s in lengths:
        for _ in range(warmup):
            measure(s)
        seconds.append(float(statistic([measure(s) for _ in range(max(1, repeats))])))
    a, b, c = fit_coefficients(lengths, seconds, num_layers, relative=relative)
    fitted = replace(base, a=a, b=b, c=c, num_layers=num_layers)
    residuals = relative_residuals(fitted, lengths, seconds)
    return replace(
        fitted,
        label=f"{base.label} (calibrated)" if base.label != "calibrated" else base.label,
        extra={**base.extra, "calibration": {"lengths": lengths, "seconds": seconds, "residuals": residuals,
                                             "a": a, "b": b, "c": c, "num_layers": num_layers}},
    )


def hardware_from_coefficients(model: ModelSpec, a: float, b: float, c: float, base: HardwareSpec,
                               peak_flops: float | None = None, name: str | None = None) -> HardwareSpec:
    """The :class:`HardwareSpec` for which :meth:`CostModel.from_specs` (``model``) gives ``a, b, c``:
    efficiencies are the fitted FLOP rates over ``peak_flops`` (default ``base.peak_flops``); the
    links and memory come from ``base``. Turns a calibration on one model into a preset for others."""
    peak = peak_flops or base.peak_flops
    att_rate = FWD_BWD * model.attention_flops_per_s2 / a if a > 0 else peak * base.attention_efficiency
    lin_rate = FWD_BWD * model.linear_flops_per_token / b if b > 0 else peak * base.linear_efficiency
    return replace(base, name=name or f"{base.name} (calibrated)", peak_flops=peak,
                   attention_efficiency=att_rate / peak, linear_efficiency=lin_rate / peak, overhead_per_layer=c)


# ByteScale (arXiv 2502.21231), per-layer time of LLaMA-7B in ms, attention vs MLP (DESIGN §2).
BYTESCALE_LAYER_MS: dict[int, tuple[float, float]] = {
    4096: (0.8, 0.9),
    8192: (1.8, 1.8),
    16384: (4.8, 3.6),
    32768: (14.1, 7.5),
    65536: (48.2, 15.1),
    131072: (175.5, 28.2),
}


def bytescale_fit() -> dict:
    """Fit ByteScale's published per-layer LLaMA-7B times (forward, one layer, in seconds).

    Attention (its projections included) is fitted as ``a·s² + b_att·s + c_att``, the MLP as
    ``b_mlp·s + c_mlp``, both with relative least squares; the layer is their sum
    (``b = b_att + b_mlp``, ``c = c_att + c_mlp``). Returns the coefficients, the relative residuals
    of attention, MLP and layer at each length, the attention/MLP crossover length, and the FLOP
    rates the fit implies (forward FLOPs of LLaMA-7B's layer over the fitted times).
    """
    S = list(BYTESCALE_LAYER_MS)
    att = [BYTESCALE_LAYER_MS[s][0] * 1e-3 for s in S]
    mlp = [BYTESCALE_LAYER_MS[s][1] * 1e-3 for s in S]
    a, b_att, c_att = fit_coefficients(S, att, relative=True)
    _, b_mlp, c_mlp = fit_coefficients(S, mlp, relative=True, quadratic=False)
    b, c = b_att + b_mlp, c_att + c_mlp

    def rel(pred, ys):
        return [round(p / y - 1.0, 4) for p, y in zip(pred, ys)]

    att_pred = [a * s * s + b_att * s + c_att for s in S]
    mlp_pred = [b_mlp * s + c_mlp for s in S]
    layer_res = rel([x + y for x, y in zip(att_pred, mlp_pred)], [x + y for x, y in zip(att, mlp)])
    # crossover: a s^2 + b_att s + c_att = b_mlp s + c_mlp
    qa, qb, qc = a, b_att - b_mlp, c_att - c_mlp
    disc = qb * qb - 4 * qa * qc
    crossover = (-qb + math.sqrt(disc)) / (2 * qa) if qa > 0 and disc >= 0 else float("nan")
    m = MODEL_PRESETS["llama-7b"]
    mlp_flops = 2.0 * 3 * m.hidden_size * m.intermediate_size
    proj_flops = 2.0 * (m.layer_params - 3 * m.hidden_size * m.intermediate_size)
    return {
        "a": a, "b": b, "c": c,
        "attention": {"a": a, "b": b_att, "c": c_att, "residuals": rel(att_pred, att)},
        "mlp": {"b": b_mlp, "c": c_mlp, "residuals": rel(mlp_pred, mlp)},
        "layer_residuals": layer_res,
        "max_abs_residual": max(abs(r) for r in layer_res),
        "lengths": S,
        "crossover_tokens": crossover,
        "implied_flops": {
            "attention_core": m.attention_flops_per_s2 / a if a else float("nan"),
            "linear": (mlp_flops + proj_flops) / b if b else float("nan"),
        },
    }


def _bytescale_hardware() -> HardwareSpec:
    fit = bytescale_fit()
    return hardware_from_coefficients(MODEL_PRESETS["llama-7b"], FWD_BWD * fit["a"], FWD_BWD * fit["b"],
                                      FWD_BWD * fit["c"], HARDWARE_PRESETS["h100"], name="bytescale")


# H100 links with the compute rates fitted to ByteScale's LLaMA-7B per-layer times, usable with any model:
# from_specs(llama-7b, HARDWARE_PRESETS["bytescale"]) equals CostModel.bytescale() (efficiencies over 989 TFLOP/s:
# attention about 0.90, linear about 1.18 -- above 1, see CostModel.bytescale for why).
HARDWARE_PRESETS["bytescale"] = _bytescale_hardware()


# ---------------------------------------------------------------------------- memory


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
