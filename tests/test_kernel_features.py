"""The layer features of the attention contract (``window``, ``positions``, ``softcap``) on the CPU.

Ground truth is a dense float64 attention written here from the contract's definitions (explicit
scores per sequence, soft-capped, masked by positions/causal/window, K/V heads repeated for GQA),
differentiated by torch.autograd. The ``reference`` (float64) and ``cpu_flash`` (float32) backends
are checked against it: ``forward`` (out, lse), ``backward`` from that out/lse, ``varlen`` gradients,
a ring-style backward from an out/lse merged over two key blocks, and a long windowed sequence. The
CUDA backends' window arithmetic (:func:`hf_hdp.attention.backends._fused.flash_window`) is checked
against a model of FlashAttention-2's masking rules, and their grouping (gather, one call per window,
scatter) through a CPU stand-in for the kernels.
"""

from __future__ import annotations

import random

import pytest
import torch

import hf_hdp.attention.backends._fused as fused_module
import hf_hdp.attention.backends.cpu_flash as cpu_flash_module
from hf_hdp.attention.backends import CpuFlashBackend, ReferenceBackend
from hf_hdp.attention.backends._fused import FULL_WINDOW, FusedBackend, call_max_k, flash_window, window_groups
from hf_hdp.attention.backends.base import check_shapes
from hf_hdp.attention.merge import merge_attention

REF = ReferenceBackend()
CPU_FLASH = CpuFlashBackend()
SCALE = 0.35

#: (backend, input dtype, tolerance relative to the largest reference value, at least 1)
KERNELS = [
    pytest.param(REF, torch.float64, 1e-10, id="reference-f64"),
    pytest.param(CPU_FLASH, torch.float32, 1e-5, id="cpu_flash-f32"),
]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Small cpu_flash tiles, so that short test sequences run over several tiles and all part kinds."""
    monkeypatch.setattr(cpu_flash_module, "TILE_ROWS", 8)
    monkeypatch.setattr(cpu_flash_module, "MIN_TILE_ROWS", 4)


# ------------------------------------------------------------------------------------------
# independent ground truth
# ------------------------------------------------------------------------------------------


def cu(lengths) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def dense(q, k, v, q_lens, k_lens, causal, scale, window=None, softcap=None, positions=None):
    """Float64 attention of the pack, per sequence with explicit scores; (out, lse), differentiable."""
    hq, hkv = q.shape[1], k.shape[1]
    outs, lses = [], []
    bq, bk = cu(q_lens).tolist(), cu(k_lens).tolist()
    for i in range(len(q_lens)):
        nq, nk = q_lens[i], k_lens[i]
        q0, k0 = positions[i] if positions is not None else (0, 0)
        qq = q[bq[i] : bq[i + 1]].double().transpose(0, 1)  # [Hq, nq, D]
        kk = k[bk[i] : bk[i + 1]].double().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        vv = v[bk[i] : bk[i + 1]].double().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        s = qq @ kk.transpose(-1, -2) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        ok = contract_visible(q0, k0, nq, nk, causal, window)
        s = s.masked_fill(~ok, float("-inf"))
        has = ok.any(dim=-1)  # [nq]
        lse = torch.logsumexp(s, dim=-1)  # -inf where no key
        p = torch.softmax(s.masked_fill(~has[None, :, None], 0.0), dim=-1) * has[None, :, None]
        outs.append((p @ vv).transpose(0, 1))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def make_inputs(q_lens, k_lens, hq=4, hkv=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n, h: torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype)
    return make(sum(q_lens), hq), make(sum(k_lens), hkv), make(sum(k_lens), hkv), make(sum(q_lens), hq)


def random_pack(seed, offsets):
    """Sequence lengths and positions of a random pack: with ``offsets``, unequal lengths (some 0) and
    random starts, so that rows without a visible key occur; else equal lengths from position 0."""
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    q_lens = [rng.choice([0, 1, rng.randint(2, 30)]) if j == 1 else rng.randint(1, 30) for j in range(n)]
    if not offsets:
        return q_lens, list(q_lens), None
    k_lens = [rng.choice([0, rng.randint(1, 30)]) if j == 2 else rng.randint(1, 30) for j in range(n)]
    positions = [(rng.randint(0, 30), rng.randint(0, 30)) for _ in range(n)]
    positions[0] = (positions[0][1] + k_lens[0] + 5, positions[0][1])  # keys all before the rows
    return q_lens, k_lens, positions


def assert_close(actual, expected, tol, what):
    expected = expected.double()
    bound = tol * max(1.0, expected.abs().max().item()) if expected.numel() else tol
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def assert_lse(actual, expected, tol):
    none = expected == float("-inf")
    assert torch.equal(actual == float("-inf"), none), "lse must be -inf exactly where a row sees no key"
    assert not torch.isnan(actual).any()
    assert_close(actual[~none], expected[~none], tol, "lse")


FEATURES = [
    pytest.param(
        causal,
        window,
        softcap,
        offsets,
        id=f"{'causal' if causal else 'full'}-w{window}-cap{softcap}-{'pos' if offsets else 'nopos'}",
    )
    for causal, window in [(True, 1), (True, 3), (True, 8), (True, None), (False, None)]
    for softcap in (None, 2.0)
    for offsets in (False, True)
]


# ------------------------------------------------------------------------------------------
# forward, backward, varlen against dense
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window,softcap,offsets", FEATURES)
@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
def test_forward_and_backward_match_dense(backend, dtype, tol, causal, window, softcap, offsets):
    q_lens, k_lens, positions = random_pack(
        13 * causal + 7 * (window or 0) + 3 * (softcap is not None) + offsets, offsets
    )
    q, k, v, dout = make_inputs(q_lens, k_lens, dtype=dtype, seed=len(q_lens))
    feats = dict(window=window, softcap=softcap, positions=positions)
    args = (cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), causal, SCALE)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = dense(qd, kd, vd, q_lens, k_lens, causal, SCALE, **feats)
    torch.autograd.backward(out_ref, dout.double())

    out, lse = backend.forward(q, k, v, *args, **feats)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    assert_close(out, out_ref, tol, "out")
    assert_lse(lse, lse_ref, tol)

    grads = backend.backward(dout, q, k, v, out, lse, *args, **feats)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
        assert g.dtype == dtype and not torch.isnan(g).any()
        assert_close(g, ref, tol, name)


@pytest.mark.parametrize("window,softcap", [(3, None), (8, 2.0), (None, 2.0)])
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
def test_varlen_autograd_matches_dense(backend, dtype, tol, window, softcap, offsets):
    q_lens, k_lens, positions = random_pack(7 + (window or 0), offsets)
    q, k, v, dout = make_inputs(q_lens, k_lens, dtype=dtype, seed=3)
    feats = dict(window=window, softcap=softcap, positions=positions)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, _ = dense(qd, kd, vd, q_lens, k_lens, True, SCALE, **feats)
    torch.autograd.backward(out_ref, dout.double())

    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = backend.varlen(qb, kb, vb, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), True, SCALE, **feats)
    assert_close(out, out_ref, tol, "out")
    torch.autograd.backward(out, dout)
    for name, t, ref in zip(("dq", "dk", "dv"), (qb, kb, vb), (qd, kd, vd)):
        assert_close(t.grad, ref.grad, tol, name)


@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 2.0), (6, 2.0)])
@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
def test_backward_from_out_lse_merged_over_two_key_blocks(backend, dtype, tol, window, softcap):
    """Ring attention's use of the contract: the keys of each sequence arrive in two blocks (with their
    positions); out/lse are merged over them, and the two blocks' backward shares sum to the gradient."""
    q_lens, k_lens = [13, 9, 1], [20, 11, 4]
    positions = [(12, 0), (4, 2), (30, 27)]
    split = [7, 5, 0]  # block A: the first `split` keys of each sequence (one empty), block B the rest
    q, k, v, dout = make_inputs(q_lens, k_lens, dtype=dtype, seed=11)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = dense(
        qd, kd, vd, q_lens, k_lens, True, SCALE, window=window, softcap=softcap, positions=positions
    )
    torch.autograd.backward(out_ref, dout.double())

    bk = cu(k_lens).tolist()
    idx_a = [r for i, s in enumerate(split) for r in range(bk[i], bk[i] + s)]
    idx_b = [r for i, s in enumerate(split) for r in range(bk[i] + s, bk[i + 1])]
    lens_a = split
    lens_b = [n - s for n, s in zip(k_lens, split)]
    pos_a = positions
    pos_b = [(q0, k0 + s) for (q0, k0), s in zip(positions, split)]
    blocks = [(idx_a, lens_a, pos_a), (idx_b, lens_b, pos_b)]

    out = lse = None
    for idx, lens, pos in blocks:
        o, l = backend.forward(
            q,
            k[idx],
            v[idx],
            cu(q_lens),
            cu(lens),
            max(q_lens),
            max(lens),
            True,
            SCALE,
            window=window,
            softcap=softcap,
            positions=pos,
        )
        out, lse = merge_attention(out, lse, o, l)
    assert_close(out, out_ref, tol, "merged out")
    assert_lse(lse, lse_ref, tol)

    dq = torch.zeros(q.shape, dtype=torch.float64)
    dk = torch.zeros(k.shape, dtype=torch.float64)
    dv = torch.zeros(v.shape, dtype=torch.float64)
    for idx, lens, pos in blocks:
        gq, gk, gv = backend.backward(
            dout,
            q,
            k[idx],
            v[idx],
            out,
            lse,
            cu(q_lens),
            cu(lens),
            max(q_lens),
            max(lens),
            True,
            SCALE,
            window=window,
            softcap=softcap,
            positions=pos,
        )
        dq += gq.double()
        dk[idx] += gk.double()
        dv[idx] += gv.double()
    for name, g, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), (qd.grad, kd.grad, vd.grad)):
        assert_close(g, ref, tol, name)


def test_long_windowed_local_sequence_on_cpu_flash(monkeypatch):
    """2,000 rows under a 64-token window with the default tiles: cpu_flash runs it over blocks (about
    s * (tile + w) scores) and agrees with the reference."""
    monkeypatch.setattr(cpu_flash_module, "TILE_ROWS", 256)
    monkeypatch.setattr(cpu_flash_module, "MIN_TILE_ROWS", 64)
    n = 2000
    q, k, v, dout = make_inputs([n], [n], hq=4, hkv=2, d=16, dtype=torch.float32, seed=5)
    args = (cu([n]), cu([n]), n, n, True, 0.25)
    out_r, lse_r = REF.forward(q, k, v, *args, window=64)
    out, lse = CPU_FLASH.forward(q, k, v, *args, window=64)
    assert_close(out, out_r, 1e-5, "out")
    assert_lse(lse, lse_r, 1e-5)
    g_r = REF.backward(dout, q, k, v, out_r, lse_r, *args, window=64)
    g = CPU_FLASH.backward(dout, q, k, v, out, lse, *args, window=64)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        assert_close(a, b, 1e-5, name)


def test_cpu_flash_aligned_causal_keeps_the_plain_kernel_call(monkeypatch):
    """Local sequences without features (and blocks whose rows all see all keys) never run over blocks."""

    def refuse(*a, **kw):
        raise AssertionError("ran over blocks")

    monkeypatch.setattr(cpu_flash_module, "_block_parts", refuse)
    q, k, v, dout = make_inputs([5, 40], [5, 40], dtype=torch.float32)
    args = (cu([5, 40]), cu([5, 40]), 40, 40, True, SCALE)
    out, lse = CPU_FLASH.forward(q, k, v, *args)
    CPU_FLASH.backward(dout, q, k, v, out, lse, *args)
    CPU_FLASH.forward(q, k, v, *args, positions=[(3, 3), (50, 10)])  # aligned; keys all before the rows
    CPU_FLASH.forward(q, k, v, *args, window=100, positions=[(7, 3), (50, 10)])  # within the window


# ------------------------------------------------------------------------------------------
# the CUDA backends' window arithmetic and grouping, on the CPU
# ------------------------------------------------------------------------------------------


def fa2_visible(nq, nk, max_k, causal, left, right):
    """Bool [nq, nk]: FlashAttention-2's varlen mask for window_size=(left, right) (-1 unbounded), with the
    kernels' rewriting of the arguments (bounds of at least max_seqlen_k read as unbounded; causal forces
    right = 0; one unbounded side of a local window becomes max_seqlen_k)."""
    if left >= max_k:
        left = -1
    if right >= max_k:
        right = -1
    if causal:
        right = 0
    if left < 0 and right < 0:
        return torch.ones(nq, nk, dtype=torch.bool)
    if left < 0:
        left = max_k
    if right < 0:
        right = max_k
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    return (j >= i + nk - nq - left) & (j <= i + nk - nq + right)


def contract_visible(q0, k0, nq, nk, causal, window):
    pq = torch.arange(q0, q0 + nq)[:, None]
    pk = torch.arange(k0, k0 + nk)[None, :]
    ok = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        ok &= pk <= pq
    if window is not None:
        ok &= pq - pk < window
    return ok


def test_flash_window_is_exact_wherever_defined():
    rng = random.Random(0)
    defined = 0
    for _ in range(3000):
        nq, nk = rng.randint(1, 12), rng.randint(1, 12)
        q0, k0 = rng.randint(0, 20), rng.randint(0, 20)
        causal = rng.random() < 0.9
        window = rng.choice([None, 1, 2, 3, 5, 8, 30]) if causal else None
        truth = contract_visible(q0, k0, nq, nk, causal, window)
        ws = flash_window(q0, k0, nq, nk, causal, window)
        if ws is None:
            # only blocks with keys after the last row, or rows at the end that see no key
            keys_after = (k0 + nk - 1) > (q0 + nq - 1)
            blind_last_row = not bool(truth[-1].any())
            assert causal and (keys_after or blind_last_row), (q0, k0, nq, nk, window)
            continue
        defined += 1
        for extra in (0, 1, 17):  # the call's max_seqlen_k: at least call_max_k, more in a group
            max_k = call_max_k(nk, ws) + extra
            got = fa2_visible(nq, nk, max_k, ws[1] == 0, *ws)
            assert torch.equal(got, truth), (q0, k0, nq, nk, causal, window, ws, max_k)
    assert defined > 500


def test_flash_window_values():
    assert flash_window(0, 0, 5, 5, True, None) == (-1, 0)  # aligned causal
    assert flash_window(0, 0, 5, 5, True, 3) == (2, 0)  # aligned causal, window 3
    assert flash_window(3, 9, 5, 5, False, None) == FULL_WINDOW  # positions do not matter without causal
    assert flash_window(10, 0, 4, 5, True, None) == FULL_WINDOW  # keys all before the rows
    assert flash_window(8, 5, 3, 3, True, 4) == (0, 3)  # ring pair: the window's tail of the previous chunk
    assert flash_window(0, 0, 5, 7, True, None) is None  # keys after the last row
    assert flash_window(20, 0, 5, 5, True, 4) is None  # rows that see no key at the end
    assert flash_window(0, 0, 5, 5, True, 100) == (-1, 0)  # a window wider than the sequence


def test_window_groups():
    lengths = [(4, 4), (0, 3), (3, 3), (2, 0), (4, 4)]
    assert window_groups(lengths, None, True, 3) == {(2, 0): [0, 1, 2, 3, 4]}
    positions = [(0, 0), (0, 0), (10, 0), (0, 0), (6, 4)]
    assert window_groups(lengths, positions, True, None) == {(-1, 0): [0, 1, 3], (-1, -1): [2], (-1, 2): [4]}
    assert window_groups(lengths, positions, False, None) == {FULL_WINDOW: [0, 1, 2, 3, 4]}
    assert window_groups([(2, 5)], [(0, 0)], True, None) is None
    assert window_groups([(0, 5), (3, 0)], [(0, 0), (0, 0)], True, 4) == {FULL_WINDOW: [0, 1]}


class EmulatedFlash(FusedBackend):
    """FlashAttention-2's varlen contract emulated on the CPU (float64 explicit scores, its masking
    rules, lse [Hq, Tq] with +inf for rows without keys), to run FusedBackend's routing and grouping."""

    name = "emulated"
    softcap_support = True
    calls: list

    def __init__(self):
        super().__init__()
        self.calls = []

    @classmethod
    def library_problem(cls):
        return None

    def _has_softcap(self):
        return self.softcap_support

    def _pieces(self, q, k, cu_q, cu_k, max_k, window_size):
        bq, bk = cu_q.tolist(), cu_k.tolist()
        left, right = window_size
        for i in range(len(bq) - 1):
            nq, nk = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
            ok = fa2_visible(nq, nk, max_k, right == 0, left, right)
            yield slice(bq[i], bq[i + 1]), slice(bk[i], bk[i + 1]), ok

    def _scores(self, q, k, ok, scale, softcap, g):
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(g, dim=1)) * scale
        t = None
        if softcap:
            t = torch.tanh(s / softcap)
            s = t * softcap
        return s.masked_fill(~ok, float("-inf")), t

    def _kernel_varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        raise AssertionError("not used by these tests")

    def _kernel_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        self.calls.append((window_size, q.shape[0], k.shape[0], max_k))
        g = q.shape[1] // k.shape[1]
        out = torch.zeros(q.shape, dtype=q.dtype)
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32)
        for rq, rk, ok in self._pieces(q, k, cu_q, cu_k, max_k, window_size):
            if ok.numel() == 0:
                continue
            s, _ = self._scores(q[rq], k[rk], ok, scale, softcap, g)
            l = torch.logsumexp(s, dim=-1)  # [H, nq]
            p = torch.exp(s - l.masked_fill(l == float("-inf"), 0.0)[..., None])
            out[rq] = torch.einsum("hqk,khd->qhd", p, v[rk].double().repeat_interleave(g, dim=1)).to(q.dtype)
            lse[:, rq] = l.float().masked_fill(l == float("-inf"), float("inf"))
        return out, lse

    def _kernel_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
        hkv, g = k.shape[1], q.shape[1] // k.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for rq, rk, ok in self._pieces(q, k, cu_q, cu_k, max_k, window_size):
            if ok.numel() == 0:
                continue
            s, t = self._scores(q[rq], k[rk], ok, scale, softcap, g)
            p = torch.exp(s - lse[:, rq].double()[..., None])  # +inf rows: 0
            do = dout[rq].double()
            vr = v[rk].double().repeat_interleave(g, dim=1)
            kr = k[rk].double().repeat_interleave(g, dim=1)
            d_row = (do * out[rq].double()).sum(-1).t()[..., None]  # [H, nq, 1]
            ds = p * (torch.einsum("qhd,khd->hqk", do, vr) - d_row)
            if t is not None:
                ds = ds * (1 - t * t)
            dq[rq] = (torch.einsum("hqk,khd->qhd", ds, kr) * scale).to(q.dtype)
            gk = torch.einsum("hqk,qhd->khd", ds, q[rq].double()) * scale
            gv = torch.einsum("hqk,qhd->khd", p, do)
            dk[rk] = gk.view(-1, hkv, g, k.shape[2]).sum(2).to(k.dtype)
            dv[rk] = gv.view(-1, hkv, g, v.shape[2]).sum(2).to(v.dtype)
        return dq, dk, dv


@pytest.fixture
def emulated(monkeypatch):
    """FusedBackend's input check without its CUDA/dtype requirements, so the emulation runs float64 on the CPU."""
    monkeypatch.setattr(
        fused_module,
        "check_fused_inputs",
        lambda name, q, k, v, cu_q, cu_k, causal, positions=None: check_shapes(q, k, v, cu_q, cu_k),
    )
    return EmulatedFlash()


def trimmed(q0, nq, k0, nk, window):
    """Rows that see a key and keys some row sees, as reach.visible_pairs trims a pair (causal)."""
    ok = contract_visible(q0, k0, nq, nk, True, window)
    rows, keys = ok.any(1).nonzero().flatten(), ok.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(keys[0]), int(keys[-1]) + 1
    return q0 + r0, r1 - r0, k0 + c0, c1 - c0


@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (8, 2.0), (1, None)])
def test_fused_grouping_matches_reference(emulated, window, softcap):
    """Ring-style blocks (keys on or before the rows, trimmed as reach.visible_pairs does) of several
    windows in one call: one kernel call per (left, right), gathered and scattered back."""
    spans = [(0, 6, 0, 6), (8, 5, 5, 3), (20, 4, 14, 4), (40, 3, 30, 8), (50, 4, 44, 6), (9, 7, 9, 7)]
    pack = [t for t in (trimmed(*sp, window) for sp in spans) if t is not None]
    q_lens, k_lens = [p[1] for p in pack] + [0], [p[3] for p in pack] + [2]  # and a sequence without rows
    positions = [(p[0], p[2]) for p in pack] + [(0, 0)]
    q, k, v, dout = make_inputs(q_lens, k_lens, seed=2)
    args = (cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), True, SCALE)
    feats = dict(window=window, softcap=softcap, positions=positions)
    groups = window_groups(list(zip(q_lens, k_lens)), positions, True, window)
    assert groups is not None and (len(groups) > 1 or window == 1)  # window 1: every pair is (0, 0)
    out_r, lse_r = REF.forward(q, k, v, *args, **feats)
    out, lse = emulated.forward(q, k, v, *args, **feats)
    assert [c[0] for c in emulated.calls] == list(groups)
    assert_close(out, out_r, 1e-6, "out")
    assert_lse(lse, lse_r, 1e-6)
    g_r = REF.backward(dout, q, k, v, out_r, lse_r, *args, **feats)
    g = emulated.backward(dout, q, k, v, out, lse, *args, **feats)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        assert_close(a, b, 1e-6, name)


def test_fused_unexpressible_or_uncapped_calls_go_to_the_reference(emulated):
    q_lens, k_lens = [4], [7]
    q, k, v, _ = make_inputs(q_lens, k_lens, seed=4)
    args = (cu(q_lens), cu(k_lens), 4, 7, True, SCALE)
    out_r, _ = REF.forward(q, k, v, *args, positions=[(0, 0)])
    out, _ = emulated.forward(q, k, v, *args, positions=[(0, 0)])  # keys after the last row
    assert emulated.calls == []
    assert_close(out, out_r, 1e-12, "out")

    emulated.softcap_support = False
    q, k, v, _ = make_inputs([5], [5], seed=4)
    out_r, _ = REF.forward(q, k, v, cu([5]), cu([5]), 5, 5, True, SCALE, softcap=2.0)
    out, _ = emulated.forward(q, k, v, cu([5]), cu([5]), 5, 5, True, SCALE, softcap=2.0)
    assert emulated.calls == []
    assert_close(out, out_r, 1e-12, "out")


def test_fused_local_window_is_one_call_without_gather(emulated):
    q_lens = [5, 9, 3]
    q, k, v, _ = make_inputs(q_lens, q_lens, seed=6)
    out_r, _ = REF.forward(q, k, v, cu(q_lens), cu(q_lens), 9, 9, True, SCALE, window=4)
    out, _ = emulated.forward(q, k, v, cu(q_lens), cu(q_lens), 9, 9, True, SCALE, window=4)
    assert emulated.calls == [((3, 0), 17, 17, 9)]
    assert_close(out, out_r, 1e-12, "out")
