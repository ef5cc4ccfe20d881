"""The cost of a state-carrying layer (pure Python): its recurrence's FLOPs, and a split sample's exchange, exact.

Three kinds (:attr:`~hf_hdp.planning.layers.StateShape.kind`), one split machinery: ``"delta"`` (Gated DeltaNet, below),
``"ssd"`` (Mamba-2: the same chunked recurrence without the delta, :func:`ssd_flops`, and the same messages, both
methods: the heads all-to-all carries the convolution channels and 2 gate columns per value head, the scan one
``(M, B)`` per piece), and ``"conv"`` (LFM2's gated short convolution: no state, no heads method; a split sample's
only message is the halo, the ``kernel - 1`` rows before each piece: method ``"halo"``).

A Gated DeltaNet layer (:mod:`hf_hdp.attention.recurrent`; Qwen3.5, Qwen3-Next) costs ``O(s)``: its projections
(in :class:`~.specs.ModelSpec`'s per-token linear term), a depthwise causal convolution over ``C = 2·Hk·dk + Hv·dv``
channels, and the chunked gated delta rule (:func:`delta_rule_flops`, counted from
:mod:`hf_hdp.attention.recurrent.delta_rule`: every sequence is padded to whole chunks of :data:`CHUNK` rows).

A sample split over ``k`` members runs the layer, per segment (the split samples of one micro-batch that share a
group), by one of two methods (:mod:`hf_hdp.attention.recurrent.split`), and this module counts exactly what each
member computes and sends (:func:`state_split_loads`), message by message as :mod:`~hf_hdp.attention.recurrent.split`
and :mod:`~hf_hdp.attention.recurrent.exchange` send them; the backward of every exchange sends each received tensor's
gradient back to its sender, so a member sends in backward exactly what it received in forward:

- ``"heads"`` (``k`` must divide ``Hv``): member ``m`` holds ``n_m`` rows and gets heads ``q_m`` of the value heads
  and ``h_m`` key heads (:func:`~hf_hdp.planning.layout.head_split`). Forward, it sends each other member ``j``
  its rows of ``j``'s columns ``w_j = 2·h_j·dk + q_j·dv + 2·q_j`` (channels, decays, strengths), then each other
  member ``j`` the ``n_j`` rows of its ``q_m·dv`` output columns. No extra compute: the whole recurrence of every
  document for ``q_m`` heads.
- ``"scan"``: forward, member ``m`` sends the ``kernel - 1`` convolution halo rows (``C`` values each) that other
  members' pieces need of its rows, then its pieces' transitions and final states
  (``Hv·dk·(dk + dv)`` values each) to every other member. Its compute: each piece's recurrence from the zero
  state, the piece's transition, and for every piece with an incoming state the read-out of that state
  (:func:`transition_flops`, :func:`read_state_flops`).

Time of a member: forward + backward compute (:data:`~.specs.FWD_BWD` times the forward FLOPs) over the state
layers' FLOP rate, plus its exchange, nothing hidden (each phase waits for its messages): per pass, one latency per
round and the larger of what it sends and receives over the bandwidth. A segment waits for its slowest member.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from ..layers import StateShape
from ..layout import head_split, hybrid_member_sizes
from ..pieces import segment_pieces
from .specs import FWD_BWD, HARDWARE_PRESETS, HardwareSpec

CHUNK = 64  # hf_hdp.attention.recurrent.delta_rule.CHUNK
METHODS = ("heads", "scan")
MODES = ("auto", *METHODS)
HALO = "halo"  # the only method of a short convolution (kind "conv")

__all__ = [
    "CHUNK",
    "MODES",
    "MemberLoad",
    "SplitCost",
    "StateShape",
    "conv_flops",
    "delta_rule_flops",
    "local_state_flops",
    "read_state_flops",
    "resolve_method",
    "ssd_flops",
    "segment_layout",
    "state_segment_time",
    "state_split_bytes",
    "state_split_costs",
    "state_split_loads",
    "state_split_messages",
    "transition_flops",
]


def _chunks(tokens: int) -> int:
    return -(-int(tokens) // CHUNK) if tokens > 0 else 0


def delta_rule_flops(tokens: int, heads: int, dk: int, dv: int, scan: bool = False) -> float:
    """Forward FLOPs of the chunked gated delta rule over ONE sequence of ``tokens`` rows and ``heads`` heads, padded
    to whole chunks of ``c =`` :data:`CHUNK` rows. Per chunk and head: ``K Kᵀ`` and ``Q Kᵀ`` (``2·c²·dk`` each), the
    unit-triangular solve for ``U`` and ``W`` (``c²·(dk + dv)``), then ``W S``, ``Qd S`` and ``Kdᵀ V'``
    (``2·c·dk·dv`` each) and ``A V'`` (``2·c²·dv``). ``scan`` adds :func:`transition_flops` and
    :func:`read_state_flops` (a piece that has an incoming state)."""
    c, n = CHUNK, _chunks(tokens)
    flops = n * heads * (5 * c * c * dk + 3 * c * c * dv + 6 * c * dk * dv)
    if scan:
        flops += transition_flops(tokens, heads, dk) + read_state_flops(tokens, heads, dk, dv)
    return float(flops)


def transition_flops(tokens: int, heads: int, dk: int) -> float:
    """Forward FLOPs of a piece's transition ``M`` (``delta_rule.transition``): per chunk, its map applied to ``M`` as a
    rank-``c`` update, ``Kdᵀ (W M)`` (``4·c·dk²``). Not computed for a document's last piece (nothing reads it)."""
    return float(_chunks(tokens) * heads * 4 * CHUNK * dk * dk)


def read_state_flops(tokens: int, heads: int, dk: int, dv: int) -> float:
    """Forward FLOPs of what an incoming state adds to a piece's outputs (``delta_rule.read_state``): per chunk,
    ``Qd S`` and ``W S`` (``2·c·dk·dv`` each), ``A (W S)`` (``2·c²·dv``), and the chunk's map applied to ``S``
    (``W S`` again and ``Kdᵀ (W S)``: ``4·c·dk·dv``)."""
    c = CHUNK
    return float(_chunks(tokens) * heads * (8 * c * dk * dv + 2 * c * c * dv))


def ssd_flops(tokens: int, heads: int, dk: int, dv: int) -> float:
    """Forward FLOPs of Mamba-2's chunked recurrence (``delta_rule.linear_chunk_quantities`` and ``run_chunks`` with no
    ``W``) over ONE sequence, padded to whole chunks: per chunk and head ``Q Kᵀ`` (``2·c²·dk``), ``A V``
    (``2·c²·dv``), ``Qd S`` and ``Kdᵀ V`` (``2·c·dk·dv`` each); plus the skip ``D x`` (``2·dv`` per row and head)."""
    c = CHUNK
    return float(_chunks(tokens) * heads * (2 * c * c * (dk + dv) + 4 * c * dk * dv) + 2 * tokens * heads * dv)


def _recurrence_flops(tokens: int, heads: int, dk: int, dv: int, kind: str) -> float:
    return ssd_flops(tokens, heads, dk, dv) if kind == "ssd" else delta_rule_flops(tokens, heads, dk, dv)


def _transition_flops(tokens: int, heads: int, dk: int, kind: str) -> float:
    """:func:`transition_flops`; without the delta (``"ssd"``) the transition is the product of the chunks' decays
    times the identity: no matrix product."""
    if kind == "ssd":
        return 0.0
    return transition_flops(tokens, heads, dk)


def _read_state_flops(tokens: int, heads: int, dk: int, dv: int, kind: str) -> float:
    """:func:`read_state_flops`; without the delta: per chunk ``Qd S`` (``2·c·dk·dv``; the map is a decay)."""
    if kind == "ssd":
        return float(_chunks(tokens) * heads * 2 * CHUNK * dk * dv)
    return read_state_flops(tokens, heads, dk, dv)


def conv_flops(rows: int, channels: int, kernel: int) -> float:
    """Forward FLOPs of the depthwise causal convolution: a multiply-add per tap, channel and row."""
    return float(2 * kernel * channels * rows)


def local_state_flops(length: int, shape: StateShape) -> float:
    """Forward FLOPs of one whole sample of ``length`` tokens in one state layer (projections excluded): the
    convolution, and the recurrence of a ``"delta"`` or ``"ssd"`` layer."""
    conv = conv_flops(length, shape.channels, shape.kernel)
    if shape.kind == "conv":
        return conv
    return _recurrence_flops(length, shape.value_heads, shape.key_dim, shape.value_dim, shape.kind) + conv


@lru_cache(maxsize=4096)
def segment_layout(lengths: tuple[int, ...], k: int, ulysses: int = 1) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Per document, its pieces ``(member, start, end)`` in sample order (:func:`hf_hdp.planning.pieces.segment_pieces`,
    the layout the state-carrying layers run)."""
    return tuple(
        tuple((p.member, p.start, p.end) for p in doc)
        for doc in segment_pieces(tuple(int(n) for n in lengths), k, ulysses)
    )


class MemberLoad(NamedTuple):
    """What one member of a split segment does in one Gated DeltaNet layer: forward FLOPs; values sent and received,
    forward and backward; messages sent, forward and backward; exchange rounds of one pass; and ``wire``, the larger of
    the values it sends and receives in one pass."""

    flops: float
    sent: int
    received: int
    messages: int
    rounds: int
    wire: int


def resolve_method(mode: str, k: int, shape: StateShape) -> str | None:
    """The method a segment of ``k`` members runs under ``mode`` (``HDPConfig.state_split``): ``"scan"`` where ``k``
    does not divide the value heads (as :func:`hf_hdp.attention.recurrent.split.choose_split`), else the forced
    method, or ``None`` for ``"auto"`` (priced: :func:`state_segment_time`)."""
    if mode not in MODES:
        raise ValueError(f"the split of state-carrying layers must be one of {MODES}, got {mode!r}")
    if shape.kind == "conv":
        return HALO
    if mode == "scan" or shape.value_heads % k:
        return "scan"
    return "heads" if mode == "heads" else None


@lru_cache(maxsize=8192)
def state_split_loads(
    lengths: tuple[int, ...], k: int, ulysses: int, shape: StateShape, method: str
) -> tuple[MemberLoad, ...]:
    """:class:`MemberLoad` of every member ``0..k-1`` of a segment of documents ``lengths`` (see the module
    docstring for what each method sends)."""
    lengths = tuple(int(n) for n in lengths)
    if shape.kind == "conv":
        if method not in (HALO, "scan"):
            raise ValueError(
                f"a short convolution's split sample exchanges its halo only (method {HALO!r}), got {method!r}"
            )
        return _scan_loads(lengths, k, ulysses, shape)
    if method == "heads":
        return _heads_loads(lengths, k, ulysses, shape)
    if method == "scan":
        return _scan_loads(lengths, k, ulysses, shape)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _heads_loads(lengths, k, ulysses, sh: StateShape) -> tuple[MemberLoad, ...]:
    if sh.value_heads % k:
        raise ValueError(f"head-parallel needs the group size ({k}) to divide the value heads ({sh.value_heads})")
    splits = head_split(sh.value_heads, sh.key_heads, k)
    q = [sp.num_q for sp in splits]
    kv = [len(sp.kv_heads) for sp in splits]
    width = [2 * kv[j] * sh.key_dim + q[j] * sh.value_dim + 2 * q[j] for j in range(k)]  # columns of [x | g | beta]
    out_w = [q[j] * sh.value_dim for j in range(k)]
    rows = [0] * k
    for n in lengths:
        for m, r in enumerate(hybrid_member_sizes(n, k, ulysses)):
            rows[m] += r
    total_rows, total_w, total_o = sum(rows), sum(width), sum(out_w)
    holders = sum(1 for r in rows if r)
    loads = []
    for m in range(k):
        n_m, others = rows[m], total_rows - rows[m]
        fwd_sent = n_m * (total_w - width[m]) + out_w[m] * others
        fwd_recv = width[m] * others + n_m * (total_o - out_w[m])
        mine = 1 if n_m else 0
        messages = 2 * ((k - 1) * mine + holders - mine)
        flops = sum(_recurrence_flops(n, q[m], sh.key_dim, sh.value_dim, sh.kind) for n in lengths)
        flops += conv_flops(total_rows, 2 * kv[m] * sh.key_dim + out_w[m], sh.kernel)
        total = fwd_sent + fwd_recv
        loads.append(MemberLoad(flops, total, total, messages, 2 * (k - 1), max(fwd_sent, fwd_recv)))
    return tuple(loads)


def _scan_loads(lengths, k, ulysses, sh: StateShape) -> tuple[MemberLoad, ...]:
    width, hv, dk, dv = sh.kernel - 1, sh.value_heads, sh.key_dim, sh.value_dim
    conv_only = sh.kind == "conv"  # a short convolution: the halo, no state
    state = 0 if conv_only else hv * dk * (dk + dv)  # one piece's transition and final state
    halo_out, halo_in = [0] * k, [0] * k
    sends_to: list[set] = [set() for _ in range(k)]
    recv_from: list[set] = [set() for _ in range(k)]
    count = [0] * k
    flops = [0.0] * k
    for doc in segment_layout(lengths, k, ulysses):
        for i, (m, a, b) in enumerate(doc):
            count[m] += 1
            n = b - a
            lo = max(0, a - width)
            j, pos = i - 1, a - 1
            while pos >= lo:  # the halo's rows, by owner (walking back through the pieces before this one)
                om, oa, _ = doc[j]
                take = pos - max(oa, lo) + 1
                if om != m:
                    halo_out[om] += take
                    halo_in[m] += take
                    sends_to[om].add(m)
                    recv_from[m].add(om)
                pos -= take
                j -= 1
            f = conv_flops(n + a - lo, sh.channels, sh.kernel)
            if not conv_only:
                f += _recurrence_flops(n, hv, dk, dv, sh.kind)
                if i < len(doc) - 1:  # a document's last piece computes no transition (nothing reads it)
                    f += _transition_flops(n, hv, dk, sh.kind)
            if i and not conv_only:  # an incoming state: its read-out, and the state from the i pieces before
                f += _read_state_flops(n, hv, dk, dv, sh.kind) + (i - 1) * hv * 2 * dk * dk * dv
            flops[m] += f
    pieces = sum(count)
    holders = sum(1 for c in count if c)
    loads = []
    for m in range(k):
        fwd_sent = sh.channels * halo_out[m] + ((k - 1) * count[m] * state)
        fwd_recv = sh.channels * halo_in[m] + (pieces - count[m]) * state
        mine = 1 if count[m] else 0
        messages = len(sends_to[m]) + len(recv_from[m])
        if not conv_only:  # the states, to every other member, and each holder's gradient back
            messages += (k - 1) * mine + holders - mine
        halo_rounds = len({(d - m) % k for d in sends_to[m]} | {(m - s) % k for s in recv_from[m]})
        total = fwd_sent + fwd_recv
        loads.append(
            MemberLoad(
                flops[m],
                total,
                total,
                messages,
                halo_rounds + (k - 1 if pieces and not conv_only else 0),
                max(fwd_sent, fwd_recv),
            )
        )
    return tuple(loads)


def state_split_bytes(
    lengths, k: int, ulysses: int, shape: StateShape, method: str, member: int, bytes_per_value: int = 4
) -> int:
    """Exact bytes member ``member`` of a segment of documents ``lengths`` on ``k`` ranks (Ulysses degree ``ulysses``
    of its attention: the rows' layout) sends in one Gated DeltaNet layer, forward and backward, by ``method``."""
    if k <= 1:
        return 0
    return state_split_loads(tuple(int(n) for n in lengths), k, ulysses, shape, method)[member].sent * bytes_per_value


def state_split_messages(lengths, k: int, ulysses: int, shape: StateShape, method: str, member: int) -> int:
    """P2P messages member ``member`` sends in one Gated DeltaNet layer, forward and backward (see
    :func:`state_split_bytes`)."""
    if k <= 1:
        return 0
    return state_split_loads(tuple(int(n) for n in lengths), k, ulysses, shape, method)[member].messages


def _member_time(load: MemberLoad, rate: float, bandwidth: float, latency: float, bpv: int) -> tuple[float, float]:
    return FWD_BWD * load.flops / rate, 2 * (load.rounds * latency + load.wire * bpv / bandwidth)


@lru_cache(maxsize=65536)
def state_segment_time(
    lengths: tuple[int, ...],
    k: int,
    ulysses: int,
    shape: StateShape,
    mode: str,
    rate: float,
    bandwidth: float,
    latency: float,
    bytes_per_value: int,
) -> tuple[str, float, float]:
    """``(method, compute, exchange)`` seconds of one Gated DeltaNet layer of a segment on its slowest member, forward
    and backward; the method is ``mode``'s (:func:`resolve_method`), for ``"auto"`` the faster (``"heads"`` on a
    tie)."""
    method = resolve_method(mode, k, shape)
    best = None
    for m in (method,) if method else METHODS:
        loads = state_split_loads(lengths, k, ulysses, shape, m)
        times = [_member_time(ld, rate, bandwidth, latency, bytes_per_value) for ld in loads]
        compute, comm = max(times, key=lambda t: t[0] + t[1])
        if best is None or compute + comm < best[1] + best[2]:
            best = (m, compute, comm)
    return best


@dataclass(frozen=True)
class SplitCost:
    seconds: float  # the slowest member's, forward and backward
    bytes_sent: int  # by the busiest member, forward and backward
    flops: float  # by the busiest member, forward and backward


def state_split_costs(
    lengths: tuple[int, ...],
    k: int,
    key_heads: int,
    key_dim: int,
    value_heads: int,
    value_dim: int,
    kernel: int,
    hardware: HardwareSpec | str = "cpu",
    bytes_per_value: int = 4,
    ulysses: int = 1,
    kind: str = "delta",
) -> dict[str, SplitCost]:
    """One segment's layer (its documents ``lengths``) priced per method on ``hardware`` (the links inside a node when
    the group fits one); ``"heads"`` only when ``k`` divides the value heads; ``kind`` the layer's
    (:class:`~hf_hdp.planning.layers.StateShape`: ``"ssd"`` prices Mamba-2's recurrence, ``"conv"`` gives its one
    method, ``"halo"``). The state layers run at the hardware's GEMM efficiency (their work is batched matrix products
    of :data:`CHUNK` rows)."""
    hw = HARDWARE_PRESETS[hardware] if isinstance(hardware, str) else hardware
    rate = hw.peak_flops * hw.linear_efficiency
    bw, lat = (
        (hw.intra_bandwidth, hw.intra_latency) if k <= hw.ranks_per_node else (hw.inter_bandwidth, hw.inter_latency)
    )
    shape = StateShape(key_heads, key_dim, value_heads, value_dim, kernel, kind)
    lengths = tuple(int(n) for n in lengths)
    out = {}
    for method in (HALO,) if kind == "conv" else METHODS:
        if method == "heads" and value_heads % k:
            continue
        loads = state_split_loads(lengths, k, ulysses, shape, method)
        seconds = max(sum(_member_time(ld, rate, bw, lat, bytes_per_value)) for ld in loads)
        out[method] = SplitCost(
            seconds, max(ld.sent for ld in loads) * bytes_per_value, FWD_BWD * max(ld.flops for ld in loads)
        )
    return out
