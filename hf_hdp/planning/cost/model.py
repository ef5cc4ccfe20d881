"""The cost model: how long a sequence, a piece and a micro-batch take on one rank (pure Python).

Per layer, a whole sequence of ``s`` tokens costs ``a·s² + b·s + c`` seconds for forward plus backward: causal
attention, the projections and MLP, and a per-micro-batch overhead (:mod:`.timing` says how each term is charged,
and how split samples add the communication their compute does not hide).

:class:`CostModel` holds the fields (coefficients, links, layer shapes) and how they are derived; its methods
come by concern from one module each, every one reading top to bottom:

- :mod:`.structure`: the layers it prices (attention or state mixer, masks, K/V shapes), grouped by kind;
- :mod:`.timing`: the time of sequences, ring and head-parallel pieces, segments, micro-batches and the
  gradient all-reduce (compute plus the communication it does not hide);
- :mod:`.offload`: activation offloading's exposed host copies;
- :mod:`.volume`: the bytes and messages each member of a segment sends;
- :mod:`.segments`: a micro-batch's pieces grouped into the segments the attention runs.

Derivation: :meth:`CostModel.from_specs` (a transformers config or :class:`~.specs.ModelSpec` and a
:class:`~.specs.HardwareSpec`), :meth:`CostModel.bytescale` (ByteScale's published per-layer times,
:func:`~.fit.bytescale_fit`), or :func:`~.calibration.calibrate` (timings of this machine).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ..layers import StateShape
from ..reach import LayerMask
from .fit import bytescale_fit
from .memory import layer_activation_bytes_per_token, layer_input_bytes_per_token
from .offload import OffloadTime
from .recurrent import MODES as STATE_SPLITS
from .segments import SegmentOf, segments_of
from .specs import FLOAT32_BYTES, FWD_BWD, HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec
from .structure import LayerKV, LayerStructure
from .timing import TimeTerms, layer_type_times
from .volume import CommVolume

__all__ = ["CostModel", "LayerKV", "SegmentOf", "layer_type_times", "segments_of"]


@dataclass(frozen=True)
class CostModel(LayerStructure, TimeTerms, OffloadTime, CommVolume):
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
    # activation offloading (hf_hdp.engine.offload): bytes/s one way between device and host memory (0: unknown,
    # offload_ratio="auto" then offloads nothing), and what one layer saves per token for backward without
    # recomputation / with it (its input only); see memory.layer_activation_bytes_per_token
    host_bandwidth: float = 0.0
    layer_saved_bytes_per_token: float = 0.0
    layer_input_bytes_per_token: float = 0.0
    # a fixed HDPConfig.offload_ratio (0: off) and whether the layers are recomputed: micro_batch_breakdown adds
    # the copy time compute does not hide (offload_exposed_time); "auto" hides its copies by construction
    offload_ratio: float = 0.0
    offload_checkpointing: bool = False
    # attention heads (0: unknown, and no head-parallel piece is priced or planned)
    num_heads: int = 0
    num_kv_heads: int = 0
    # one LayerMask per layer (hf_hdp.planning.reach.layer_masks of the model's config): sliding-window and
    # chunked layers; empty: every layer full causal (see the module docstring)
    layer_masks: tuple = ()
    # one (num_kv_heads, qk_head_dim, v_head_dim) per layer, K/V priced at value_bytes per value (see the module
    # docstring); empty: every layer num_kv_heads heads of kv_bytes_per_token / (2 num_kv_heads) bytes for K and V
    layer_heads: tuple = ()
    # one entry per layer: () for a layer without a state mixer, a hf_hdp.planning.layers.StateShape (key_heads,
    # key_dim, value_heads, value_dim, kernel, kind) for a Gated DeltaNet, Mamba-2 or short-convolution layer; empty:
    # every layer attention. A state layer has no attention term unless layer_attention says so (its mask and heads
    # are ignored): its convolution and recurrence cost state_rate FLOP/s, and a split sample its exchange (see
    # "State layers" in the module docstring)
    layer_states: tuple = ()
    # one bool per layer: whether it holds an attention; empty: exactly the layers without a state mixer
    layer_attention: tuple = ()
    # achieved FLOP/s of the state layers' convolution and recurrence (needed when layer_states has a state layer)
    state_rate: float = 0.0
    # HDPConfig.state_split: how a split sample's state layers run ("auto": the faster, priced per segment)
    state_split: str = "auto"

    def __post_init__(self) -> None:
        masks = tuple(LayerMask(**m) if isinstance(m, dict) else m for m in self.layer_masks)
        if any(not isinstance(m, LayerMask) for m in masks):
            raise TypeError("CostModel.layer_masks must hold hf_hdp.planning.reach.LayerMask values")
        if masks and len(masks) != self.num_layers:
            raise ValueError(f"CostModel.layer_masks has {len(masks)} masks for {self.num_layers} layers")
        object.__setattr__(self, "layer_masks", masks)
        heads = tuple(tuple(int(x) for x in h) for h in self.layer_heads)
        if heads and (len(heads) != self.num_layers or any(len(h) != 3 or min(h) < 1 for h in heads)):
            raise ValueError(
                f"CostModel.layer_heads needs one (num_kv_heads, qk_head_dim, v_head_dim) of positive "
                f"ints per layer ({self.num_layers}), got {self.layer_heads!r}"
            )
        object.__setattr__(self, "layer_heads", heads)
        states = tuple(StateShape.of(st) if st else () for st in self.layer_states)
        if states and len(states) != self.num_layers:
            raise ValueError(f"CostModel.layer_states has {len(states)} entries for {self.num_layers} layers")
        states = states if any(states) else ()
        object.__setattr__(self, "layer_states", states)
        if states and not self.state_rate > 0:
            raise ValueError(
                "CostModel.state_rate (FLOP/s of the state layers) must be positive when layer_states "
                "has a Gated DeltaNet layer"
            )
        if self.state_split not in STATE_SPLITS:
            raise ValueError(f"CostModel.state_split must be one of {STATE_SPLITS}, got {self.state_split!r}")
        attention = tuple(bool(a) for a in self.layer_attention)
        if attention and len(attention) != self.num_layers:
            raise ValueError(f"CostModel.layer_attention has {len(attention)} entries for {self.num_layers} layers")
        default = tuple(not st for st in states) if states else (True,) * self.num_layers
        object.__setattr__(self, "layer_attention", () if not attention or attention == default else attention)

    # ------------------------------------------------------------ derivation
    @classmethod
    def from_specs(cls, model: ModelSpec, hw: HardwareSpec) -> CostModel:
        """Roofline estimate: forward FLOPs x :data:`FWD_BWD` over the achieved FLOP/s of each kind.

        ``a`` counts causal attention (``2·H·D`` forward FLOPs per ``s²`` per layer), ``b`` the
        projections, the gated MLP and the LM head (``2·(layer_params + V·h/L)`` per token),
        ``c`` is the hardware's per-layer overhead. The gradient reduction is priced as moving every
        parameter in float32; :meth:`~hf_hdp.distributed.mesh.DynamicMesh.reduce_gradients` reduces in the gradients'
        own dtype, so bf16 gradients move half of that.
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
            host_bandwidth=hw.host_bandwidth,
            layer_saved_bytes_per_token=layer_activation_bytes_per_token(model),
            layer_input_bytes_per_token=layer_input_bytes_per_token(model),
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            layer_masks=model.layer_masks,
            layer_heads=()
            if not model.layer_heads and model.v_head_dim == model.head_dim
            else tuple(tuple(h) for h in model.heads_per_layer),
            layer_states=tuple(tuple(st) if st else () for st in model.layer_states),
            layer_attention=model.layer_attention,
            state_rate=hw.peak_flops * hw.linear_efficiency if model.layer_states else 0.0,
        )

    @classmethod
    def from_config(
        cls, config, hardware: str | HardwareSpec = "h100", bytes_per_value: int = 2, name: str | None = None
    ) -> CostModel:
        """:meth:`from_specs` for a transformers config and a hardware preset name (or spec)."""
        hw = HARDWARE_PRESETS[hardware] if isinstance(hardware, str) else hardware
        return cls.from_specs(ModelSpec.from_config(config, name=name, bytes_per_value=bytes_per_value), hw)

    @classmethod
    def default(cls) -> CostModel:
        """LLaMA-7B on H100: the planners' default when no cost model is given."""
        return cls.from_specs(MODEL_PRESETS["llama-7b"], HARDWARE_PRESETS["h100"])

    @classmethod
    def bytescale(cls) -> CostModel:
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

    def with_coefficients(self, a: float, b: float, c: float) -> CostModel:
        return replace(self, a=a, b=b, c=c)

    def to_dict(self) -> dict:
        """The model's fields as JSON-friendly values (``extra`` left out; infinities as ``None``)."""
        d = asdict(self)
        d.pop("extra", None)
        d["layer_masks"] = [{"window": m.window, "chunk": m.chunk} for m in self.layer_masks]
        d["layer_heads"] = [list(h) for h in self.layer_heads]
        d["layer_states"] = [list(st) for st in self.layer_states]
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}
