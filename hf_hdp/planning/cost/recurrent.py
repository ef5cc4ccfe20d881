"""The cost of a state-carrying layer's split over a group (pure Python): head-parallel against the state scan.

A Gated DeltaNet layer's work is linear in the sample's length ``s``. Split over ``k`` members:

- **heads**: no extra compute (each member runs ``Hv / k`` heads over the whole sample); per member it sends
  ``(k - 1) / k`` of its rows' convolution channels, decays and strengths, and gets back ``(k - 1) / k`` of
  its rows' outputs: about ``n (C + 2 Hv + Hv dv) (k - 1) / k`` values, ``n = s / k``.
- **scan**: each member runs its rows from the zero state, then the transition (``[dk, dk]`` per chunk) and
  the read-out of the incoming state (about 60% more arithmetic than the recurrence alone for
  ``dk = dv = 128``); it sends ``kernel - 1`` halo rows per piece and its pieces' ``(M, B)`` to every other
  member: ``pieces · Hv (dk² + dk dv) (k - 1)`` values, independent of ``s``.

So the scan wins when ``s / k`` is small beside ``Hv dk (dk + dv) k`` (short pieces, wide states, many
members) or the links are slow; head-parallel wins on long pieces and fast links. Forward and backward
are priced together (backward moves the same bytes again and does twice the forward's arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import hybrid_token_ranges
from .specs import FWD_BWD, HARDWARE_PRESETS, HardwareSpec

CHUNK = 64  # hf_hdp.attention.recurrent.delta_rule.CHUNK


@dataclass(frozen=True)
class SplitCost:
    seconds: float
    bytes_sent: int  # by the busiest member, forward and backward
    flops: float  # by the busiest member, forward and backward


def delta_rule_flops(tokens: int, heads: int, dk: int, dv: int, scan: bool = False) -> float:
    """Forward FLOPs of the chunked gated delta rule over ``tokens`` rows of ``heads`` heads; ``scan`` adds the
    transition and the read-out of an incoming state."""
    c = CHUNK
    per_token = 2 * c * dk * 2 + c * (dk + dv) + 6 * dk * dv + 2 * c * dv
    if scan:
        per_token += 2 * dk * dk + 2 * dk ** 3 / c + 2 * c * dk + 2 * dk * dv + 2 * dk * dk * dv / c
    return float(per_token * tokens * heads)


def state_split_costs(lengths: tuple[int, ...], k: int, key_heads: int, key_dim: int, value_heads: int,
                      value_dim: int, kernel: int, hardware: HardwareSpec | str = "cpu",
                      bytes_per_value: int = 4) -> dict[str, SplitCost]:
    """Time of one segment's layer (its documents ``lengths``) on its busiest member, per method; ``"heads"`` only
    when ``k`` divides the value heads."""
    hw = HARDWARE_PRESETS[hardware] if isinstance(hardware, str) else hardware
    rate = hw.peak_flops * hw.linear_efficiency
    bw, lat = (hw.intra_bandwidth, hw.intra_latency) if k <= hw.ranks_per_node else (hw.inter_bandwidth,
                                                                                        hw.inter_latency)
    channels = 2 * key_heads * key_dim + value_heads * value_dim
    rows = max(sum(sum(b - a for a, b in hybrid_token_ranges(n, k, m)) for n in lengths) for m in range(k))
    pieces = max(sum(len(hybrid_token_ranges(n, k, m)) for n in lengths) for m in range(k))
    total = sum(lengths)
    out = {}
    conv = 2 * kernel * channels
    if value_heads % k == 0:
        flops = FWD_BWD * (delta_rule_flops(total, value_heads // k, key_dim, value_dim) + conv * total / k)
        values = 2 * rows * (channels + 2 * value_heads + value_heads * value_dim) * (k - 1) / k
        messages = 4 * (k - 1)
        out["heads"] = SplitCost(flops / rate + values * bytes_per_value / bw + messages * lat,
                                 int(values * bytes_per_value), flops)
    flops = FWD_BWD * (delta_rule_flops(rows, value_heads, key_dim, value_dim, scan=True) + conv * rows)
    values = 2 * (pieces * (kernel - 1) * channels + pieces * value_heads * key_dim * (key_dim + value_dim) * (k - 1))
    messages = 4 * (k - 1)
    out["scan"] = SplitCost(flops / rate + values * bytes_per_value / bw + messages * lat,
                            int(values * bytes_per_value), flops)
    return out
