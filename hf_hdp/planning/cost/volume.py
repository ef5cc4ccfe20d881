"""Communication volume of a :class:`~.model.CostModel`: the bytes and messages each member of a segment sends.

Counted as :mod:`hf_hdp.attention.ring` and :mod:`hf_hdp.attention.ulysses` send them and
:class:`~hf_hdp.distributed.mesh.DynamicMesh` counts them, per member and all layers, in one step:

- a relay ring of ``k`` members: per layer ``k - 1`` forward K/V hops, ``k - 1`` backward K/V hops (model dtype)
  and ``k`` dK/dV hops (accumulator dtype, :attr:`~.structure.LayerStructure.grad_hop_bytes` per value);
- a direct (sliding or chunked) layer: member ``i`` sends, in ONE message per destination, exactly the rows each
  other member needs (:func:`~hf_hdp.planning.reach.needed_rows`; a message of no rows is not sent):

  - forward: to each ``m != i`` its needed rows of ``i``'s K/V (model dtype);
  - backward: the same K/V messages again, and to each source ``j`` the dK/dV of the rows received from
    it (accumulator dtype);

- a head-parallel segment of Ulysses degree ``u``: six all-to-alls of ``u - 1`` rounds per layer (K/V heads
  replicated under GQA), and the ring (or direct exchange) over its ``k / u`` positions;
- state layers: their exact loads (:func:`~.recurrent.state_split_loads`), added per member.

The time these take is :mod:`.timing`'s. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..layout import even_split, head_split, zigzag_member_sizes
from ..reach import FULL
from .recurrent import state_split_loads
from .windows import segment_exchange


class CommVolume:
    """The bytes and messages methods of a :class:`~.model.CostModel` (a mixin: the fields are the model's, the
    layer views :class:`~.structure.LayerStructure`'s)."""

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
        kv_heads = {
            kv.heads: [len(sp.kv_heads) for sp in head_split(self.num_heads, kv.heads, u)] for _, _, _, kv in kinds
        }
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

    def segment_messages(
        self, k: int, ulysses: int = 1, lengths: Sequence[int] | None = None, member: int | None = None
    ) -> int:
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

    def _state_loads(self, lengths: Sequence[int], k: int, ulysses: int):
        """``[(layers, per-member MemberLoad), ...]`` of the state layers of a segment, by :meth:`state_methods`."""
        docs = tuple(sorted(int(s) for s in lengths))
        u = max(ulysses, 1)
        return [
            (n, state_split_loads(docs, k, u, st, method))
            for (st, n), method in zip(self.state_kinds, self.state_methods(docs, k, u).values())
        ]
