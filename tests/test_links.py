"""The link emulator (hf_hdp.distributed.links) and DynamicMesh(links=...): formulas, and a mesh that still moves the right
bytes while it counts the emulated seconds. No assertion on measured time anywhere."""

from __future__ import annotations

import math

import pytest
import torch

from hf_hdp.distributed.links import LINK_PRESETS, LinkEmulator, compute_scale, scaled_links
from hf_hdp.planning.cost import HARDWARE_PRESETS, CostModel, ModelSpec
from tests.dist_utils import run_distributed

LINKS = LinkEmulator(intra_bandwidth=4e9, intra_latency=2e-5, inter_bandwidth=1e9, inter_latency=1e-4, ranks_per_node=2)
TINY = ModelSpec("tiny", 128, 4, 4, 2, 336, 2048, tie_word_embeddings=True)


def test_p2p_delay_uses_the_link_between_the_nodes():
    assert LINKS.p2p_delay(4e6, 0, 1) == pytest.approx(2e-5 + 4e6 / 4e9)  # ranks 0 and 1: node 0
    assert LINKS.p2p_delay(4e6, 2, 3) == pytest.approx(2e-5 + 4e6 / 4e9)
    assert LINKS.p2p_delay(4e6, 1, 2) == pytest.approx(1e-4 + 4e6 / 1e9)  # node 0 -> node 1
    assert LINKS.p2p_delay(0, 3, 0) == pytest.approx(1e-4)
    assert LINKS.p2p_delay(123, 1, 1) == 0.0
    # an exchange is done when both its messages have arrived
    assert LINKS.exchange_delay(1, 1e6, 0, 1e6, 2) == pytest.approx(LINKS.p2p_delay(1e6, 2, 1))
    assert LINKS.exchange_delay(0, 8e6, 1, 1e3, 1) == pytest.approx(LINKS.p2p_delay(8e6, 0, 1))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_collective_delay_is_the_cost_models_allreduce(world):
    cost = LINKS.cost_model(CostModel(1e-8, 1e-6, 1e-4, num_layers=2))
    for nbytes in (0, 1, 4e6, 3.3e7):
        expected = cost.allreduce_time(nbytes, world)
        assert LINKS.collective_delay(nbytes, world) == pytest.approx(expected, rel=1e-15, abs=0)
        assert LINKS.collective_delay(nbytes, world, "reduce_scatter") == pytest.approx(expected / 2, abs=0)
        assert LINKS.collective_delay(nbytes, world, "all_gather") == pytest.approx(expected / 2, abs=0)
    if world > 1:  # by hand: over InfiniBand once the world spans nodes
        bw, lat = (1e9, 1e-4) if world > 2 else (4e9, 2e-5)
        hand = 2 * (world - 1) / world * 4e6 / bw + 2 * math.ceil(math.log2(world)) * lat
        assert LINKS.collective_delay(4e6, world) == pytest.approx(hand)
    with pytest.raises(ValueError, match="kind"):
        LINKS.collective_delay(1, 2, "broadcast")


def test_cost_model_takes_exactly_the_links():
    base = CostModel.from_specs(TINY, HARDWARE_PRESETS["cpu"])
    cost = LINKS.cost_model(base)
    assert (
        cost.intra_bandwidth,
        cost.intra_latency,
        cost.inter_bandwidth,
        cost.inter_latency,
        cost.ranks_per_node,
    ) == (4e9, 2e-5, 1e9, 1e-4, 2)
    assert (cost.a, cost.b, cost.c, cost.kv_bytes_per_token, cost.grad_bytes) == (
        base.a,
        base.b,
        base.c,
        base.kv_bytes_per_token,
        base.grad_bytes,
    )
    # a ring's message is priced as the emulator prices it
    assert cost.message_time(1e6, True) == pytest.approx(LINKS.p2p_delay(1e6, 1, 2))
    assert cost.message_time(1e6, False) == pytest.approx(LINKS.p2p_delay(1e6, 0, 1))


def test_scaled_preset_stretches_the_h100_links_by_the_compute_ratio(monkeypatch):
    h100 = HARDWARE_PRESETS[LINK_PRESETS["h100-ib"]]
    cpu = CostModel.from_specs(TINY, HARDWARE_PRESETS["cpu"])
    ref = CostModel.from_specs(TINY, h100)
    s = 1024
    links, cost = scaled_links("h100-ib", cpu, TINY, reference_tokens=s, ranks_per_node=2)
    scale = (ref.a * s * s + ref.b * s) / (cpu.a * s * s + cpu.b * s)
    assert links.derivation["scale"] == pytest.approx(scale)
    assert links.intra_bandwidth == pytest.approx(h100.intra_bandwidth * scale)
    assert links.inter_bandwidth == pytest.approx(h100.inter_bandwidth * scale)
    assert links.intra_latency == pytest.approx(h100.intra_latency / scale)
    assert links.inter_latency == pytest.approx(h100.inter_latency / scale)
    assert links.ranks_per_node == 2 and cost == links.cost_model(cpu)
    # the ratios are throughput ratios: the cpu preset's achieved rates over the h100 preset's
    cpu_hw = HARDWARE_PRESETS["cpu"]
    d = links.derivation
    assert d["attention_ratio"] == pytest.approx(
        cpu_hw.peak_flops * cpu_hw.attention_efficiency / (h100.peak_flops * h100.attention_efficiency)
    )
    assert d["linear_ratio"] == pytest.approx(
        cpu_hw.peak_flops * cpu_hw.linear_efficiency / (h100.peak_flops * h100.linear_efficiency)
    )
    assert min(d["attention_ratio"], d["linear_ratio"]) <= scale <= max(d["attention_ratio"], d["linear_ratio"])
    # default reference length: where this machine's attention equals its linear work
    assert compute_scale(cpu, TINY, h100)[1]["reference_tokens"] == pytest.approx(cpu.b / cpu.a)
    # ranks per node: torchrun's LOCAL_WORLD_SIZE, else the preset's
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert LinkEmulator.scaled("h100-ib", cpu, TINY).ranks_per_node == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert LinkEmulator.scaled("h100-ib", cpu, TINY).ranks_per_node == h100.ranks_per_node
    with pytest.raises(ValueError, match="unknown link preset"):
        LinkEmulator.scaled("tpu", cpu, TINY)
    with pytest.raises(ValueError, match="calibrated"):
        compute_scale(CostModel(0.0, 0.0, 0.0), TINY, h100)


def test_bad_links_are_refused():
    with pytest.raises(ValueError, match="bandwidth"):
        LinkEmulator(0.0, 0.0, 1.0, 0.0, 1)
    with pytest.raises(ValueError, match="latency"):
        LinkEmulator(1.0, -1.0, 1.0, 0.0, 1)
    with pytest.raises(ValueError, match="ranks_per_node"):
        LinkEmulator(1.0, 0.0, 1.0, 0.0, 0)


def test_default_mesh_has_no_emulator():
    from hf_hdp.distributed.mesh import CommStats, DynamicMesh

    mesh = DynamicMesh()
    assert mesh.links is None
    assert (mesh.stats.emulated_wire_s, mesh.stats.emulated_wait_s, mesh.stats.emulated_exposed_s) == (0.0, 0.0, 0.0)
    assert CommStats() == mesh.stats
    with pytest.raises(TypeError, match="LinkEmulator"):
        DynamicMesh(links="h100-ib")


# ------------------------------------------------------------------------ two gloo ranks


def _run_ops(mesh, rank, world):
    """The same P2P exchanges and collectives on ``mesh``; returns what arrived and the formulas' seconds."""
    links = mesh.links
    peer = 1 - rank
    out, expected = {}, 0.0
    for i, (n0, n1) in enumerate([(1000, 3000), (17, 5), (0, 0)]):
        mine, theirs = (n0, n1) if rank == 0 else (n1, n0)
        send = torch.arange(mine, dtype=torch.float32) + 1000.0 * rank + i
        recv = torch.empty(theirs, dtype=torch.float32)
        mesh.wait(mesh.exchange(send, peer, recv, peer, what=f"test exchange {i}"))
        out[f"exchange{i}"] = recv
        if links:
            expected += links.exchange_delay(rank, 4 * mine, peer, 4 * theirs, peer)
    local = torch.empty(3)
    mesh.wait(mesh.exchange(torch.ones(3), rank, local, rank))  # to itself: no wire
    out["sums"] = mesh.sum_scalars([1.0, float(rank), 2.5], "test sum", 1)
    if links:
        expected += links.collective_delay(3 * 8, world)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 300, 40)]
    for j, p in enumerate(params):
        p.grad = torch.full_like(p, float(rank + j))
    reduction = mesh.gradient_reduction(params, None, 1, 1)
    if links:
        expected += sum(links.collective_delay(b.numel * b.dtype.itemsize, world) for b in reduction.buckets)
    out["extras"] = reduction.finish([3.0])
    out["grads"] = [p.grad.clone() for p in params]
    owners = [0, 1, 0]
    reduction = mesh.gradient_reduction(params, owners, 0, 1)
    if links:
        expected += sum(
            links.collective_delay(b.numel * b.dtype.itemsize, world, "reduce_scatter") for b in reduction.buckets
        )
    reduction.finish([])
    out["kept"] = [None if p.grad is None else p.grad.clone() for p in params]
    weights = [torch.full((n,), float(10 * rank + j)) for j, n in enumerate((7, 300, 40))]
    from hf_hdp.distributed.buckets import plan_buckets

    buckets = plan_buckets([(w.numel(), w.dtype) for w in weights], mesh.bucket_bytes, owners, world)
    mesh.gather_parameters(weights, owners, 1, buckets)
    if links:
        expected += sum(links.collective_delay(b.numel * b.dtype.itemsize, world, "all_gather") for b in buckets)
    out["weights"] = weights
    data = bytes(range(rank, rank + 50))
    out["gathered"] = mesh.gather_bytes(data, rank == 0, "test state", 1)
    if links:
        expected += links.collective_delay(2 * world * 8, world)  # sizes and receivers
        # rank 1 sends its 50 bytes to rank 0 (the only receiver) in pieces of bucket_bytes: both wait for them
        expected += sum(links.p2p_delay(min(mesh.bucket_bytes, 50 - a), 1, 0) for a in range(0, 50, mesh.bucket_bytes))
    return out, expected


def _emulated_worker(rank, world, links):
    from dataclasses import asdict

    from hf_hdp.distributed.mesh import DynamicMesh

    plain = DynamicMesh(bucket_bytes=1024)
    emulated = DynamicMesh(bucket_bytes=1024, links=links)
    got_plain, _ = _run_ops(plain, rank, world)
    got_emulated, expected = _run_ops(emulated, rank, world)
    return {
        "plain": got_plain,
        "emulated": got_emulated,
        "expected": expected,
        "plain_links": plain.links,
        "plain_stats": asdict(plain.stats),
        "stats": asdict(emulated.stats),
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_emulated_mesh_moves_the_same_bytes_and_counts_the_formulas_seconds():
    # two "nodes" of one rank each: every message takes the inter-node link; tiny delays keep the test fast
    links = LinkEmulator(
        intra_bandwidth=2e9, intra_latency=1e-4, inter_bandwidth=1e9, inter_latency=2e-4, ranks_per_node=1
    )
    results = run_distributed(_emulated_worker, 2, links, timeout=120)
    for rank, r in enumerate(results):
        assert _same(r["plain"], r["emulated"]), f"rank {rank}: the emulated mesh moved different data"
        peer = 1 - rank
        assert torch.equal(r["emulated"]["exchange0"][:3], torch.tensor([0.0, 1.0, 2.0]) + 1000.0 * peer)
        assert r["emulated"]["sums"] == [2.0, 1.0, 5.0]
        assert r["emulated"]["gathered"] == ([bytes(range(0, 50)), bytes(range(1, 51))] if rank == 0 else None)
        assert r["plain_links"] is None
        plain, stats = r["plain_stats"], r["stats"]
        assert plain["emulated_wire_s"] == plain["emulated_wait_s"] == plain["emulated_exposed_s"] == 0.0
        for key in ("bytes_sent", "messages_sent", "collectives", "largest_buffer_bytes"):
            assert stats[key] == plain[key], key
        assert r["expected"] > 0
        assert stats["emulated_wire_s"] == pytest.approx(r["expected"], rel=1e-9)
        # structural, not timing: what was slept or exposed is part of the wire time
        assert 0.0 <= stats["emulated_wait_s"] <= stats["emulated_wire_s"] + 1e-9
        assert 0.0 <= stats["emulated_exposed_s"] <= stats["emulated_wire_s"] + 1e-9
