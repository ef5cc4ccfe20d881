"""Cost model: how long a sequence, a piece and a micro-batch take on one rank (pure Python).

Per layer, a sequence of ``s`` tokens costs ``a·s² + b·s + c`` seconds for forward plus backward:
the quadratic term is causal attention, the linear term the projections and the MLP, the constant
the per-layer overheads. A sequence split over ``k`` ranks with zigzag chunks costs each member
``1/k`` of the compute (zigzag balances the causal work) plus the ring's communication that the
compute does not hide. The model derives ``a``, ``b`` and ``c`` from a transformers config and a
hardware spec, or fits them to timings measured on the current machine (:func:`fit_coefficients`).

Figures behind the presets are named where they are defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# forward + backward of a matmul-dominated layer is about 3x its forward FLOPs
FWD_BWD = 3.0


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that set a decoder's cost."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0
    bytes_per_value: int = 2  # bf16 activations and K/V on the wire

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_config(cls, config, name: str | None = None, bytes_per_value: int = 2) -> "ModelSpec":
        """From a transformers ``PretrainedConfig`` (or anything with the same attribute names)."""
        heads = config.num_attention_heads
        return cls(
            name=name or getattr(config, "name_or_path", "") or type(config).__name__,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            bytes_per_value=bytes_per_value,
        )

    @property
    def layer_params(self) -> int:
        """Weights of one layer's projections and gated MLP (norms ignored)."""
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q + kv + o + mlp

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's K and V in one layer (KV heads unrepeated)."""
        return 2 * self.num_kv_heads * self.head_dim * self.bytes_per_value


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
    "h100": HardwareSpec("h100", 989e12, 0.45, 0.60, 450e9, 5e-6, 50e9, 15e-6, 8, 2e-5, 80e9),
    # This project's CPU machine (2 cores shared by the ranks, gloo over loopback); refine with calibration.
    "cpu": HardwareSpec("cpu", 5e10, 0.25, 0.5, 2e9, 5e-5, 2e9, 5e-5, 64, 2e-4, 24e9),
}


@dataclass(frozen=True)
class CostModel:
    """Seconds per layer for a sequence: ``a·s² + b·s + c``; plus ring communication."""

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

    # ------------------------------------------------------------ derivation
    @classmethod
    def from_specs(cls, model: ModelSpec, hw: HardwareSpec) -> "CostModel":
        # causal attention: QK^T and PV, 2 FLOPs per MAC, half of the s^2 pairs
        attn_flops_per_s2 = FWD_BWD * 2 * model.num_heads * model.head_dim
        lin_flops_per_token = FWD_BWD * 2 * model.layer_params
        return cls(
            a=attn_flops_per_s2 / (hw.peak_flops * hw.attention_efficiency),
            b=lin_flops_per_token / (hw.peak_flops * hw.linear_efficiency),
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
        )

    @classmethod
    def default(cls) -> "CostModel":
        """LLaMA-7B on H100: the planners' default when no cost model is given."""
        return cls.from_specs(MODEL_PRESETS["llama-7b"], HARDWARE_PRESETS["h100"])

    def with_coefficients(self, a: float, b: float, c: float) -> "CostModel":
        return replace(self, a=a, b=b, c=c)

    # ----------------------------------------------------------------- terms
    def attention_time(self, s: float) -> float:
        return self.num_layers * self.a * s * s

    def linear_time(self, s: float) -> float:
        return self.num_layers * self.b * s

    def sequence_time(self, s: float) -> float:
        """Forward + backward of a whole sequence on one rank (all layers)."""
        return self.num_layers * (self.a * s * s + self.b * s + self.c)

    def group_spans_nodes(self, group) -> bool:
        return len({r // self.ranks_per_node for r in group}) > 1

    def hop_time(self, tokens: float, spans_nodes: bool) -> float:
        """One ring hop of ``tokens`` tokens' K/V, all layers: forward K/V, backward K/V, and the
        backward dK/dV in float32."""
        bw, lat = (self.inter_bandwidth, self.inter_latency) if spans_nodes else (self.intra_bandwidth, self.intra_latency)
        volume = tokens * self.kv_bytes_per_token * (2 + 4 / self.value_bytes)
        return self.num_layers * (3 * lat + volume / bw)

    def piece_time(self, s: int, k: int, spans_nodes: bool = False) -> float:
        """Time one member of a ``k``-rank group spends on a sequence of ``s`` tokens.

        Compute is ``1/k`` of the sequence's (zigzag balances the causal work). The ring has
        ``k - 1`` hops per pass; each hop overlaps with one block of ``1/k²`` of the attention, so
        only the part of a hop longer than its block is exposed.
        """
        if k <= 1:
            return self.sequence_time(s)
        compute = self.num_layers * (self.a * s * s / k + self.b * s / k + self.c)
        block = self.num_layers * self.a * s * s / (k * k)
        hop = self.hop_time(s / k, spans_nodes)
        return compute + (k - 1) * max(0.0, hop - block)

    def ring_bytes(self, s: int, k: int) -> float:
        """Bytes one member sends for a sequence on ``k`` ranks in one step (K/V forward and backward
        in the model dtype, dK/dV in float32)."""
        if k <= 1:
            return 0.0
        per_hop = (s / k) * self.kv_bytes_per_token
        grad_hop = per_hop * 4 / self.value_bytes  # dK/dV accumulate in float32
        return self.num_layers * ((k - 1) * 2 * per_hop + k * grad_hop)


def fit_coefficients(lengths: list[int], seconds: list[float], num_layers: int = 1) -> tuple[float, float, float]:
    """Least-squares fit of per-layer ``a, b, c >= 0`` to measured whole-model times of sequences."""
    if len(lengths) != len(seconds) or len(lengths) < 3:
        raise ValueError("calibration needs at least 3 (length, seconds) measurements of equal count")
    rows = [(float(s) * s, float(s), 1.0) for s in lengths]
    ys = [t / num_layers for t in seconds]
    # scale columns so the normal equations are well conditioned
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(3)]
    X = [[r[j] / scale[j] for j in range(3)] for r in rows]
    active = [0, 1, 2]
    while True:
        coef = _lstsq([[x[j] for j in active] for x in X], ys)
        if all(c >= 0 for c in coef) or len(active) == 1:
            break
        active.pop(min(range(len(coef)), key=lambda i: coef[i]))  # drop the most negative term
    full = [0.0, 0.0, 0.0]
    for j, c in zip(active, coef):
        full[j] = max(c, 0.0) / scale[j]
    return full[0], full[1], full[2]


def _lstsq(X: list[list[float]], y: list[float]) -> list[float]:
    n = len(X[0])
    A = [[sum(r[i] * r[j] for r in X) for j in range(n)] for i in range(n)]
    v = [sum(r[i] * yy for r, yy in zip(X, y)) for i in range(n)]
    # Gauss-Jordan with partial pivoting
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
