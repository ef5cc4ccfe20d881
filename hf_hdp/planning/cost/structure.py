"""The layers a :class:`~.model.CostModel` prices: which hold attention, their masks, K/V shapes and state mixers.

:class:`LayerStructure` is the part of :class:`~.model.CostModel` that reads its per-layer fields and groups
identical layers, so that every time and volume term (:mod:`.timing`, :mod:`.volume`) sums over a few layer
kinds rather than over every layer. Pure Python.

Sliding-window and chunked layers (:attr:`CostModel.layer_masks`, one
:class:`~hf_hdp.planning.reach.LayerMask` per layer; empty: every layer full causal, and every figure
is exactly that of the uniform model). Identical layers are grouped (:func:`~.windows.group_masks`), and
every attention term is priced per layer kind: a layer's work for a sample of ``s`` tokens is
``a·mask_pairs(s, mask)`` (:func:`~hf_hdp.planning.reach.mask_pairs`: ``s²`` full, ``2·s·w - w²`` for a
window ``w < s``, ``Σ chunk²`` chunked). A member of a split sample does ``1/k`` of a full layer (zigzag) and,
of a sliding or chunked layer, the visible pairs of its own rows (:func:`~.windows.member_work`: zigzag
keeps the row counts equal, but the rows at the start of a sample or of an attention chunk see fewer keys);
the piece is priced by its slowest member, which the others wait for at each layer's exchange. A layer kind whose
the piece is priced by its slowest member, which the others wait for at each layer's exchange. A layer kind
whose mask restricts the segment's longest document is a *direct* layer of a ring piece (:meth:`_segment_kinds`);
any other is full for every document and keeps the relay ring.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property, lru_cache
from typing import NamedTuple

from ..layers import StateShape
from ..reach import FULL, LayerMask, mask_pairs
from .specs import FLOAT32_BYTES
from .windows import describe_layer_masks, group_masks


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


class LayerStructure:
    """The per-layer views of a :class:`~.model.CostModel` (a mixin: the fields are the model's)."""

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
    def attention_model(self) -> LayerStructure:
        """This model's attention layers alone: no state layers and no linear term (``b = 0``). A hybrid model prices
        its attention terms with it, then adds ``b`` over all its layers and the state layers (:meth:`state_breakdown`)."""
        if not self.layer_states and not self.layer_attention:
            return replace(self, b=0.0)
        return replace(
            self,
            num_layers=self.attention_layers,
            b=0.0,
            layer_states=(),
            state_rate=0.0,
            layer_attention=(),
            layer_masks=self._attention_masks() if self.layer_masks else (),
            layer_heads=tuple(self.layer_heads[i] for i in self.attention_layer_index) if self.layer_heads else (),
        )

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
        return tuple(
            LayerKV(h, qk * vb, v * vb, h * (qk + v) * vb)
            for h, qk, v in (self.layer_heads[i] for i in self.attention_layer_index)
        )

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

    def with_layer_masks(self, masks) -> LayerStructure:
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

    @property
    def grad_hop_bytes(self) -> int:
        """Bytes per value of the ring's dK/dV accumulators: float32, or float64 for a float64 model."""
        return max(FLOAT32_BYTES, self.value_bytes)

    @property
    def head_bytes(self) -> float:
        """Bytes of one token's one K (or Q) head of the first layer in the model dtype: ``head_dim · value_bytes``
        (each layer's own figures: :attr:`layer_kvs`)."""
        return self.layer_kvs[0].k if self.num_kv_heads and self.layer_kvs else 0.0
