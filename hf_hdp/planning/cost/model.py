"""The time model: how long a sequence, a piece and a micro-batch take on one rank (pure Python).

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

A head-parallel piece of Ulysses degree ``u`` on ``k = u·r`` ranks (:mod:`hf_hdp.attention.ulysses`)
costs each member the same ``1/k`` of the compute, plus, per layer, six all-to-alls inside its
position's sub-group (forward Q, K/V and output; backward dO, dQ and dK/dV), each ``u - 1``
sequential pairwise rounds that nothing hides, and a zigzag ring over the ``r`` positions for its
``1/u`` of the heads: ``r - 1`` hops whose blocks are ``u`` times those of a ring of ``k`` (each
position attends its whole share for its heads) and whose messages carry ``1/u`` of the K/V heads
(more where GQA replicates them). So per-member ring traffic falls by ``u``, which is what takes a
long sample past the ring's wire-time floor. :meth:`CostModel.split_breakdown` prices every split.

Sliding-window and chunked layers (:attr:`CostModel.layer_masks`, one
:class:`~hf_hdp.planning.reach.LayerMask` per layer; empty: every layer full causal, and every figure
is exactly that of the uniform model). Identical layers are grouped (:func:`~.windows.group_masks`), and
every attention term is priced per layer kind: a layer's work for a sample of ``s`` tokens is
``a·mask_pairs(s, mask)`` (:func:`~hf_hdp.planning.reach.mask_pairs`: ``s²`` full, ``2·s·w - w²`` for a
window ``w < s``, ``Σ chunk²`` chunked). A member of a split sample does ``1/k`` of a full layer (zigzag) and,
of a sliding or chunked layer, the visible pairs of its own rows (:func:`~.windows.member_work`: zigzag
keeps the row counts equal, but the rows at the start of a sample or of an attention chunk see fewer keys);
the piece is priced by its slowest member, which the others wait for at each layer's exchange. A layer kind whose
mask restricts the segment's longest document is a *direct* layer of a ring piece; any other is full
for every document and keeps the relay ring above. In a direct layer (:mod:`hf_hdp.attention.ring`)
member ``i`` sends, in ONE message per destination, exactly the rows each other member needs
(:func:`~hf_hdp.planning.reach.needed_rows`; a message of no rows is not sent):

- forward: to each ``m != i`` its needed rows of ``i``'s K/V (model dtype);
- backward: the same K/V messages again, and to each source ``j`` the dK/dV of the rows received from
  it (accumulator dtype, :attr:`CostModel.grad_hop_bytes` per value).

Timing of a direct layer, per member (:meth:`CostModel._direct_exposed`): its messages go out one after
another (each ``latency + bytes / bandwidth``, as the all-to-all rounds are priced), the time of the
exchange being the larger of what it sends and what it receives. The forward K/V exchange overlaps
the member's *own-rows block* (its rows with its own keys: the exact visible pairs, ``≈ 1/k`` of the
layer's work for windows much shorter than the zigzag chunks), the backward K/V exchange the
backward of that block; the dK/dV messages are exposed (with ``overlap_grad_hops``, they overlap the
backward of the blocks with received rows, all but the shortest message). The segment waits for its
slowest member, so a direct layer's exposed time is the maximum over the members. A head-parallel
piece's ring over its ``r`` positions does the same over the positions' zigzag layout, each message
carrying the member's ``1/u`` of the K/V heads, its own-rows block ``1/u`` of its position's.

K/V heads and head sizes per layer (:attr:`CostModel.layer_heads`, one ``(num_kv_heads, qk_head_dim,
v_head_dim)`` per layer; empty: every layer has :attr:`CostModel.num_kv_heads` heads and K and V of
``kv_bytes_per_token / 2`` bytes each). Every message is priced with its layer's own shapes: K rows at the
q/k head size and V rows at the v head size (multi-head latent attention: 192 and 128 in DeepSeek-V3),
Ulysses' Q and dQ at the q/k size and its output and dO at the v size, and each layer's own K/V heads
(Gemma 4's full layers have wider heads and other K/V heads than its sliding ones). Layers are grouped by
``(mask, heads)`` (:attr:`CostModel.layer_kinds`), so a uniform model's figures are exactly those of one group.

State layers (:attr:`CostModel.layer_states`: Gated DeltaNet, Qwen3.5 and Qwen3-Next's ``"linear_attention"``
layers; Mamba-2, Nemotron-H, Bamba, Granite 4 hybrid, Falcon-H1 and Zamba 2; LFM2's short convolutions). The ``a`` term
counts the attention layers only (:attr:`CostModel.attention_layers`: the layers without a state mixer, unless
:attr:`CostModel.layer_attention` says which: Falcon-H1's and Zamba 2's hybrid layers hold both, Nemotron-H's MLP
layers neither; their masks and heads as above), ``b`` every layer (the mean per-token projections and MLPs, a state
layer's own included: :meth:`~.specs.ModelSpec.state_layer_params`), and each state layer adds its convolution and
chunked recurrence (a short convolution: its convolution only),
linear in ``s`` (:func:`~.recurrent.local_state_flops` at :attr:`CostModel.state_rate`). A split segment's state layers
run by :attr:`CostModel.state_split` (``"auto"``: per segment, the faster of head-parallel and the state scan on the
segment's links), each priced by its slowest member's compute and exchange (:func:`~.recurrent.state_segment_time`);
their bytes and messages per member are exact (:func:`~.recurrent.state_split_loads`, in the state layers' compute
dtype: float32, or the model's dtype if wider) and are added to :meth:`CostModel.segment_bytes_by_member` and
:meth:`CostModel.segment_messages_by_member`. A model without state layers keeps every figure exactly.

Derivation: :meth:`CostModel.from_specs` (a transformers config or :class:`~.specs.ModelSpec` and a
:class:`~.specs.HardwareSpec`), :meth:`CostModel.bytescale` (ByteScale's published per-layer times,
:func:`~.fit.bytescale_fit`), or :func:`~.calibration.calibrate` (timings of this machine).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
from typing import NamedTuple, Sequence

from ..layout import even_split, head_rings, head_split, ring_positions, zigzag_member_sizes
from ..reach import FULL, LayerMask, mask_pairs
from .fit import bytescale_fit
from ..layers import StateShape
from .memory import layer_activation_bytes_per_token, layer_input_bytes_per_token, offloaded_layers
from .recurrent import MODES as STATE_SPLITS
from .recurrent import local_state_flops, state_segment_time, state_split_loads
from .specs import FLOAT32_BYTES, FWD_BWD, HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec
from .windows import SegmentExchange, describe_layer_masks, group_masks, segment_exchange, slowest_member_pairs


class LayerKV(NamedTuple):
    """What one layer's attention moves per token: ``heads`` K/V heads, ``k`` bytes per K head (a Q head is as
    wide), ``v`` bytes per V head (an output head is as wide), ``row`` bytes of all its K and V."""

    heads: int
    k: float
    v: float
    row: float


@lru_cache(maxsize=65536)
def _restricted_pairs(groups: tuple, s) -> float | None:
    """``Σ_layers mask_pairs(s, mask)`` for the grouped masks, or ``None`` when no layer restricts ``s`` tokens."""
    if not any(m.restricts(s) for m, _ in groups):
        return None
    n = int(s)
    return float(sum(count * mask_pairs(n, m) for m, count in groups))


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
            raise ValueError(f"CostModel.layer_heads needs one (num_kv_heads, qk_head_dim, v_head_dim) of positive "
                             f"ints per layer ({self.num_layers}), got {self.layer_heads!r}")
        object.__setattr__(self, "layer_heads", heads)
        states = tuple(StateShape.of(st) if st else () for st in self.layer_states)
        if states and len(states) != self.num_layers:
            raise ValueError(f"CostModel.layer_states has {len(states)} entries for {self.num_layers} layers")
        states = states if any(states) else ()
        object.__setattr__(self, "layer_states", states)
        if states and not self.state_rate > 0:
            raise ValueError("CostModel.state_rate (FLOP/s of the state layers) must be positive when layer_states "
                             "has a Gated DeltaNet layer")
        if self.state_split not in STATE_SPLITS:
            raise ValueError(f"CostModel.state_split must be one of {STATE_SPLITS}, got {self.state_split!r}")
        attention = tuple(bool(a) for a in self.layer_attention)
        if attention and len(attention) != self.num_layers:
            raise ValueError(f"CostModel.layer_attention has {len(attention)} entries for {self.num_layers} layers")
        default = tuple(not st for st in states) if states else (True,) * self.num_layers
        object.__setattr__(self, "layer_attention", () if not attention or attention == default else attention)

    @cached_property
    def attention_layer_index(self) -> tuple[int, ...]:
        """The layers that hold an attention (all but the state layers, unless :attr:`layer_attention` says which)."""
        if self.layer_attention:
            return tuple(i for i, a in enumerate(self.layer_attention) if a)
        return tuple(i for i in range(self.num_layers) if not self.layer_states or not self.layer_states[i])

    @property
    def _composite(self) -> bool:
        """Whether some layer is not a plain attention layer (a state layer, or one without attention)."""
        return bool(self.layer_states or self.layer_attention)

    @cached_property
    def attention_layers(self) -> int:
        """How many layers are attention: the ``a`` term counts these only."""
        return len(self.attention_layer_index)

    @cached_property
    def state_kinds(self) -> tuple[tuple[StateShape, int], ...]:
        """``(StateShape, layers)`` per distinct state layer shape; ``()`` when there is none."""
        counts: dict = {}
        for st in self.layer_states:
            if st:
                counts[st] = counts.get(st, 0) + 1
        return tuple(counts.items())

    @property
    def state_value_bytes(self) -> int:
        """Bytes per value of the state layers' messages: they compute in float32 at least (the model's dtype if
        wider)."""
        return max(FLOAT32_BYTES, self.value_bytes)

    @cached_property
    def attention_model(self) -> "CostModel":
        """This model's attention layers alone: no state layers and no linear term (``b = 0``). A hybrid model prices
        its attention terms with it, then adds ``b`` over all its layers and the state layers (:meth:`state_breakdown`)."""
        if not self.layer_states and not self.layer_attention:
            return replace(self, b=0.0)
        return replace(self, num_layers=self.attention_layers, b=0.0, layer_states=(), state_rate=0.0, layer_attention=(),
                       layer_masks=self._attention_masks() if self.layer_masks else (),
                       layer_heads=tuple(self.layer_heads[i] for i in self.attention_layer_index)
                       if self.layer_heads else ())

    def _attention_masks(self) -> tuple:
        masks = self.layer_masks or (FULL,) * self.num_layers
        return tuple(masks[i] for i in self.attention_layer_index)

    @cached_property
    def layer_kvs(self) -> tuple[LayerKV, ...]:
        """:class:`LayerKV` of every attention layer (:attr:`layer_heads`, or the uniform figures)."""
        if not self.layer_heads:
            hb = self.kv_bytes_per_token / (2 * self.num_kv_heads) if self.num_kv_heads else self.kv_bytes_per_token / 2
            return (LayerKV(self.num_kv_heads, hb, hb, self.kv_bytes_per_token),) * self.attention_layers
        vb = self.value_bytes
        return tuple(LayerKV(h, qk * vb, v * vb, h * (qk + v) * vb)
                     for h, qk, v in (self.layer_heads[i] for i in self.attention_layer_index))

    @cached_property
    def kv_groups(self) -> tuple[tuple[LayerKV, int], ...]:
        """``(LayerKV, layers)`` per distinct layer shape, in first-seen order."""
        counts: dict = {}
        for kv in self.layer_kvs:
            counts[kv] = counts.get(kv, 0) + 1
        return tuple(counts.items())

    @cached_property
    def layer_kinds(self) -> tuple[tuple[LayerMask, LayerKV, int], ...]:
        """``(mask, LayerKV, layers)`` per distinct pair, in first-seen order."""
        counts: dict = {}
        for mask, kv in zip(self._attention_masks(), self.layer_kvs):
            counts[mask, kv] = counts.get((mask, kv), 0) + 1
        return tuple((m, kv, n) for (m, kv), n in counts.items())

    @cached_property
    def mask_groups(self) -> tuple[tuple[LayerMask, int], ...]:
        """``(mask, layers)`` per distinct attention layer mask; ``()`` when every attention layer is full causal."""
        return group_masks(self._attention_masks()) if self.layer_masks else ()

    def with_layer_masks(self, masks) -> "CostModel":
        """This model with one :class:`~hf_hdp.planning.reach.LayerMask` per layer (``()``: all full)."""
        masks = tuple(masks)
        return replace(self, layer_masks=() if all(m.full for m in masks) else masks)

    def describe_layers(self) -> str:
        """``"40 sliding (w=1024), 8 full"``; ``"32 full"`` for a uniform model; ``"24 Gated DeltaNet (16x128 key,
        32x128 value heads, kernel 4), 8 full"`` with state layers."""
        if not self.state_kinds and not self.layer_attention:
            return describe_layer_masks(self.layer_masks, self.attention_layers)
        parts = [f"{n} {label}" for label, n, _ in self._layer_groups() if label]
        alone = [i for i in self.attention_layer_index if not self.layer_states or not self.layer_states[i]]
        if alone:
            masks = self.layer_masks or (FULL,) * self.num_layers
            parts.append(describe_layer_masks(tuple(masks[i] for i in alone) if self.layer_masks else (), len(alone)))
        return ", ".join(parts)

    def _layer_groups(self) -> list:
        """``[(label, layers, StateShape | None), ...]`` of the layers with a state mixer (``"Mamba-2 (...)"``, or
        ``"hybrid (full attention + Mamba-2 (...))"`` beside an attention), then of those with neither (``"MLP only"``);
        attention-only layers have label ``""`` (described by their masks)."""
        masks = self.layer_masks or (FULL,) * self.num_layers
        attention = set(self.attention_layer_index)
        groups: dict = {}
        for i in range(self.num_layers):
            st = self.layer_states[i] if self.layer_states else ()
            if st and i in attention:
                label = f"hybrid ({describe_layer_masks((masks[i],), 1).split(' ', 1)[1]} attention + {st.describe()})"
            elif st:
                label = st.describe()
            elif i in attention:
                continue
            else:
                label = "MLP only"
            key = (label, st or None)
            groups[key] = groups.get(key, 0) + 1
        order = sorted(groups.items(), key=lambda kv: kv[0][0] == "MLP only")
        return [(label, n, st) for (label, st), n in order]

    def _pairs(self, s) -> float | None:
        """All layers' ``mask_pairs(s, mask)``, or ``None`` when every layer is full causal for ``s`` tokens
        (the caller then uses the uniform formulas, so that those figures stay exactly as they were)."""
        return _restricted_pairs(self.mask_groups, s) if self.mask_groups else None

    def _segment_kinds(self, lengths: Sequence[int]):
        """``[(mask, count, direct, LayerKV), ...]``: the layer groups of a segment of ``lengths``, or ``None`` when no
        layer restricts its longest document."""
        groups = self.mask_groups
        if not groups or not lengths:
            return None
        longest = max(lengths)
        if not any(m.restricts(longest) for m, _ in groups):
            return None
        return [(m, count, m.restricts(longest), kv) for m, kv, count in self.layer_kinds]

    # ------------------------------------------------------------ derivation
    @classmethod
    def from_specs(cls, model: ModelSpec, hw: HardwareSpec) -> "CostModel":
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
            layer_heads=() if not model.layer_heads and model.v_head_dim == model.head_dim else
            tuple(tuple(h) for h in model.heads_per_layer),
            layer_states=tuple(tuple(st) if st else () for st in model.layer_states),
            layer_attention=model.layer_attention,
            state_rate=hw.peak_flops * hw.linear_efficiency if model.layer_states else 0.0,
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
        d["layer_masks"] = [{"window": m.window, "chunk": m.chunk} for m in self.layer_masks]
        d["layer_heads"] = [list(h) for h in self.layer_heads]
        d["layer_states"] = [list(st) for st in self.layer_states]
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    # ----------------------------------------------------------------- terms
    def attention_time(self, s: float) -> float:
        """The quadratic (attention) part of a whole sequence's time, all layers: ``a·Σ_layers mask_pairs(s, mask)``."""
        pairs = self._pairs(s)
        if pairs is None:
            return self.attention_layers * self.a * s * s
        return self.a * pairs

    def linear_time(self, s: float) -> float:
        """The linear part of a whole sequence's time, all layers."""
        return self.num_layers * self.b * s

    def overhead_time(self) -> float:
        """The per-micro-batch constant, all layers: ``num_layers · c``."""
        return self.num_layers * self.c

    def sequence_time(self, s: float) -> float:
        """Forward + backward of a whole sequence alone on one rank (all layers, overhead included)."""
        if self._composite:
            return self.local_time(s) + self.overhead_time()
        pairs = self._pairs(s)
        if pairs is None:
            return self.num_layers * (self.a * s * s + self.b * s + self.c)
        return self.a * pairs + self.num_layers * (self.b * s + self.c)

    def local_time(self, s: float) -> float:
        """A whole sequence packed into a micro-batch with others: :meth:`sequence_time` without ``c``."""
        if self._composite:
            return self.attention_time(s) + self.num_layers * self.b * s + self.state_local_time(s)
        pairs = self._pairs(s)
        if pairs is None:
            return self.num_layers * (self.a * s * s + self.b * s)
        return self.a * pairs + self.num_layers * self.b * s

    # ------------------------------------------------------------ state (Gated DeltaNet) layers
    def state_local_time(self, s: float) -> float:
        """Forward + backward of the state layers' convolution and recurrence over a whole sequence on one rank, all
        state layers (their projections are in ``b``); 0 without state layers."""
        if not self.state_kinds:
            return 0.0
        return FWD_BWD * sum(n * local_state_flops(int(s), st) for st, n in self.state_kinds) / self.state_rate

    def _state_links(self, spans_nodes: bool) -> tuple[float, float]:
        return (self.inter_bandwidth, self.inter_latency) if spans_nodes else (self.intra_bandwidth, self.intra_latency)

    def state_breakdown(self, lengths: Sequence[int], k: int, ulysses: int = 1,
                        spans_nodes: bool = False) -> tuple[float, float]:
        """``(compute, exchange)`` of the state layers of a segment of ``lengths`` on ``k`` ranks (its rows laid out
        for Ulysses degree ``ulysses``): per layer shape, its slowest member's, by the method :attr:`state_split`
        gives (:func:`~.recurrent.state_segment_time`); all state layers. ``k == 1``: :meth:`state_local_time`."""
        if not self.state_kinds:
            return 0.0, 0.0
        if k <= 1:
            return sum(self.state_local_time(s) for s in lengths), 0.0
        bw, lat = self._state_links(spans_nodes)
        docs = tuple(sorted(int(s) for s in lengths))
        compute = comm = 0.0
        for st, n in self.state_kinds:
            _, c, e = state_segment_time(docs, k, max(ulysses, 1), st, self.state_split, self.state_rate, bw, lat,
                                         self.state_value_bytes)
            compute += n * c
            comm += n * e
        return compute, comm

    def state_methods(self, lengths: Sequence[int], k: int, ulysses: int = 1,
                      spans_nodes: bool | None = None) -> dict:
        """``{StateShape: "heads" | "scan"}``: how each state layer shape runs a segment of ``lengths`` on ``k`` ranks
        (``spans_nodes`` ``None``: the inter-node links when ``k`` exceeds :attr:`ranks_per_node`, as
        :func:`hf_hdp.attention.recurrent.split.choose_split` assumes)."""
        if k <= 1:
            return {}
        spans = k > self.ranks_per_node if spans_nodes is None else spans_nodes
        bw, lat = self._state_links(spans)
        docs = tuple(sorted(int(s) for s in lengths))
        return {st: state_segment_time(docs, k, max(ulysses, 1), st, self.state_split, self.state_rate, bw, lat,
                                       self.state_value_bytes)[0] for st, _ in self.state_kinds}

    def _state_loads(self, lengths: Sequence[int], k: int, ulysses: int):
        """``[(layers, per-member MemberLoad), ...]`` of the state layers of a segment, by :meth:`state_methods`."""
        docs = tuple(sorted(int(s) for s in lengths))
        u = max(ulysses, 1)
        return [(n, state_split_loads(docs, k, u, st, method))
                for (st, n), method in zip(self.state_kinds, self.state_methods(docs, k, u).values())]

    def group_spans_nodes(self, group) -> bool:
        return len({r // self.ranks_per_node for r in group}) > 1

    def message_time(self, nbytes: float, spans_nodes: bool) -> float:
        """One P2P message of ``nbytes``: latency plus bytes over the one-way bandwidth."""
        bw, lat = (self.inter_bandwidth, self.inter_latency) if spans_nodes else (self.intra_bandwidth, self.intra_latency)
        return lat + nbytes / bw

    def hop_time(self, tokens: float, spans_nodes: bool) -> float:
        """One ring hop of ``tokens`` tokens' K/V, all layers: forward K/V, backward K/V, and the
        backward dK/dV in float32 (three messages, none hidden). A relay-ring hop: sliding and chunked
        layers exchange directly instead (:meth:`segment_bytes_by_member`)."""
        total = 0.0
        for layer, count in self.kv_groups:
            kv = tokens * layer.row
            grad = kv * self.grad_hop_bytes / self.value_bytes
            total += count * (2 * self.message_time(kv, spans_nodes) + self.message_time(grad, spans_nodes))
        return total

    def piece_compute_time(self, s: int, k: int) -> float:
        """One member's compute for a sequence of ``s`` tokens on ``k`` ranks: ``1/k`` of the
        sequence's attention and linear work (no overhead, no communication)."""
        k = max(int(k), 1)
        if self._composite:
            return (self.attention_model.piece_compute_time(s, k) + self.num_layers * self.b * s / k
                    + self.state_breakdown([s], k)[0])
        pairs = self._pairs(s)
        if pairs is None:
            return self.num_layers * (self.a * s * s + self.b * s) / k
        if k == 1:
            return self.a * pairs + self.num_layers * self.b * s
        attention = sum(count * (slowest_member_pairs((s,), k, m) if m.restricts(s) else s * s / k)
                        for m, count in self.mask_groups)
        return self.a * attention + self.num_layers * self.b * s / k

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
        if self._composite:  # the attention layers as below, plus the state layers' compute and exchange
            compute, exposed = self.attention_model.segment_breakdown(lengths, k, spans_nodes)
            st_compute, st_comm = self.state_breakdown(lengths, k, 1, spans_nodes)
            return compute + self.num_layers * self.b * sum(lengths) / k + st_compute, exposed + st_comm
        sum_s = float(sum(lengths))
        sum_s2 = float(sum(s * s for s in lengths))
        kinds = self._segment_kinds(lengths)
        if kinds is None:
            compute = self.num_layers * (self.a * sum_s2 + self.b * sum_s) / k
            exposed = sum(count * self._ring_exposed(k, self.a * sum_s2 / (k * k), (sum_s / k) * kv.row, spans_nodes)
                          for kv, count in self.kv_groups)
            return compute, exposed
        member, exposed = 0.0, 0.0  # the slowest member's attention, in mask_pairs units
        docs = tuple(sorted(lengths))
        for mask, count, direct, kv in kinds:
            if direct:
                pairs = float(sum(mask_pairs(s, mask) for s in lengths))
                exposed += count * self._direct_exposed(segment_exchange(docs, k, mask), self.a * pairs / k,
                                                        kv.row, spans_nodes)
                member += count * slowest_member_pairs(docs, k, mask)
            else:
                exposed += count * self._ring_exposed(k, self.a * sum_s2 / (k * k), (sum_s / k) * kv.row, spans_nodes)
                member += count * sum_s2 / k
        return self.a * member + self.num_layers * self.b * sum_s / k, exposed

    def _direct_exposed(self, ex: SegmentExchange, block: float, row_bytes: float, spans_nodes: bool,
                        share: int = 1) -> float:
        """Exposed seconds, one layer, of a direct (sliding or chunked) exchange ``ex``: the slowest member's.

        ``block``: one member's attention of the layer, forward + backward (seconds); ``row_bytes``: bytes of
        one row's K and V on the wire; ``share``: the member's fraction ``1/share`` of the heads (Ulysses), which
        divides its own-rows block (see the module docstring).
        """
        acc = self.grad_hop_bytes / self.value_bytes
        bw, lat = (self.inter_bandwidth, self.inter_latency) if spans_nodes else (self.intra_bandwidth, self.intra_latency)

        def burst(count: int, rows: int, per_row: float) -> float:  # count messages one after another
            return count * lat + rows * per_row / bw if count else 0.0

        worst = 0.0
        for i in range(len(ex.own)):
            n_out, n_in = ex.sent_messages[i], ex.received_messages[i]
            if not n_out and not n_in:
                continue
            t_kv = max(burst(n_out, ex.sent_rows[i], row_bytes), burst(n_in, ex.received_rows[i], row_bytes))
            # dK/dV go back to the sources (n_in messages) and come from the destinations (n_out)
            t_grad = max(burst(n_in, ex.received_rows[i], row_bytes * acc), burst(n_out, ex.sent_rows[i], row_bytes * acc))
            own = 2.0 * self.a * ex.own[i] / share  # forward + backward of its rows with its own keys
            own_fwd = own / FWD_BWD
            own_bwd = own - own_fwd
            exposed = max(0.0, t_kv - own_fwd) + max(0.0, t_kv - own_bwd)
            if self.overlap_grad_hops and t_grad > 0:
                remote_bwd = max(0.0, block * (1.0 - 1.0 / FWD_BWD) - own_bwd)
                exposed += max(t_grad / max(n_in, n_out), t_grad - remote_bwd)  # the last message is exposed
            else:
                exposed += t_grad
            worst = max(worst, exposed)
        return worst

    def _ring_exposed(self, k: int, block: float, kv: float, spans_nodes: bool) -> float:
        """Exposed seconds, one layer, of a ``k``-hop ring whose blocks take ``block`` (forward + backward)
        and whose K/V messages are ``kv`` bytes (see :meth:`segment_breakdown`)."""
        if k <= 1:
            return 0.0
        block_fwd = block / FWD_BWD
        block_bwd = block - block_fwd
        t_kv = self.message_time(kv, spans_nodes)
        t_grad = self.message_time(kv * self.grad_hop_bytes / self.value_bytes, spans_nodes)
        exposed = (k - 1) * max(0.0, t_kv - block_fwd)
        if self.overlap_grad_hops:
            exposed += (k - 1) * max(0.0, t_kv + t_grad - block_bwd) + t_grad
        else:
            exposed += (k - 1) * max(0.0, t_kv - block_bwd) + k * t_grad
        return exposed

    # ------------------------------------------------------------ head-parallel pieces
    @property
    def head_bytes(self) -> float:
        """Bytes of one token's one K (or Q) head of the first layer in the model dtype: ``head_dim · value_bytes``
        (each layer's own figures: :attr:`layer_kvs`)."""
        return self.layer_kvs[0].k if self.num_kv_heads and self.layer_kvs else 0.0

    def ulysses_degrees(self, k: int, ranks_per_node: int | None = None) -> list[int]:
        """The Ulysses degrees ``u > 1`` a group of ``k`` ranks can take: ``u`` divides ``k`` and the query
        heads, and a sub-group of ``u`` fits in one node. Empty when the heads are unknown."""
        rpn = self.ranks_per_node if ranks_per_node is None else ranks_per_node
        if not self.num_heads:
            return []
        return [u for u in range(2, min(k, rpn, self.num_heads) + 1) if k % u == 0 and self.num_heads % u == 0]

    def split_breakdown(self, lengths: Sequence[int], group: Sequence[int], ulysses: int = 1) -> tuple[float, float]:
        """``(compute, exposed communication)`` of one member of a segment of ``lengths`` on ``group`` with
        Ulysses degree ``ulysses``, all layers, overhead excluded (see the module docstring). ``ulysses=1``
        is :meth:`segment_breakdown`."""
        group = tuple(group)
        k = len(group)
        if ulysses <= 1 or k <= 1:
            return self.segment_breakdown(lengths, k, self.group_spans_nodes(group))
        a2a_spans = any(self.group_spans_nodes(g) for g in ring_positions(group, ulysses))
        ring_spans = any(self.group_spans_nodes(g) for g in head_rings(group, ulysses))
        return self.head_parallel_breakdown(lengths, k, ulysses, a2a_spans, ring_spans)

    def head_parallel_breakdown(self, lengths: Sequence[int], k: int, ulysses: int, a2a_spans: bool,
                                ring_spans: bool) -> tuple[float, float]:
        """:meth:`split_breakdown` for ``ulysses > 1``, given whether the sub-groups' all-to-alls and the
        positions' rings cross nodes."""
        u, r = ulysses, k // ulysses
        lengths = [int(s) for s in lengths]
        if self._composite:
            compute, exposed = self.attention_model.head_parallel_breakdown(lengths, k, u, a2a_spans, ring_spans)
            st_compute, st_comm = self.state_breakdown(lengths, k, u, a2a_spans or ring_spans)
            return compute + self.num_layers * self.b * sum(lengths) / k + st_compute, exposed + st_comm
        sum_s = float(sum(lengths))
        sum_s2 = float(sum(s * s for s in lengths))
        kinds = self._segment_kinds(lengths)
        compute = self.num_layers * (self.a * sum_s2 + self.b * sum_s) / k
        acc = self.grad_hop_bytes / self.value_bytes
        rows = sum_s / k  # this member's rows; each round sends one sub-member's heads of them

        def member_kv_row(kv: LayerKV) -> float:  # one row of the member's K/V heads (the most any member holds)
            return max(len(sp.kv_heads) for sp in head_split(self.num_heads, kv.heads, u)) * (kv.k + kv.v)

        def a2a(kv: LayerKV) -> float:  # one layer's six all-to-alls, (u - 1) rounds each
            q_msg, o_msg = rows * (self.num_heads / u) * kv.k, rows * (self.num_heads / u) * kv.v
            rounds = (self.message_time(q_msg, a2a_spans) * (1 + acc)  # Q, dQ (accumulator)
                      + self.message_time(o_msg, a2a_spans) * 2  # output, dO
                      + self.message_time(rows * member_kv_row(kv), a2a_spans) * (1 + acc))  # K/V, dK/dV (acc.)
            return (u - 1) * rounds

        if kinds is None:
            exposed = 0.0
            for kv, count in self.kv_groups:  # a position's rows of this member's K/V heads go round the ring
                ring_kv = (sum_s / r) * member_kv_row(kv)
                exposed += count * (a2a(kv) + self._ring_exposed(r, self.a * sum_s2 / (r * r * u), ring_kv, ring_spans))
            return compute, exposed
        member, exposed = 0.0, 0.0  # the slowest member's attention (its position's, for its 1/u of the heads)
        docs = tuple(sorted(lengths))
        for mask, count, direct, kv in kinds:
            pairs = float(sum(mask_pairs(s, mask) for s in lengths)) if direct else sum_s2
            member += count * (slowest_member_pairs(docs, r, mask) / u if direct else sum_s2 / k)
            exposed += count * a2a(kv)
            if r <= 1:
                continue
            if direct:  # the positions exchange directly: position layout, this member's K/V heads
                exposed += count * self._direct_exposed(segment_exchange(docs, r, mask), self.a * pairs / k,
                                                        member_kv_row(kv), ring_spans, share=u)
            else:
                exposed += count * self._ring_exposed(r, self.a * sum_s2 / (r * r * u), (sum_s / r) * member_kv_row(kv),
                                                      ring_spans)
        compute = self.a * member + self.num_layers * self.b * sum_s / k
        return compute, exposed

    def split_piece_time(self, s: int, group: Sequence[int], ulysses: int = 1) -> float:
        """:meth:`piece_time` of a sequence alone in its micro-batch on ``group`` with Ulysses degree ``ulysses``."""
        if len(group) <= 1:
            return self.sequence_time(s)
        compute, comm = self.split_breakdown([s], group, ulysses)
        return self.overhead_time() + compute + comm

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

    def micro_batch_breakdown(self, mb, segment_cache: dict | None = None, segments=None) -> tuple[float, float]:
        """``(total time, exposed communication time)`` of a micro-batch (see :meth:`micro_batch_time`).

        ``segment_cache`` (optional, a dict serving ONE plan) memoises :meth:`split_breakdown` by the
        segment's samples, so the ``k`` members of a large group cost one evaluation, not ``k``.
        ``segments``: :func:`segments_of` of ``mb.pieces``, when the caller has it already.
        """
        total = self.overhead_time()
        comm = 0.0
        for seg in segments_of(mb.pieces) if segments is None else segments:
            if len(seg.group) <= 1:
                total += sum(self.local_time(s) for s in seg.lengths)
                continue
            found = segment_cache.get(seg.key) if segment_cache is not None else None
            if found is None:
                found = self.split_breakdown(seg.lengths, seg.group, seg.ulysses)
                if segment_cache is not None:
                    segment_cache[seg.key] = found
            total += found[0] + found[1]
            comm += found[1]
        if self.offload_ratio > 0 and mb.pieces:
            total += self.offload_exposed_time(mb.num_tokens, self.micro_batch_attention_time(mb),
                                               offloaded_layers(self.offload_ratio, self.num_layers),
                                               self.offload_checkpointing)
        return total, comm

    # ------------------------------------------------------------ activation offloading
    def micro_batch_attention_time(self, mb) -> float:
        """The attention (quadratic) part of a :class:`~hf_hdp.planning.plan.MicroBatch`'s time on its
        rank, all layers: each whole sequence's :meth:`attention_time`, and ``1/k`` of it for a piece
        of a sequence split over ``k`` ranks (zigzag balances the causal work)."""
        return sum(self.attention_time(p.length) / max(len(p.group), 1) for p in mb.pieces)

    def offload_bytes(self, tokens: float, layers: int, checkpointing: bool = False) -> float:
        """Bytes that offloading ``layers`` decoder layers of a micro-batch of ``tokens`` tokens moves
        to the host (and back): what each layer saves for backward, or only its input when the layers
        are recomputed (``checkpointing``)."""
        per = self.layer_input_bytes_per_token if checkpointing else self.layer_saved_bytes_per_token
        return float(tokens) * layers * per

    def host_copy_time(self, nbytes: float) -> float:
        """One copy of ``nbytes`` between device and host memory, one way: ``nbytes / host_bandwidth``
        (infinite when the bandwidth is unknown, 0)."""
        if nbytes <= 0:
            return 0.0
        if self.host_bandwidth <= 0:
            return float("inf")
        return nbytes / self.host_bandwidth

    def hidden_offload_ratio(self, tokens: float, attention_s: float, checkpointing: bool = False) -> float:
        """ByteScale's rule for ``offload_ratio="auto"``: the largest fraction ``r`` of a micro-batch's
        saved activations (all layers) whose device-to-host copy takes no longer than the micro-batch's
        forward attention, ``attention_s / FWD_BWD`` (``attention_s`` is forward plus backward, as
        :meth:`micro_batch_attention_time` gives it), capped at 1.

        The forward's copy is the binding one: the copy back in backward has twice the compute to hide
        behind (:data:`~.specs.FWD_BWD`). 0 when :attr:`host_bandwidth` is unknown, 1 when nothing is saved.
        """
        total = self.offload_bytes(tokens, self.num_layers, checkpointing)
        if total <= 0:
            return 1.0
        if self.host_bandwidth <= 0 or attention_s <= 0:
            return 0.0
        return min(1.0, attention_s / FWD_BWD * self.host_bandwidth / total)

    def offload_exposed_time(self, tokens: float, attention_s: float, layers: int,
                             checkpointing: bool = False) -> float:
        """Seconds of offloading ``layers`` layers that compute does not hide: the copy to the host
        beyond the forward attention, plus the copy back beyond the backward attention."""
        copy = self.host_copy_time(self.offload_bytes(tokens, layers, checkpointing))
        forward = attention_s / FWD_BWD
        return max(0.0, copy - forward) + max(0.0, copy - (attention_s - forward))

    # ------------------------------------------------------------ communication volume
    def ring_bytes(self, s: int, k: int) -> float:
        """Bytes one member sends for a sequence on ``k`` ranks in one step (K/V forward and backward
        in the model dtype, dK/dV in float32), taking the member's share as ``s / k``. Summed over
        the ``k`` members this is exact (:meth:`segment_bytes_sent` gives each member's own figure)."""
        if k <= 1:
            return 0.0
        if self._composite or self._segment_kinds([s]) is not None:  # the mean of the exact figures
            return sum(self.segment_bytes_by_member([int(s)], k)) / k
        per_hop = (s / k) * sum(count * kv.row for kv, count in self.kv_groups)  # all layers
        grad_hop = per_hop * self.grad_hop_bytes / self.value_bytes  # dK/dV accumulate in float32
        return (k - 1) * 2 * per_hop + k * grad_hop

    def segment_bytes_sent(self, lengths: Sequence[int], k: int, member: int) -> float:
        """Exact bytes member ``member`` of a ring segment sends in one step, all layers.

        In :mod:`hf_hdp.attention.ring`, member ``i`` forwards at step ``t`` the rows of member
        ``i - t``: ``k - 1`` K/V messages in forward and again in backward (every member's rows but
        those of ``i + 1``), and ``k`` float32 dK/dV accumulators (every member's rows once).
        """
        return self.segment_bytes_by_member(lengths, k)[member] if k > 1 else 0.0

    def segment_bytes_by_member(self, lengths: Sequence[int], k: int, ulysses: int = 1) -> list[float]:
        """:meth:`segment_bytes_sent` for every member ``0..k-1`` at once; with ``ulysses > 1``, the exact
        bytes of a head-parallel segment (:mod:`hf_hdp.attention.ulysses`: its all-to-alls, with K/V heads
        replicated under GQA, and its ring over the positions)."""
        if k <= 1:
            return [0.0] * max(k, 1)
        if self._composite:  # attention layers, plus each state layer's exact bytes (state_split_bytes)
            out = self.attention_model.segment_bytes_by_member(lengths, k, ulysses)
            for n, loads in self._state_loads(lengths, k, ulysses):
                out = [b + n * ld.sent * self.state_value_bytes for b, ld in zip(out, loads)]
            return out
        if ulysses > 1:
            return self._ulysses_bytes_by_member([int(s) for s in lengths], k, ulysses)
        rows = [0] * k
        for s in lengths:
            for m, n in enumerate(zigzag_member_sizes(int(s), k)):
                rows[m] += n
        total = sum(rows)
        kinds = self._segment_kinds([int(s) for s in lengths])
        if kinds is None:
            per_row = sum(count * kv.row for kv, count in self.kv_groups)  # one row's K/V, all layers
            grad = total * self.grad_hop_bytes / self.value_bytes
            return [per_row * (2 * (total - rows[(i + 1) % k]) + grad) for i in range(k)]
        acc = self.grad_hop_bytes / self.value_bytes
        out = [0.0] * k
        for mask, count, direct, kv in kinds:
            per_row = count * kv.row
            if direct:
                ex = segment_exchange(tuple(sorted(int(s) for s in lengths)), k, mask)
                for i in range(k):
                    out[i] += per_row * (2 * ex.sent_rows[i] + acc * ex.received_rows[i])
            else:
                for i in range(k):
                    out[i] += per_row * (2 * (total - rows[(i + 1) % k]) + total * acc)
        return out

    def _ulysses_bytes_by_member(self, lengths: list[int], k: int, u: int) -> list[float]:
        if not self.num_heads:
            raise ValueError("pricing a head-parallel piece needs the model's heads (CostModel.num_heads)")
        r = k // u
        acc = self.grad_hop_bytes / self.value_bytes
        q_heads = self.num_heads // u
        pos = [0] * r  # rows of each position, all documents
        mine = [[0] * u for _ in range(r)]  # rows of each sub-member
        for s in lengths:
            for p, n in enumerate(zigzag_member_sizes(s, r)):
                pos[p] += n
                for j, m in enumerate(even_split(n, u)):
                    mine[p][j] += m
        total = sum(pos)
        kinds = self._segment_kinds(lengths)
        if kinds is None:  # every layer a relay ring over the positions
            kinds = [(FULL, count, False, kv) for kv, count in self.kv_groups]
        exchanges = {}
        if r > 1:
            docs = tuple(sorted(lengths))
            exchanges = {mask: segment_exchange(docs, r, mask) for mask, _, direct, _ in kinds if direct}
        kv_heads = {kv.heads: [len(sp.kv_heads) for sp in head_split(self.num_heads, kv.heads, u)] for _, _, _, kv in kinds}
        out = []
        for m in range(k):
            p, j = divmod(m, u)
            n, others = mine[p][j], pos[p] - mine[p][j]
            total_m = 0.0
            for mask, count, direct, kv in kinds:
                heads = kv_heads[kv.heads]
                row = kv.k + kv.v  # one K/V head of one row: K at the q/k head size, V at the v one
                sent = n * (u - 1) * q_heads * (kv.k + kv.v)  # Q forward (q/k size), dO backward (v size)
                sent += n * sum(heads[i] for i in range(u) if i != j) * row  # K/V forward
                sent += others * q_heads * (kv.v + acc * kv.k)  # output forward, dQ backward (accumulator dtype)
                sent += others * heads[j] * row * acc  # dK/dV backward (accumulator dtype)
                per_row = heads[j] * row  # the ring over the positions for its heads
                if r > 1 and direct:  # direct exchange between the positions (position layout)
                    ex = exchanges[mask]
                    sent += per_row * (2 * ex.sent_rows[p] + acc * ex.received_rows[p])
                elif r > 1:
                    sent += per_row * (2 * (total - pos[(p + 1) % r]) + total * acc)
                total_m += count * sent
            out.append(total_m)
        return out

    def segment_messages(self, k: int, ulysses: int = 1, lengths: Sequence[int] | None = None,
                         member: int | None = None) -> int:
        """P2P messages one member of a ``k``-rank segment sends in one step, all layers: for a ring,
        ``k - 1`` forward K/V, ``k - 1`` backward K/V and ``k`` dK/dV per layer; with Ulysses degree
        ``u``, six all-to-alls of ``u - 1`` rounds and that ring over the ``k / u`` positions.

        Sliding and chunked layers send only the messages that carry rows, which depends on the segment:
        give its ``lengths`` (and a ``member``; without one, the busiest member's count) for the exact figure
        (:meth:`segment_messages_by_member`). Without ``lengths`` every layer is counted as a relay ring."""
        if k <= 1:
            return 0
        if lengths is not None and (self._composite or self._segment_kinds([int(s) for s in lengths]) is not None):
            per = self.segment_messages_by_member(lengths, k, ulysses)
            return per[member] if member is not None else max(per)
        r = k // max(ulysses, 1)
        ring = 3 * r - 2 if r > 1 else 0
        # without the lengths, a state layer is counted as its head-parallel all-to-alls: 4 (k - 1) messages
        states = sum(1 for st in self.layer_states if st)
        return self.attention_layers * (6 * (ulysses - 1) + ring) + states * 4 * (k - 1)

    def segment_messages_by_member(self, lengths: Sequence[int], k: int, ulysses: int = 1) -> list[int]:
        """:meth:`segment_messages` of every member ``0..k-1`` of a segment of ``lengths``: a direct (sliding or
        chunked) layer sends, per member, one forward and one backward K/V message to each member that needs
        rows of it, and one dK/dV message to each member it received rows from."""
        if k <= 1:
            return [0] * max(k, 1)
        lengths = [int(s) for s in lengths]
        if self._composite:  # attention layers, plus each state layer's messages (state_split_messages)
            out = self.attention_model.segment_messages_by_member(lengths, k, ulysses)
            for n, loads in self._state_loads(lengths, k, ulysses):
                out = [c + n * ld.messages for c, ld in zip(out, loads)]
            return out
        u = max(ulysses, 1)
        r = k // u
        kinds = self._segment_kinds(lengths)
        if kinds is None:
            return [self.segment_messages(k, u)] * k
        a2a = self.num_layers * 6 * (u - 1)
        out = [a2a] * k
        if r <= 1:
            return out
        docs = tuple(sorted(lengths))
        for mask, count, direct, _kv in kinds:
            if direct:
                ex = segment_exchange(docs, r, mask)
                for m in range(k):
                    p = m // u
                    out[m] += count * (2 * ex.sent_messages[p] + ex.received_messages[p])
            else:
                for m in range(k):
                    out[m] += count * (3 * r - 2)
        return out

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


def layer_type_times(model: ModelSpec, cost: CostModel, s: int) -> list[dict]:
    """Per layer type of ``model``, one layer's forward + backward seconds for a whole sample of ``s`` tokens alone on one
    rank: its projections and MLP (``linear``: the layer type's own weights, with its share of the LM head, at the rate
    ``cost.b`` implies), attention's pairs (``quadratic``), a state layer's convolution and recurrence (``state``), and
    the per-layer overhead ``c``. Attention types by mask (``"full"``, ``"sliding (w=4,096)"``, ...), state layers by
    shape and kind (``"Mamba-2 (...)"``, ``"short convolution (...)"``), hybrid layers (Falcon-H1, Zamba 2) as
    ``"hybrid (full attention + Mamba-2 (...))"``, Nemotron-H's MLP layers as ``"MLP only"``. What ``hf-hdp plan``
    prints beside the plan."""
    head = model.vocab_size * model.hidden_size / model.num_layers
    q = model.hidden_size * model.q_dim * (2 if model.attention_output_gate else 1)
    attention_params = q + 2 * model.hidden_size * model.kv_dim + model.attention_out_dim * model.hidden_size
    per_param = cost.b / (model.layer_params + head)  # seconds per weight per token, forward + backward
    masks = cost.layer_masks or (FULL,) * cost.num_layers
    attention = set(cost.attention_layer_index)
    groups: dict = {}  # (label, mask or None, StateShape or None, mlp weights) -> layers, in first-seen order
    for i in range(cost.num_layers):
        st = cost.layer_states[i] if cost.layer_states else ()
        mask = masks[i] if i in attention else None
        kind = describe_layer_masks((mask,), 1).split(" ", 1)[1] if mask is not None else ""
        if st and mask is not None:
            label = f"hybrid ({kind} attention + {st.describe()})"
        elif st:
            label = st.describe()
        else:
            label = kind or "MLP only"
        key = (label, mask, st or None, model.layer_mlp_params(i))
        groups[key] = groups.get(key, 0) + 1
    rank = {"state": 0, "attention": 1, "mlp": 2}
    order = sorted(groups.items(), key=lambda kv: rank["state" if kv[0][2] else "attention" if kv[0][1] else "mlp"])
    out = []
    mlp_only = sum(1 for (_, mask, st, _) in groups if mask is None and not st)
    for (label, mask, st, mlp), n in order:
        if mlp_only > 1 and mask is None and not st:  # Nemotron-H's MLP and MoE layers: told apart by their weights
            label = f"MLP only ({mlp:,} active weights)"
        params = mlp + head + (attention_params if mask is not None else 0)
        params += model.state_layer_params(st) if st else 0
        linear = per_param * params * s
        quadratic = cost.a * mask_pairs(int(s), mask) if mask is not None else 0.0
        state = FWD_BWD * local_state_flops(int(s), st) / cost.state_rate if st else 0.0
        out.append({"layer": label, "layers": n, "linear": linear, "quadratic": quadratic, "state": state,
                    "seconds": linear + quadratic + state + cost.c})
    return out


class SegmentOf(NamedTuple):
    """The pieces of a micro-batch that run as one segment: their ``group``, Ulysses degree, lengths and
    samples; ``key`` (the samples, with the degree) names the segment within its plan without hashing the
    group (a wide group's members would otherwise hash it ``k`` times each)."""

    group: tuple[int, ...]
    ulysses: int
    lengths: list[int]
    samples: tuple[int, ...]

    @property
    def key(self) -> tuple:
        return (self.ulysses, self.samples)


def segments_of(pieces) -> list[SegmentOf]:
    """The segments of a micro-batch's ``pieces`` as the attention runs them: one of the whole local
    sequences (group of one rank), and one per ``(group, Ulysses degree)`` of the distributed pieces, in
    sample order. A micro-batch with at most one distributed piece needs no grouping."""
    local = [p for p in pieces if len(p.group) <= 1]
    shared = [p for p in pieces if len(p.group) > 1]
    out = []
    if local:
        out.append(SegmentOf(tuple(local[0].group), 1, [int(p.length) for p in local], tuple(p.sample for p in local)))
    if len(shared) == 1:
        p = shared[0]
        out.append(SegmentOf(tuple(p.group), getattr(p, "ulysses", 1), [int(p.length)], (p.sample,)))
    elif shared:
        by_group: dict = {}
        for p in shared:
            by_group.setdefault((tuple(p.group), getattr(p, "ulysses", 1)), []).append(p)
        for (group, ulysses), ps in by_group.items():
            out.append(SegmentOf(group, ulysses, [int(p.length) for p in ps], tuple(p.sample for p in ps)))
    return out


def ring_segments(pieces) -> dict[tuple[tuple[int, ...], int], list[int]]:
    """The lengths of ``pieces`` by ``(group, Ulysses degree)``, as the attention runs them: the key
    ``((rank,), 1)`` of whole local sequences groups the local pieces; every other key is one segment
    (:func:`segments_of`, as a mapping)."""
    return {(seg.group, seg.ulysses): seg.lengths for seg in segments_of(pieces)}
