"""Head-parallel (Ulysses) attention pieces (:mod:`hf_hdp.attention.ulysses`) against one process's
causal attention of the whole sequence: output and dQ/dK/dV of every member's rows (float64, the
reference backend), degrees 2 and 4, MHA, GQA with K/V heads replicated, and a K/V grouping that does
not align with the split; the P2P bytes each member sends equal the all-to-alls' sizes."""

from __future__ import annotations

import pytest
import torch

from hf_hdp.attention.ulysses import head_split
from tests.dist_utils import run_distributed

CASES = [  # (group, Hq, Hkv, shards)
    ((0, 1, 2, 3), 8, 8, (10, 9, 9, 9)),
    ((0, 1, 2, 3), 8, 2, (1, 12, 7, 17)),  # fewer K/V heads than the degree: replicated
    ((0, 1, 2, 3), 8, 1, (9, 9, 9, 10)),
    ((0, 1, 2, 3), 12, 6, (5, 6, 7, 8)),  # 3 query heads per member over pairs: one K/V head per query head
    ((3, 1), 4, 2, (13, 8)),  # degree 2 on ranks 3 and 1, in that order
]
D = 8


def test_head_split_gives_each_member_its_heads_and_the_kv_heads_they_use():
    mha = head_split(8, 8, 4)
    assert [(s.q_start, s.q_stop, s.kv_heads) for s in mha] == [(0, 2, (0, 1)), (2, 4, (2, 3)), (4, 6, (4, 5)),
                                                                 (6, 8, (6, 7))]
    assert [s.kv_heads for s in head_split(8, 2, 4)] == [(0,), (0,), (1,), (1,)]  # replicated
    assert [s.kv_heads for s in head_split(12, 6, 4)] == [(0, 0, 1), (1, 2, 2), (3, 3, 4), (4, 5, 5)]
    with pytest.raises(ValueError, match="must divide the 8 query heads"):
        head_split(8, 2, 3)


def _worker(rank, world):
    from hf_hdp.attention.backends import get_backend
    from hf_hdp.attention.ulysses import ulysses_attention
    from hf_hdp.mesh import DynamicMesh

    backend = get_backend("reference", torch.device("cpu"), torch.float64)
    mesh = DynamicMesh()
    out = []
    for c, (group, hq, hkv, shards) in enumerate(CASES):
        g = torch.Generator().manual_seed(c)
        s = sum(shards)
        q, k, v = (torch.randn(s, h, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
        w = torch.randn(s, hq, D, generator=g, dtype=torch.float64)
        # one process's attention of the whole sequence
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        cu = torch.tensor([0, s], dtype=torch.int32)
        (backend.varlen(qr, kr, vr, cu, cu, s, s, True, D**-0.5) * w).sum().backward()
        ref_out = backend.varlen(q, k, v, cu, cu, s, s, True, D**-0.5)
        if rank not in group:
            out.append(None)
            continue
        member = group.index(rank)
        a = sum(shards[:member])
        rows = slice(a, a + shards[member])
        ql, kl, vl = (t[rows].clone().requires_grad_() for t in (q, k, v))
        before = mesh.stats.bytes_sent
        o = ulysses_attention(ql, kl, vl, group, member, shards, D**-0.5, backend, mesh)
        (o * w[rows]).sum().backward()
        sent = mesh.stats.bytes_sent - before
        diffs = [float((x - y).abs().max()) for x, y in
                 ((o, ref_out[rows]), (ql.grad, qr.grad[rows]), (kl.grad, kr.grad[rows]), (vl.grad, vr.grad[rows]))]
        out.append((diffs, sent))
    return out


def _expected_bytes(group, hq, hkv, shards, member):
    """What member ``member`` sends: to each other member, its rows of their Q heads, K/V heads and dO
    heads, and their rows of its own heads' output, dQ and dK/dV."""
    splits = head_split(hq, hkv, len(group))
    n, mine = shards[member], splits[member]
    total = 0
    for j, sp in enumerate(splits):
        if j == member:
            continue
        total += n * sp.num_q * D * 2  # Q forward, dO backward
        total += n * 2 * len(sp.kv_heads) * D  # K and V
        total += shards[j] * mine.num_q * D * 2  # output forward, dQ backward
        total += shards[j] * 2 * len(mine.kv_heads) * D  # dK and dV
    return total * 8  # float64


def test_ulysses_pieces_equal_one_process_and_send_what_the_all_to_alls_hold():
    results = run_distributed(_worker, 4, timeout=240)
    for c, (group, hq, hkv, shards) in enumerate(CASES):
        for rank in range(4):
            got = results[rank][c]
            if rank not in group:
                assert got is None
                continue
            diffs, sent = got
            assert max(diffs) <= 1e-12, (c, rank, diffs)
            assert sent == _expected_bytes(group, hq, hkv, shards, group.index(rank)), (c, rank)
