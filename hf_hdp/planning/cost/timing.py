"""Time terms of a :class:`~.model.CostModel`: how long a sequence, a piece and a micro-batch take on one rank.

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

A direct (sliding or chunked) layer (:mod:`.structure`) exchanges exactly the rows each member needs, in one
message per destination (:mod:`.volume` counts them). Timing of a direct layer, per member
(:meth:`CostModel._direct_exposed`): its messages go out one after another (each ``latency + bytes /
bandwidth``, as the all-to-all rounds are priced), the time of the exchange being the larger of what it sends
and what it receives. The forward K/V exchange overlaps the member's *own-rows block* (its rows with its own
keys: the exact visible pairs, ``≈ 1/k`` of the layer's work for windows much shorter than the zigzag chunks),
the backward K/V exchange the backward of that block; the dK/dV messages are exposed (with
``overlap_grad_hops``, they overlap the backward of the blocks with received rows, all but the shortest
message). The segment waits for its slowest member, so a direct layer's exposed time is the maximum over the
members. A head-parallel piece's ring over its ``r`` positions does the same over the positions' zigzag
layout, each message carrying the member's ``1/u`` of the K/V heads, its own-rows block ``1/u`` of its
position's.

The bytes and messages each member sends are :mod:`.volume`'s; activation offloading's exposed copies
:mod:`.offload`'s. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..layout import head_rings, head_split, ring_positions
from ..reach import FULL, mask_pairs
from .memory import offloaded_layers
from .recurrent import local_state_flops, state_segment_time
from .segments import segments_of
from .specs import FWD_BWD, ModelSpec
from .structure import LayerKV
from .windows import SegmentExchange, describe_layer_masks, segment_exchange, slowest_member_pairs


class TimeTerms:
    """The ``*_time`` and ``*_breakdown`` methods of a :class:`~.model.CostModel` (a mixin: the fields are the
    model's, the layer views :class:`~.structure.LayerStructure`'s)."""

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

    # ------------------------------------------------------------ links
    def links(self, spans_nodes: bool) -> tuple[float, float]:
        """``(bandwidth, latency)`` of the links a message takes: the inter-node ones when it crosses nodes."""
        return (self.inter_bandwidth, self.inter_latency) if spans_nodes else (self.intra_bandwidth, self.intra_latency)

    def group_spans_nodes(self, group) -> bool:
        return len({r // self.ranks_per_node for r in group}) > 1

    def message_time(self, nbytes: float, spans_nodes: bool) -> float:
        """One P2P message of ``nbytes``: latency plus bytes over the one-way bandwidth."""
        bw, lat = self.links(spans_nodes)
        return lat + nbytes / bw

    # ------------------------------------------------------------ state (Gated DeltaNet) layers
    def state_local_time(self, s: float) -> float:
        """Forward + backward of the state layers' convolution and recurrence over a whole sequence on one rank, all
        state layers (their projections are in ``b``); 0 without state layers."""
        if not self.state_kinds:
            return 0.0
        return FWD_BWD * sum(n * local_state_flops(int(s), st) for st, n in self.state_kinds) / self.state_rate

    def state_breakdown(
        self, lengths: Sequence[int], k: int, ulysses: int = 1, spans_nodes: bool = False
    ) -> tuple[float, float]:
        """``(compute, exchange)`` of the state layers of a segment of ``lengths`` on ``k`` ranks (its rows laid out
        for Ulysses degree ``ulysses``): per layer shape, its slowest member's, by the method :attr:`state_split`
        gives (:func:`~.recurrent.state_segment_time`); all state layers. ``k == 1``: :meth:`state_local_time`."""
        if not self.state_kinds:
            return 0.0, 0.0
        if k <= 1:
            return sum(self.state_local_time(s) for s in lengths), 0.0
        bw, lat = self.links(spans_nodes)
        docs = tuple(sorted(int(s) for s in lengths))
        compute = comm = 0.0
        for st, n in self.state_kinds:
            _, c, e = state_segment_time(
                docs, k, max(ulysses, 1), st, self.state_split, self.state_rate, bw, lat, self.state_value_bytes
            )
            compute += n * c
            comm += n * e
        return compute, comm

    def state_methods(self, lengths: Sequence[int], k: int, ulysses: int = 1, spans_nodes: bool | None = None) -> dict:
        """``{StateShape: "heads" | "scan"}``: how each state layer shape runs a segment of ``lengths`` on ``k`` ranks
        (``spans_nodes`` ``None``: the inter-node links when ``k`` exceeds :attr:`ranks_per_node`, as
        :func:`hf_hdp.attention.recurrent.split.choose_split` assumes)."""
        if k <= 1:
            return {}
        spans = k > self.ranks_per_node if spans_nodes is None else spans_nodes
        bw, lat = self.links(spans)
        docs = tuple(sorted(int(s) for s in lengths))
        return {
            st: state_segment_time(
                docs, k, max(ulysses, 1), st, self.state_split, self.state_rate, bw, lat, self.state_value_bytes
            )[0]
            for st, _ in self.state_kinds
        }

    # ------------------------------------------------------------ ring segments
    def piece_compute_time(self, s: int, k: int) -> float:
        """One member's compute for a sequence of ``s`` tokens on ``k`` ranks: ``1/k`` of the
        sequence's attention and linear work (no overhead, no communication)."""
        k = max(int(k), 1)
        if self._composite:
            return (
                self.attention_model.piece_compute_time(s, k)
                + self.num_layers * self.b * s / k
                + self.state_breakdown([s], k)[0]
            )
        pairs = self._pairs(s)
        if pairs is None:
            return self.num_layers * (self.a * s * s + self.b * s) / k
        if k == 1:
            return self.a * pairs + self.num_layers * self.b * s
        attention = sum(
            count * (slowest_member_pairs((s,), k, m) if m.restricts(s) else s * s / k) for m, count in self.mask_groups
        )
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
            exposed = sum(
                count * self._ring_exposed(k, self.a * sum_s2 / (k * k), (sum_s / k) * kv.row, spans_nodes)
                for kv, count in self.kv_groups
            )
            return compute, exposed
        member, exposed = 0.0, 0.0  # the slowest member's attention, in mask_pairs units
        docs = tuple(sorted(lengths))
        for mask, count, direct, kv in kinds:
            if direct:
                pairs = float(sum(mask_pairs(s, mask) for s in lengths))
                exposed += count * self._direct_exposed(
                    segment_exchange(docs, k, mask), self.a * pairs / k, kv.row, spans_nodes
                )
                member += count * slowest_member_pairs(docs, k, mask)
            else:
                exposed += count * self._ring_exposed(k, self.a * sum_s2 / (k * k), (sum_s / k) * kv.row, spans_nodes)
                member += count * sum_s2 / k
        return self.a * member + self.num_layers * self.b * sum_s / k, exposed

    def _direct_exposed(
        self, ex: SegmentExchange, block: float, row_bytes: float, spans_nodes: bool, share: int = 1
    ) -> float:
        """Exposed seconds, one layer, of a direct (sliding or chunked) exchange ``ex``: the slowest member's.

        ``block``: one member's attention of the layer, forward + backward (seconds); ``row_bytes``: bytes of
        one row's K and V on the wire; ``share``: the member's fraction ``1/share`` of the heads (Ulysses), which
        divides its own-rows block (see the module docstring).
        """
        acc = self.grad_hop_bytes / self.value_bytes
        bw, lat = self.links(spans_nodes)

        def burst(count: int, rows: int, per_row: float) -> float:  # count messages one after another
            return count * lat + rows * per_row / bw if count else 0.0

        worst = 0.0
        for i in range(len(ex.own)):
            n_out, n_in = ex.sent_messages[i], ex.received_messages[i]
            if not n_out and not n_in:
                continue
            t_kv = max(burst(n_out, ex.sent_rows[i], row_bytes), burst(n_in, ex.received_rows[i], row_bytes))
            # dK/dV go back to the sources (n_in messages) and come from the destinations (n_out)
            t_grad = max(
                burst(n_in, ex.received_rows[i], row_bytes * acc), burst(n_out, ex.sent_rows[i], row_bytes * acc)
            )
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

    def head_parallel_breakdown(
        self, lengths: Sequence[int], k: int, ulysses: int, a2a_spans: bool, ring_spans: bool
    ) -> tuple[float, float]:
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
            rounds = (
                self.message_time(q_msg, a2a_spans) * (1 + acc)  # Q, dQ (accumulator)
                + self.message_time(o_msg, a2a_spans) * 2  # output, dO
                + self.message_time(rows * member_kv_row(kv), a2a_spans) * (1 + acc)
            )  # K/V, dK/dV (acc.)
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
                exposed += count * self._direct_exposed(
                    segment_exchange(docs, r, mask), self.a * pairs / k, member_kv_row(kv), ring_spans, share=u
                )
            else:
                exposed += count * self._ring_exposed(
                    r, self.a * sum_s2 / (r * r * u), (sum_s / r) * member_kv_row(kv), ring_spans
                )
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
            total += self.offload_exposed_time(
                mb.num_tokens,
                self.micro_batch_attention_time(mb),
                offloaded_layers(self.offload_ratio, self.num_layers),
                self.offload_checkpointing,
            )
        return total, comm

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
        bw, lat = self.links(spans)
        return 2.0 * (world_size - 1) / world_size * nbytes / bw + 2 * math.ceil(math.log2(world_size)) * lat


def layer_type_times(model: ModelSpec, cost: TimeTerms, s: int) -> list[dict]:
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
        out.append(
            {
                "layer": label,
                "layers": n,
                "linear": linear,
                "quadratic": quadratic,
                "state": state,
                "seconds": linear + quadratic + state + cost.c,
            }
        )
    return out
