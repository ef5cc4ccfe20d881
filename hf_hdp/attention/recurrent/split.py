"""A state-carrying layer over one micro-batch: whole local samples, and samples split over a group of ranks.

The layers: Gated DeltaNet (the delta rule), Mamba-2 (the state space dual form: the same without the delta, and
a per-head skip ``D x``) and short convolutions (:func:`short_conv`: the convolution alone, whose split is its halo).

Input, one packed row of ``T`` tokens: the convolution's input channels ``x`` (``[T, C]``: the query and
key channels of every key head, then the value channels), the log-decays ``g`` and write strengths
``beta`` (``[T, Hv]``). Output: the recurrence's output ``[T, Hv, dv]`` (before the gated norm).

- **Local samples** (``meta.local_seqlens``): the depthwise causal convolution and the state restart at
  every sample's first token: exact packing, no communication.
- **Split samples**, per segment, one of two methods (:func:`choose_split`), never a serial chain:

  - ``"heads"`` (head-parallel): an all-to-all moves each member's rows of the channels, decays and
    strengths of member ``j``'s heads to member ``j``; every member runs the convolution (per channel: it
    moves with its heads) and the whole recurrence of every document for its ``Hv / k`` heads, and an
    all-to-all sends each member its rows of every head's output back. Heads are split as Ulysses splits
    them (:func:`~hf_hdp.planning.layout.head_split`): the degree must divide the value heads.
  - ``"scan"`` (state scan): each member first receives its pieces' convolution halos (the ``kernel - 1``
    rows before each piece, in sample order; with the zigzag layout they live on other members), runs
    its pieces from the zero state and computes each piece's transition ``M`` and final state ``B``
    (:mod:`.delta_rule`); one all-gather of ``(M, B)``; then each piece's true incoming state
    ``S = M_j (... (M_1 B_0 + B_1) ...) + B_j`` over the pieces before it, and the exact correction of its
    outputs from ``S``.

All messages are P2P on the one global group (:mod:`.exchange`), bounded by the mesh, in three phases on
every member: (1) halos and rows to heads, (2) states, (3) heads back to rows; backward runs them in the
reverse order. The compute dtype is the input's, at least float32 (what the families' own kernels use).
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from ...planning.layers import StateShape
from ...planning.layout import head_split
from ...planning.pieces import halo_index, halo_rows, member_rows, segment_pieces
from ..metadata import HDPAttentionMetadata, UlyssesSegment
from .delta_rule import chunk_quantities, l2norm, linear_chunk_quantities, read_state, run_chunks, transition
from .exchange import Move, exchange, group_rounds
from .fused import conv_docs, delta_docs, fused_kernels, ssd_docs

SPLITS = ("auto", "heads", "scan")
_KIND_NAMES = {"delta": "Gated DeltaNet", "ssd": "Mamba-2", "conv": "short convolution"}


def _ulysses(seg) -> int:
    return seg.ulysses if isinstance(seg, UlyssesSegment) else 1


def choose_split(seg, shape: StateShape, mode: str = "auto", hardware: str = "cpu", bytes_per_value: int = 4) -> str:
    """The method of one segment: a pure function of the segment, the layer and the dtype, so every member picks
    the same.

    ``"heads"`` needs the group size to divide the value heads (else the scan runs). ``"auto"``: whichever
    :func:`hf_hdp.planning.cost.recurrent.state_split_costs` prices faster: head-parallel adds no compute but its
    bytes grow with the rows per member; the scan adds the transition and read-out arithmetic and sends a fixed
    ``(M, B)`` per piece, so it wins on long pieces (Qwen3.5's shapes: past about ``128 (k - 1)`` rows per member)."""
    if mode not in SPLITS:
        raise ValueError(f"the split of state-carrying layers must be one of {SPLITS}, got {mode!r}")
    k = seg.k
    can_heads = shape.value_heads % k == 0
    if mode == "scan" or not can_heads:
        return "scan"
    if mode == "heads":
        return "heads"
    from ...planning.cost.recurrent import state_split_costs

    costs = state_split_costs(
        seg.doc_lengths(),
        k,
        shape.key_heads,
        shape.key_dim,
        shape.value_heads,
        shape.value_dim,
        shape.kernel,
        hardware,
        bytes_per_value,
        ulysses=_ulysses(seg),
        kind=shape.kind,
    )
    return min(costs, key=lambda m: (costs[m].seconds, m))


# ----------------------------------------------------------------------------------- per-token pieces
def causal_conv(x: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, bias, activation) -> torch.Tensor:
    """Depthwise causal convolution of rows ``x`` (``[n, C]``) whose sample positions are ``pos``: row ``t``
    sees rows ``t - j`` only where ``pos[t] >= j`` (the same sample; rows of a sample are consecutive).
    ``weight``: ``[C, K]``, the last tap on the row itself."""
    kernel = weight.shape[1]
    out = x * weight[:, kernel - 1]
    for j in range(1, min(kernel, x.shape[0] + 1)):
        shifted = torch.nn.functional.pad(x[:-j], (0, 0, j, 0))
        out = out + shifted * (pos >= j).unsqueeze(1).to(x.dtype) * weight[:, kernel - 1 - j]
    if bias is not None:
        out = out + bias
    return ACT2FN[activation](out) if activation else out


def _positions(lengths, device) -> torch.Tensor:
    if not lengths:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(n, device=device) for n in lengths])


def _recurrence_inputs(
    conv_rows, g, beta, key_heads: int, key_dim: int, value_heads: int, value_dim: int, kind: str = "delta"
):
    """Heads-first ``q``, ``k``, ``v``, ``g``, ``beta`` of some rows (Gated DeltaNet: ``q`` normalised and scaled,
    ``k`` normalised; Mamba-2: ``v`` scaled by ``dt``, the second gate); query and key heads repeated to the value
    heads (value head ``h`` reads key head ``h // (Hv / Hk)``)."""
    n = conv_rows.shape[0]
    q, k, v = conv_rows.split([key_heads * key_dim, key_heads * key_dim, value_heads * value_dim], dim=1)
    q, k = (x.reshape(n, key_heads, key_dim) for x in (q, k))
    v = v.reshape(n, value_heads, value_dim)
    if kind == "delta":
        q, k = l2norm(q) * key_dim**-0.5, l2norm(k)
    else:
        v = v * beta.unsqueeze(-1)
    if value_heads != key_heads:
        q, k = (x.repeat_interleave(value_heads // key_heads, dim=1) for x in (q, k))
    return (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g.transpose(0, 1), beta.transpose(0, 1))


def _chunks(q, k, v, g, beta, kind: str):
    return chunk_quantities(q, k, v, g, beta) if kind == "delta" else linear_chunk_quantities(q, k, v, g)


def _skip(conv_rows, skip, key_heads: int, key_dim: int, value_heads: int, value_dim: int) -> torch.Tensor:
    """Mamba-2's ``D x`` of some rows, ``[n, Hv, dv]`` (``skip``: ``D`` of the value heads)."""
    x = conv_rows[:, 2 * key_heads * key_dim :].reshape(-1, value_heads, value_dim)
    return x * skip.to(x.dtype)[None, :, None]


def _conv_docs(x, lengths, weight, bias, activation) -> torch.Tensor:
    """The convolution of consecutive whole documents: the CUDA package's kernel where installed
    (:mod:`.fused`), else :func:`causal_conv`."""
    kernels = fused_kernels(x.device)
    if kernels is not None and kernels.conv is not None and x.shape[0]:
        return conv_docs(kernels, x, lengths, weight, bias, activation)
    return causal_conv(x, _positions(lengths, x.device), weight, bias, activation)


def _run_docs(
    conv_rows, g, beta, lengths, key_heads, key_dim, value_heads, value_dim, kind="delta", skip=None, rate=None
) -> torch.Tensor:
    """Every document of ``lengths`` (consecutive rows) from the zero state; ``[n, Hv, dv]``. On CUDA the
    packages' varlen kernels run where installed (:mod:`.fused`; Mamba-2's needs ``rate``, its ``A``)."""
    kernels = fused_kernels(conv_rows.device)
    if kernels is not None and conv_rows.shape[0]:
        if kind == "ssd" and kernels.ssd is not None and rate is not None:
            c, b, x = conv_rows.split([key_heads * key_dim, key_heads * key_dim, value_heads * value_dim], dim=1)
            n = conv_rows.shape[0]
            return ssd_docs(
                kernels,
                x.reshape(n, value_heads, value_dim),
                beta,
                rate,
                b.reshape(n, key_heads, key_dim),
                c.reshape(n, key_heads, key_dim),
                lengths,
                skip,
            )
        if kind == "delta" and kernels.delta is not None:
            q, k, v, gg, bb = _recurrence_inputs(conv_rows, g, beta, key_heads, key_dim, value_heads, value_dim, kind)
            return delta_docs(kernels, q, k, v, gg, bb, lengths)
    q, k, v, gg, bb = _recurrence_inputs(conv_rows, g, beta, key_heads, key_dim, value_heads, value_dim, kind)
    outs = []
    # one split per tensor (its backward concatenates once; slicing per document would give each document's gradient
    # the whole tensor's size)
    for parts in zip(*(t.split(list(lengths), dim=1) for t in (q, k, v, gg, bb))):
        if parts[0].shape[1]:
            outs.append(run_chunks(_chunks(*parts, kind), None)[0])
    if not outs:
        return conv_rows.new_zeros(0, value_heads, value_dim)
    out = torch.cat(outs, dim=1).transpose(0, 1)
    if skip is not None:
        out = out + _skip(conv_rows, skip, key_heads, key_dim, value_heads, value_dim)
    return out


# --------------------------------------------------------------------------------- segment methods
class _Scan:
    """The state scan of one segment (see the module docstring)."""

    def __init__(self, seg, shape: StateShape, x, g, beta, weight, bias, skip, mesh, activation):
        self.seg, self.shape, self.x, self.g, self.beta, self.weight, self.bias = seg, shape, x, g, beta, weight, bias
        self.skip, self.activation = skip, activation
        self.key = (seg.doc_lengths(), seg.k, _ulysses(seg))
        self.width = shape.kernel - 1
        self.pieces = [p for doc in segment_pieces(*self.key) for p in doc if p.member == seg.member]

    def _label(self, what: str) -> str:
        s = self.seg
        return (
            f"{_KIND_NAMES[self.shape.kind]} {what} (global step {s.step}, slot {s.slot}, group {list(s.group)}, "
            f"samples {list(s.samples)})"
        )

    def halo_moves(self, sends: list, at: int) -> list[Move]:
        seg, moves = self.seg, []
        for dst, src in group_rounds(seg.group, seg.member):
            rows = halo_rows(*self.key, self.width, dst, seg.member)
            need = len(halo_rows(*self.key, self.width, seg.member, src))
            send = None
            if rows:
                sends.append(self.x[list(rows)])
                send = at + len(sends) - 1
            moves.append(
                Move(
                    seg.group[dst],
                    send,
                    seg.group[src],
                    (need, self.x.shape[1]) if need else None,
                    self._label("convolution halo"),
                )
            )
        return _kept(moves, seg)

    def convolved(self, received: dict):
        """Each of this member's pieces, in row order, with its convolution's output: the piece's rows behind
        their halo (``received``: source member -> the halo rows it sent; our own halo rows read locally)."""
        seg = self.seg
        own_rows = halo_rows(*self.key, self.width, seg.member, seg.member)
        bufs = [received.get(src, self.x[:0]) for src in range(seg.k)]
        bufs[seg.member] = self.x[list(own_rows)] if own_rows else self.x[:0]
        halo = torch.cat(bufs)
        for p, idx in halo_index(*self.key, self.width, seg.member):
            own = self.x[p.row : p.row + p.length]
            rows = torch.cat([halo[list(idx)], own]) if idx else own
            pos = torch.arange(p.start - len(idx), p.end, device=self.x.device)
            yield p, causal_conv(rows, pos, self.weight, self.bias, self.activation)[len(idx) :]

    def local_pass(self, received: dict) -> None:
        """Convolution with halos, then each piece from the zero state: outputs, transition, final state."""
        sh = self.shape
        self.outputs, self.chunks, states = [], [], []
        for p, conv in self.convolved(received):
            sl = slice(p.row, p.row + p.length)
            q, k, v, g, b = _recurrence_inputs(
                conv, self.g[sl], self.beta[sl], sh.key_heads, sh.key_dim, sh.value_heads, sh.value_dim, sh.kind
            )
            ch = _chunks(q, k, v, g, b, sh.kind)
            o, final = run_chunks(ch, None)
            if self.skip is not None:
                o = o + _skip(conv, self.skip, sh.key_heads, sh.key_dim, sh.value_heads, sh.value_dim).transpose(0, 1)
            self.outputs.append(o)
            self.chunks.append(ch)
            # no piece follows a document's last: its transition is never read (zeros keep the message's size)
            last = p.end == self.key[0][p.doc]
            trans = final.new_zeros(final.shape[0], sh.key_dim, sh.key_dim) if last else transition(ch)
            states.append(torch.cat([trans.flatten(1), final.flatten(1)], dim=1))
        self.states = torch.stack(states) if states else None  # [pieces, Hv, dk*dk + dk*dv]

    def state_moves(self, sends: list, at: int) -> list[Move]:
        seg, moves = self.seg, []
        pieces = segment_pieces(*self.key)
        width = self.shape.value_heads, self.shape.key_dim * (self.shape.key_dim + self.shape.value_dim)
        count = [sum(1 for doc in pieces for p in doc if p.member == m) for m in range(seg.k)]
        send = None
        if self.states is not None:
            sends.append(self.states)
            send = at + len(sends) - 1
        for dst, src in group_rounds(seg.group, seg.member):
            moves.append(
                Move(
                    seg.group[dst],
                    send,
                    seg.group[src],
                    (count[src], *width) if count[src] else None,
                    self._label("chunk states"),
                )
            )
        return _kept(moves, seg)

    def correct(self, received: dict) -> torch.Tensor:
        """Every piece's outputs from its true incoming state; this member's rows ``[n, Hv, dv]``."""
        seg, sh = self.seg, self.shape
        dk, dv, h = sh.key_dim, sh.value_dim, sh.value_heads
        by_member = dict(received)
        by_member[seg.member] = self.states
        pieces = segment_pieces(*self.key)
        index = {}
        for m in range(seg.k):
            mine = [p for doc in pieces for p in doc if p.member == m]
            for i, p in enumerate(mine):
                index[p] = (m, i)
        outs = []
        for p, o, ch in zip(self.pieces, self.outputs, self.chunks):
            state = None
            for before in pieces[p.doc]:
                if before.start >= p.start:
                    break
                m, i = index[before]
                packed = by_member[m][i]
                trans = packed[:, : dk * dk].reshape(h, dk, dk)
                final = packed[:, dk * dk :].reshape(h, dk, dv)
                state = final if state is None else trans @ state + final
            if state is not None:
                o = o + read_state(ch, state)
            outs.append(o)
        if not outs:
            return self.x.new_zeros(0, h, dv)
        return torch.cat(outs, dim=1).transpose(0, 1)


class _Heads:
    """Head-parallel: all-to-all to head shards, whole documents locally, all-to-all back."""

    def __init__(self, seg, shape: StateShape, x, g, beta, weight, bias, skip, mesh, activation, rate=None):
        self.seg, self.shape, self.weight, self.bias, self.skip, self.rate = seg, shape, weight, bias, skip, rate
        self.activation = activation
        self.key = (seg.doc_lengths(), seg.k, _ulysses(seg))
        sh = shape
        self.splits = head_split(sh.value_heads, sh.key_heads, seg.k)
        self.inputs = torch.cat([x, g, beta], dim=1)

    def _label(self, what: str) -> str:
        s = self.seg
        return (
            f"{_KIND_NAMES[self.shape.kind]} head-parallel {what} (global step {s.step}, slot {s.slot}, "
            f"group {list(s.group)}, samples {list(s.samples)})"
        )

    def _columns(self, j: int) -> list[int]:
        """Member ``j``'s columns of ``[x | g | beta]``: its key heads' query and key channels, its value heads'
        channels, decays and strengths."""
        sh, sp = self.shape, self.splits[j]
        kd, c = sh.key_heads * sh.key_dim, sh.channels
        cols = [h * sh.key_dim + i for h in sp.kv_heads for i in range(sh.key_dim)]
        cols += [kd + h * sh.key_dim + i for h in sp.kv_heads for i in range(sh.key_dim)]
        cols += list(range(2 * kd + sp.q_start * sh.value_dim, 2 * kd + sp.q_stop * sh.value_dim))
        cols += [c + h for h in range(sp.q_start, sp.q_stop)]
        cols += [c + sh.value_heads + h for h in range(sp.q_start, sp.q_stop)]
        return cols

    def to_heads_moves(self, sends: list, at: int) -> list[Move]:
        seg, moves = self.seg, []
        pieces = segment_pieces(*self.key)
        width = len(self._columns(seg.member))
        self.own = self.inputs[:, self._columns(seg.member)]
        for dst, src in group_rounds(seg.group, seg.member):
            n_src = member_rows(pieces, src)
            send = None
            if self.inputs.shape[0]:
                sends.append(self.inputs[:, self._columns(dst)])
                send = at + len(sends) - 1
            moves.append(
                Move(
                    seg.group[dst],
                    send,
                    seg.group[src],
                    (n_src, width) if n_src else None,
                    self._label("rows to heads"),
                )
            )
        return _kept(moves, seg)

    def local_pass(self, received: dict) -> None:
        seg, sh, sp = self.seg, self.shape, self.splits[self.seg.member]
        pieces = segment_pieces(*self.key)
        bufs = dict(received)
        bufs[seg.member] = self.own
        rows = torch.cat([bufs[p.member][p.row : p.row + p.length] for doc in pieces for p in doc])
        nk, nv = len(sp.kv_heads), sp.num_q
        c = 2 * nk * sh.key_dim + nv * sh.value_dim
        x, g, beta = rows[:, :c], rows[:, c : c + nv], rows[:, c + nv :]
        lengths = self.key[0]
        channels = self._columns(seg.member)[:c]
        weight = self.weight[channels]
        bias = None if self.bias is None else self.bias[channels]
        conv = _conv_docs(x, lengths, weight, bias, self.activation)
        skip = None if self.skip is None else self.skip[sp.q_start : sp.q_stop]
        rate = None if self.rate is None else self.rate[sp.q_start : sp.q_stop]
        self.out = _run_docs(conv, g, beta, lengths, nk, sh.key_dim, nv, sh.value_dim, sh.kind, skip, rate).flatten(1)

    def to_rows_moves(self, sends: list, at: int) -> list[Move]:
        seg, moves = self.seg, []
        pieces = segment_pieces(*self.key)
        starts, at_row = {}, 0
        for doc in pieces:
            for p in doc:
                starts[p] = at_row
                at_row += p.length
        per_member = {m: [p for doc in pieces for p in doc if p.member == m] for m in range(seg.k)}

        def rows_of(m):
            mine = per_member[m]
            return torch.cat([self.out[starts[p] : starts[p] + p.length] for p in mine]) if mine else self.out[:0]

        self.own_back = rows_of(seg.member)
        n_me = member_rows(pieces, seg.member)
        for dst, src in group_rounds(seg.group, seg.member):
            send = None
            if member_rows(pieces, dst):
                sends.append(rows_of(dst))
                send = at + len(sends) - 1
            width = self.splits[src].num_q * self.shape.value_dim
            moves.append(
                Move(
                    seg.group[dst], send, seg.group[src], (n_me, width) if n_me else None, self._label("heads to rows")
                )
            )
        return _kept(moves, seg)

    def assemble(self, received: dict) -> torch.Tensor:
        seg = self.seg
        n_me = self.own_back.shape[0]
        if not n_me:
            return self.own_back.new_zeros(0, self.shape.value_heads, self.shape.value_dim)
        got = dict(received)
        got[seg.member] = self.own_back
        return torch.cat([got[m] for m in range(seg.k)], dim=1).reshape(
            n_me, self.shape.value_heads, self.shape.value_dim
        )


def _kept(moves: list[Move], seg) -> list[Move]:
    """The moves that send or receive something (both partners drop the same empty rounds)."""
    return [m for m in moves if m.send is not None or m.shape is not None]


def _phase(runs, make, mesh, after):
    """One phase's moves of every segment in metadata order, one exchange: per segment, the received tensors by
    source member; all of them; and the exchange's zero scalar (``None`` when this member has no move)."""
    sends, moves, sources = [], [], []
    for r in runs:
        ms = make(r)(sends, 0) if make(r) is not None else []
        moves.extend(ms)
        sources.append([r.seg.group.index(m.src) for m in ms if m.shape is not None])
    if not moves:
        return [{} for _ in runs], (), None
    *got, token = exchange(moves, sends, mesh, after=after)
    out, at = [], 0
    for src in sources:  # per segment: source member -> what it sent us
        out.append(dict(zip(src, got[at : at + len(src)])))
        at += len(src)
    return out, tuple(got), token


def gated_delta_net(
    x,
    g,
    beta,
    weight,
    bias,
    shape: StateShape,
    meta: HDPAttentionMetadata,
    mesh,
    split: str = "auto",
    skip: torch.Tensor | None = None,
    rate: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """The recurrence's output ``[T, Hv, dv]`` of a packed row (see the module docstring). ``shape``: the layer's
    heads, kernel and kind (:class:`~hf_hdp.planning.layers.StateShape`, ``"delta"`` or ``"ssd"``; the channels of
    ``x`` in its order: queries, keys, values); ``weight``: the depthwise convolution's ``[C, K]``; ``bias``: ``[C]``
    or ``None``; ``skip``: Mamba-2's ``D`` (``[Hv]``); ``rate``: Mamba-2's ``A`` (``[Hv]``, with ``g = A dt``), which
    only mamba-ssm's fused kernel reads; ``activation``: after the convolution."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, g, beta, weight = (t.to(dtype) for t in (x, g, beta, weight))
    bias = None if bias is None else bias.to(dtype)
    skip = None if skip is None else skip.to(dtype)
    rate = None if rate is None else rate.to(torch.float32 if dtype != torch.float64 else dtype)
    sh = shape
    parts = []
    n_local = meta.local_len
    if n_local:
        conv = _conv_docs(x[:n_local], meta.local_seqlens, weight, bias, activation)
        parts.append(
            _run_docs(
                conv,
                g[:n_local],
                beta[:n_local],
                meta.local_seqlens,
                sh.key_heads,
                sh.key_dim,
                sh.value_heads,
                sh.value_dim,
                sh.kind,
                skip,
                rate,
            )
        )
    if meta.rings:
        parts.append(
            _segments(
                x[n_local:], g[n_local:], beta[n_local:], weight, bias, skip, shape, meta, mesh, split, rate, activation
            )
        )
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class _Conv(_Scan):
    """A short convolution's split segment (LFM2): the halo exchange, then each piece's convolution; no state."""

    def local_pass(self, received: dict) -> None:
        outs = [conv for _, conv in self.convolved(received)]
        self.out = torch.cat(outs) if outs else self.x[:0]


def short_conv(x, weight, bias, kernel_activation: str | None, meta: HDPAttentionMetadata, mesh) -> torch.Tensor:
    """A depthwise causal convolution of a packed row ``x`` (``[T, C]``; ``weight``: ``[C, K]``): restarted at every
    sample, and on split samples fed the ``K - 1`` rows before each piece from the members holding them (one halo
    exchange, in the same bounded P2P phase as the recurrences'). Returns ``[T, C]`` in the compute dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    parts = []
    n_local = meta.local_len
    if n_local:
        parts.append(_conv_docs(x[:n_local], meta.local_seqlens, weight, bias, kernel_activation))
    if meta.rings:
        rest = x[n_local:]
        base = meta.rings[0].start
        shape = StateShape(0, 0, 1, weight.shape[0], weight.shape[1], "conv")
        runs = [
            _Conv(
                seg,
                shape,
                rest[seg.start - base : seg.end - base],
                None,
                None,
                weight,
                bias,
                None,
                mesh,
                kernel_activation,
            )
            for seg in meta.rings
        ]
        got, _, token = _phase(runs, lambda r: r.halo_moves, mesh, (rest,))
        for r, received in zip(runs, got):
            r.local_pass(received)
        out = torch.cat([r.out for r in runs])
        parts.append(out if token is None else out + 0 * token)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _segments(x, g, beta, weight, bias, skip, shape, meta, mesh, split, rate, activation) -> torch.Tensor:
    base = meta.rings[0].start
    runs = []
    for seg in meta.rings:
        sl = slice(seg.start - base, seg.end - base)
        hardware = "h100" if x.is_cuda else "cpu"
        if choose_split(seg, shape, split, hardware, x.element_size()) == "heads":
            runs.append(_Heads(seg, shape, x[sl], g[sl], beta[sl], weight, bias, skip, mesh, activation, rate))
        else:
            runs.append(_Scan(seg, shape, x[sl], g[sl], beta[sl], weight, bias, skip, mesh, activation))
    # phase 1: halos (scan) and rows to heads (heads)
    first, _, t1 = _phase(runs, lambda r: r.halo_moves if isinstance(r, _Scan) else r.to_heads_moves, mesh, (x,))
    for r, got in zip(runs, first):
        r.local_pass(got)
    # phase 2: chunk states (scan)
    second, states, t2 = _phase(runs, lambda r: r.state_moves if isinstance(r, _Scan) else None, mesh, (x,))
    # phase 3: heads back to rows; after phase 2, so that its backward runs first on every member
    third, _, t3 = _phase(
        runs,
        lambda r: r.to_rows_moves if isinstance(r, _Heads) else None,
        mesh,
        (x, *states, *([t2] if t2 is not None else [])),
    )
    outs = [r.correct(s) if isinstance(r, _Scan) else r.assemble(t) for r, s, t in zip(runs, second, third)]
    out = torch.cat(outs)
    for token in (t1, t2, t3):
        if token is not None:
            out = out + 0 * token
    return out
