"""Emulated links between ranks on one machine, so that benchmarks measure what the wire costs.

Loopback P2P between processes of one machine is nearly free (gloo: about 80 us and 2.2 GB/s, with
compute thousands of times slower than a GPU's), so a static DP x CP mesh pays nothing for its rings
and the planners' gains, which come from wire time, do not show in measurements. A
:class:`LinkEmulator` prices every message and collective of :class:`~hf_hdp.distributed.mesh.DynamicMesh` with
the links of a real cluster, and the mesh (``DynamicMesh(links=...)``; off by default) makes each
P2P exchange and collective last that long by *sleeping* (never spinning: the ranks of a benchmark
share a few cores).

Formulas (the same as :class:`~hf_hdp.planning.cost.CostModel`'s, so measured and modelled agree):

- a rank's node is ``rank // ranks_per_node``; two ranks of one node talk over the intra-node link
  (NVLink), others over the inter-node link (InfiniBand);
- one P2P message of ``n`` bytes from ``src`` to ``dst``: ``latency + n / bandwidth`` of that link
  (:meth:`LinkEmulator.p2p_delay`, ``CostModel.message_time``). An exchange (send to ``dst`` and receive
  from ``src`` at once, as the ring does) completes when both messages have arrived: the ``max`` of the
  two (:meth:`LinkEmulator.exchange_delay`). In a ring that spans nodes every member therefore waits for
  an inter-node hop, as ``CostModel.segment_breakdown`` prices a group that spans nodes;
- an all-reduce of ``n`` bytes over ``W`` ranks: ``2·(W-1)/W · n / bw + 2·ceil(log2 W) · lat``, over
  the inter-node link when ``W > ranks_per_node`` (exactly ``CostModel.allreduce_time``); a
  reduce-scatter (``n``: the whole input) or an all-gather (``n``: the whole output) costs half of it
  (:meth:`LinkEmulator.collective_delay`).

Presets (:data:`LINK_PRESETS`): ``"h100-ib"`` takes the links of ``HARDWARE_PRESETS["h100"]``: NVLink 4
inside a node (450 GB/s one way, 5 us), InfiniBand NDR between nodes (400 Gb/s = 50 GB/s one way,
15 us). Used as they are with a CPU's compute, those links are some 12,000 times too fast for it. So
:meth:`LinkEmulator.scaled` slows them down by the factor that makes this machine's
compute-to-bandwidth ratio an H100 node's: every time of the H100 world is stretched by the same
``1 / scale``, with

    scale = T_h100(s) / T_this(s),    T(s) = a·s² + b·s   (per layer, forward + backward)

where ``a, b`` of this machine come from the calibration (:func:`~hf_hdp.planning.cost.calibrate`,
``benchmarks/calibrate.py``) and ``a, b`` of the H100 from ``CostModel.from_specs(model,
HARDWARE_PRESETS["h100"])`` for the SAME model. Since ``a = 3·F_att / R_att`` and ``b = 3·F_lin / R_lin``
(FLOPs over achieved FLOP/s), ``scale`` is this machine's achieved throughput over the H100 preset's
(445 TFLOP/s attention = 989 x 0.45, 593 TFLOP/s GEMMs = 989 x 0.60) for the FLOP mix of a sequence of
``s`` tokens (``reference_tokens``: the benchmark passes its tokens per rank; by default the length
where this machine's attention and linear work are equal, ``b / a``). Then

    bandwidth_emulated = bandwidth_h100 · scale,    latency_emulated = latency_h100 / scale.

The per-layer overhead ``c`` is not part of the scale (it is host work, not throughput).

Example (this project's 2-core Xeon, one thread per rank, float32, cpu_flash attention, the tiny stdlib
Llama; ``benchmarks/calibrate.py --links h100-ib``): attention 34.9 GFLOP/s and GEMMs 47.3 GFLOP/s, i.e.
7.84e-5 and 7.97e-5 of the H100 preset's; at 1,024 tokens ``scale`` = 7.9e-5, so NVLink becomes
35.6 MB/s and 63 ms a message, InfiniBand 3.96 MB/s and 190 ms (the calibrations of three
``benchmarks/real_ranks.py`` runs gave 7.7e-5 to 8.4e-5). The scale is measured on every run, never
stored: a different machine, thread count or backend gives another one. With these links the tiny
model's rings are latency-bound (a 190 ms hop against attention blocks of milliseconds), as a model of
hidden size 128 would be on real H100s.

:meth:`LinkEmulator.cost_model` is the cost model of this machine with exactly these links (and
``ranks_per_node``), for the planners and ``plan_metrics`` of a benchmark that runs with the emulator.

Plain Python on top of the cost model: this module imports neither torch nor torch.distributed (the
mesh does the sleeping).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from ..planning.cost import FWD_BWD, HARDWARE_PRESETS, CostModel, HardwareSpec, ModelSpec

#: link preset name -> the HARDWARE_PRESETS entry whose links (intra-node and inter-node) it takes
LINK_PRESETS = {
    "h100-ib": "h100",  # NVLink 4 inside a node, InfiniBand NDR (400 Gb/s per GPU) between nodes
}

#: collective kinds of :meth:`LinkEmulator.collective_delay` and their share of an all-reduce's time
COLLECTIVE_SHARE = {"all_reduce": 1.0, "reduce_scatter": 0.5, "all_gather": 0.5}


@dataclass(frozen=True)
class LinkEmulator:
    """The links between ranks: bytes/s one way and seconds per message, inside a node and between nodes.

    ``ranks_per_node`` ranks share a node (``rank // ranks_per_node``). ``derivation``: how a scaled preset
    got its figures (:meth:`scaled`), for reports; not part of equality.
    """

    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    ranks_per_node: int
    name: str = "custom"
    derivation: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        for f in ("intra_bandwidth", "inter_bandwidth"):
            v = getattr(self, f)
            if not v > 0:
                raise ValueError(f"LinkEmulator({f}={v!r}): a bandwidth must be a positive number of bytes/s")
        for f in ("intra_latency", "inter_latency"):
            v = getattr(self, f)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"LinkEmulator({f}={v!r}): a latency must be a finite number of seconds >= 0")
        if isinstance(self.ranks_per_node, bool) or not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1:
            raise ValueError(f"LinkEmulator(ranks_per_node={self.ranks_per_node!r}) must be a positive int")

    # ------------------------------------------------------------ construction
    @classmethod
    def from_hardware(
        cls,
        hw: HardwareSpec,
        ranks_per_node: int | None = None,
        scale: float = 1.0,
        name: str | None = None,
        derivation: dict | None = None,
    ) -> LinkEmulator:
        """The links of ``hw``, with bandwidths times ``scale`` and latencies over it (see the module docstring)."""
        if not scale > 0:
            raise ValueError(f"LinkEmulator.from_hardware(scale={scale!r}) must be > 0")
        return cls(
            hw.intra_bandwidth * scale,
            hw.intra_latency / scale,
            hw.inter_bandwidth * scale,
            hw.inter_latency / scale,
            int(ranks_per_node or hw.ranks_per_node),
            name or hw.name,
            dict(derivation or {}, scale=scale),
        )

    @classmethod
    def preset(cls, name: str, ranks_per_node: int | None = None) -> LinkEmulator:
        """A preset's links unscaled (the real cluster's figures)."""
        return cls.from_hardware(_preset_hardware(name), ranks_per_node, 1.0, name)

    @classmethod
    def scaled(
        cls,
        name: str,
        cost: CostModel,
        model: ModelSpec,
        reference_tokens: float | None = None,
        ranks_per_node: int | None = None,
    ) -> LinkEmulator:
        """Preset ``name``'s links slowed to this machine's compute (see the module docstring).

        ``cost``: this machine's calibrated cost model of ``model`` (its ``a``, ``b``); ``reference_tokens``:
        the sequence length whose FLOP mix sets the scale (default ``cost.b / cost.a``);
        ``ranks_per_node``: default ``LOCAL_WORLD_SIZE`` of torchrun, else the preset's.
        """
        hw = _preset_hardware(name)
        scale, derivation = compute_scale(cost, model, hw, reference_tokens)
        if ranks_per_node is None:
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or hw.ranks_per_node
        return cls.from_hardware(hw, ranks_per_node, scale, f"{name} x {scale:.3g}", derivation)

    # ------------------------------------------------------------ delays
    def node(self, rank: int) -> int:
        return int(rank) // self.ranks_per_node

    def link(self, src: int, dst: int) -> tuple[float, float]:
        """``(bandwidth, latency)`` of the link between two ranks' nodes."""
        if self.node(src) == self.node(dst):
            return self.intra_bandwidth, self.intra_latency
        return self.inter_bandwidth, self.inter_latency

    def p2p_delay(self, nbytes: float, src: int, dst: int) -> float:
        """Seconds from sending ``nbytes`` at ``src`` to their arrival at ``dst``: latency + bytes / bandwidth."""
        if src == dst:
            return 0.0
        bw, lat = self.link(src, dst)
        return lat + float(nbytes) / bw

    def exchange_delay(self, rank: int, send_bytes: float, dst: int, recv_bytes: float, src: int) -> float:
        """One exchange of ``rank``: send ``send_bytes`` to ``dst`` and receive ``recv_bytes`` from ``src``,
        both started at once; done when both have arrived (the larger of the two delays)."""
        return max(self.p2p_delay(send_bytes, rank, dst), self.p2p_delay(recv_bytes, src, rank))

    def spans_nodes(self, world_size: int) -> bool:
        return world_size > self.ranks_per_node

    def collective_delay(self, nbytes: float, world_size: int, kind: str = "all_reduce") -> float:
        """A collective over ranks ``0..world_size-1`` (see the module docstring). ``kind``: ``"all_reduce"``
        (``nbytes`` per rank), ``"reduce_scatter"`` (``nbytes``: the whole input) or ``"all_gather"``
        (``nbytes``: the whole output)."""
        if kind not in COLLECTIVE_SHARE:
            raise ValueError(f"collective_delay(kind={kind!r}): one of {sorted(COLLECTIVE_SHARE)}")
        if world_size <= 1 or nbytes <= 0:
            return 0.0
        if self.spans_nodes(world_size):
            bw, lat = self.inter_bandwidth, self.inter_latency
        else:
            bw, lat = self.intra_bandwidth, self.intra_latency
        full = 2.0 * (world_size - 1) / world_size * nbytes / bw + 2 * math.ceil(math.log2(world_size)) * lat
        return COLLECTIVE_SHARE[kind] * full

    # ------------------------------------------------------------ the matching cost model
    def cost_model(self, cost: CostModel) -> CostModel:
        """``cost`` with these links and ``ranks_per_node``: what the planners and ``plan_metrics`` should use
        when the mesh runs with this emulator."""
        return replace(
            cost,
            intra_bandwidth=self.intra_bandwidth,
            intra_latency=self.intra_latency,
            inter_bandwidth=self.inter_bandwidth,
            inter_latency=self.inter_latency,
            ranks_per_node=self.ranks_per_node,
            label=f"{cost.label} + links {self.name}",
        )

    def describe(self) -> str:
        return (
            f"links {self.name}: intra-node {self.intra_bandwidth / 1e6:,.3g} MB/s + "
            f"{self.intra_latency * 1e3:,.3g} ms, "
            f"inter-node {self.inter_bandwidth / 1e6:,.3g} MB/s + {self.inter_latency * 1e3:,.3g} ms, "
            f"{self.ranks_per_node} ranks per node"
        )


def _preset_hardware(name: str) -> HardwareSpec:
    if name not in LINK_PRESETS:
        raise ValueError(f"unknown link preset {name!r}; choose one of {sorted(LINK_PRESETS)}")
    return HARDWARE_PRESETS[LINK_PRESETS[name]]


def compute_scale(
    cost: CostModel, model: ModelSpec, hw: HardwareSpec, reference_tokens: float | None = None
) -> tuple[float, dict]:
    """``(scale, derivation)``: ``T_hw(s) / T_this(s)`` with ``T(s) = a·s² + b·s`` per layer (module docstring).

    ``cost``: this machine's calibrated cost model of ``model``. ``derivation`` holds the reference length,
    both machines' achieved attention and linear FLOP/s and their ratios.
    """
    if not (cost.a > 0 and cost.b > 0):
        raise ValueError(
            "compute_scale needs a calibrated cost model with a > 0 and b > 0 "
            f"(got a={cost.a!r}, b={cost.b!r}); run hf_hdp.planning.cost.calibrate first"
        )
    ref = CostModel.from_specs(model, hw)
    s = float(reference_tokens) if reference_tokens else cost.b / cost.a
    scale = (ref.a * s * s + ref.b * s) / (cost.a * s * s + cost.b * s)
    fb = FWD_BWD  # a and b are forward + backward, the FLOP counts forward
    rates = {
        "this_attention_flops": fb * model.attention_flops_per_s2 / cost.a,
        "this_linear_flops": fb * model.linear_flops_per_token / cost.b,
        "ref_attention_flops": fb * model.attention_flops_per_s2 / ref.a,
        "ref_linear_flops": fb * model.linear_flops_per_token / ref.b,
    }
    derivation = {
        "reference_hardware": hw.name,
        "reference_tokens": s,
        "scale": scale,
        **rates,
        "attention_ratio": rates["this_attention_flops"] / rates["ref_attention_flops"],
        "linear_ratio": rates["this_linear_flops"] / rates["ref_linear_flops"],
    }
    return scale, derivation


def scaled_links(
    name: str,
    cost: CostModel,
    model: ModelSpec,
    reference_tokens: float | None = None,
    ranks_per_node: int | None = None,
) -> tuple[LinkEmulator, CostModel]:
    """The scaled emulator of preset ``name`` and the cost model of this machine with exactly its links."""
    links = LinkEmulator.scaled(name, cost, model, reference_tokens, ranks_per_node)
    return links, links.cost_model(cost)


__all__ = ["COLLECTIVE_SHARE", "LINK_PRESETS", "LinkEmulator", "compute_scale", "scaled_links"]
