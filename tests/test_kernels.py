"""Tests of hf_hdp.attention.backends on the CPU: the contract of the reference and cpu_flash
backends, merging, backend selection.

Ground truth is a dense masked softmax over the whole packed batch, written here independently in
float64 (block-diagonal sequence mask, causal mask inside each block, K/V heads repeated for GQA),
differentiated by torch.autograd.
"""

from __future__ import annotations

import sys

import pytest
import torch

import hf_hdp.attention.backends.flash_attn as flash_attn_module
import hf_hdp.attention.backends.reference as reference_module
from hf_hdp.attention.backends import (
    BACKEND_NAMES,
    CpuFlashBackend,
    ReferenceBackend,
    TorchVarlenBackend,
    backend_unavailable_reason,
    get_backend,
)
from hf_hdp.attention.backends._fused import check_fused_inputs
from hf_hdp.attention.merge import accumulator_dtype, merge_attention

REF = ReferenceBackend()
CPU_FLASH = CpuFlashBackend()

#: (backend, input dtype, tolerance): every kernel-contract test runs for each, against float64 dense
KERNELS = [
    pytest.param(REF, torch.float64, 1e-10, id="reference-f64"),
    pytest.param(REF, torch.float32, 1e-5, id="reference-f32"),
    pytest.param(CPU_FLASH, torch.float32, 1e-5, id="cpu_flash-f32"),
]
BACKENDS = [pytest.param(REF, id="reference"), pytest.param(CPU_FLASH, id="cpu_flash")]


# ------------------------------------------------------------------------------------------
# independent ground truth
# ------------------------------------------------------------------------------------------


def cu(lengths: list[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def dense_attention(q, k, v, q_lens, k_lens, causal, scale):
    """Dense float64 attention of the packed batch; returns (out, lse), differentiable."""
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    seq_q = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens, dtype=torch.long), output_size=tq)
    seq_k = torch.repeat_interleave(torch.arange(len(k_lens)), torch.tensor(k_lens, dtype=torch.long), output_size=tk)
    pos_q = torch.arange(tq) - cu(q_lens).long()[seq_q]
    pos_k = torch.arange(tk) - cu(k_lens).long()[seq_k]
    allowed = seq_q[:, None] == seq_k[None, :]
    if causal:
        allowed &= pos_k[None, :] <= pos_q[:, None]
    kr = k.double().repeat_interleave(hq // hkv, dim=1)  # [Tk, Hq, D]
    vr = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kr) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1).transpose(0, 1)  # [Tq, Hq]; -inf where no keys
    has_keys = allowed.any(dim=-1)  # [Tq]
    p = torch.softmax(s.masked_fill(~has_keys[None, :, None], 0.0), dim=-1) * has_keys[None, :, None]
    out = torch.einsum("hqk,khd->qhd", p, vr)
    return out, lse


def make_inputs(q_lens, k_lens, hq, hkv, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(k_lens), hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(k_lens), hkv, d, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(sum(q_lens), hq, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def dense_grads(q, k, v, dout, q_lens, k_lens, causal, scale):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, _ = dense_attention(q64, k64, v64, q_lens, k_lens, causal, scale)
    (out * dout.double()).sum().backward()
    return q64.grad, k64.grad, v64.grad


HEADS = [(2, 2), (4, 2), (4, 1)]
CAUSAL_LENS = [[5, 0, 7, 1, 3], [1], [9, 4]]
CROSS_LENS = [([3, 0, 6, 2], [4, 5, 0, 7]), ([1, 4], [6, 1]), ([0, 0], [2, 3])]


def cases():
    for hq, hkv in HEADS:
        for lens in CAUSAL_LENS:
            yield pytest.param(lens, lens, True, hq, hkv, id=f"causal-{lens}-h{hq}kv{hkv}")
            yield pytest.param(lens, lens, False, hq, hkv, id=f"full-{lens}-h{hq}kv{hkv}")
        for q_lens, k_lens in CROSS_LENS:
            yield pytest.param(q_lens, k_lens, False, hq, hkv, id=f"cross-{q_lens}-{k_lens}-h{hq}kv{hkv}")


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() or torch.isneginf(expected).any(), f"{what}: non-finite values"
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
@pytest.mark.parametrize("q_lens,k_lens,causal,hq,hkv", list(cases()))
def test_forward_matches_dense(q_lens, k_lens, causal, hq, hkv, backend, dtype, tol):
    q, k, v, _ = make_inputs(q_lens, k_lens, hq, hkv, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = backend.forward(q, k, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), causal, scale)
    want_out, want_lse = dense_attention(q, k, v, q_lens, k_lens, causal, scale)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (sum(q_lens), hq)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close(out, want_out, tol, "out")
    # rows without keys: lse -inf exactly, out exactly 0
    no_keys = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), no_keys)
    assert (out[no_keys.any(dim=1)] == 0).all()
    assert_close(lse[~no_keys], want_lse[~no_keys], tol, "lse")


def test_reference_small_row_blocks(monkeypatch):
    """Row-blocking (used for long sequences) gives the same result as one block."""
    q_lens = [13, 6]
    q, k, v, dout = make_inputs(q_lens, q_lens, 4, 2)
    scale = 0.3
    want_out, want_lse = dense_attention(q, k, v, q_lens, q_lens, True, scale)
    want = dense_grads(q, k, v, dout, q_lens, q_lens, True, scale)
    monkeypatch.setattr(reference_module, "REFERENCE_BLOCK_BYTES", 4 * 13 * 8 * 3)  # 3 rows per block
    out, lse = REF.forward(q, k, v, cu(q_lens), cu(q_lens), 13, 13, True, scale)
    assert_close(out, want_out, 1e-10, "out")
    assert_close(lse, want_lse, 1e-10, "lse")
    got = REF.backward(dout, q, k, v, out, lse, cu(q_lens), cu(q_lens), 13, 13, True, scale)
    for name, a, b in zip(["dq", "dk", "dv"], got, want):
        assert_close(a, b, 1e-10, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_requires_equal_lengths(backend):
    q, k, v, dout = make_inputs([3, 2], [2, 3], 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        backend.forward(q, k, v, cu([3, 2]), cu([2, 3]), 3, 3, True, 0.5)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        backend.backward(dout, q, k, v, q, q[:, :, 0], cu([3, 2]), cu([2, 3]), 3, 3, True, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_cu_seqlens_rejected(backend):
    q, k, v, _ = make_inputs([3, 2], [3, 2], 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_q"):
        backend.forward(q, k, v, torch.tensor([0, 3, 4], dtype=torch.int32), cu([3, 2]), 3, 3, False, 0.5)
    with pytest.raises(ValueError, match="multiple"):
        backend.forward(
            q, k[:, :1].repeat(1, 3, 1)[:, :3], v[:, :1].repeat(1, 3, 1), cu([3, 2]), cu([3, 2]), 3, 3, False, 0.5
        )


# ------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
@pytest.mark.parametrize("q_lens,k_lens,causal,hq,hkv", list(cases()))
def test_backward_matches_autograd(q_lens, k_lens, causal, hq, hkv, backend, dtype, tol):
    q, k, v, dout = make_inputs(q_lens, k_lens, hq, hkv, dtype=dtype, seed=1)
    scale = 0.7
    c_q, c_k = cu(q_lens), cu(k_lens)
    out, lse = backend.forward(q, k, v, c_q, c_k, max(q_lens), max(k_lens), causal, scale)
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, c_q, c_k, max(q_lens), max(k_lens), causal, scale)
    want = dense_grads(q, k, v, dout, q_lens, k_lens, causal, scale)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype, dtype, dtype)
    assert dk.shape == k.shape and dv.shape == v.shape  # Hkv heads, unrepeated
    for name, got, exp in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert torch.isfinite(got).all(), name
        assert_close(got, exp, tol, name)


def _ranges(lengths, cut):
    """Index tensors of the first part ([0, cut_i)) and second part of every packed sequence."""
    first, second, start = [], [], 0
    for n, c in zip(lengths, cut):
        first.extend(range(start, start + c))
        second.extend(range(start + c, start + n))
        start += n
    return torch.tensor(first, dtype=torch.long), torch.tensor(second, dtype=torch.long)


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
def test_backward_with_merged_out_lse_noncausal(hq, hkv, backend, dtype, tol):
    """Keys split in two blocks: blockwise backward with the merged out/lse (float32/float64
    accumulators, as the ring passes them) sums to the full gradient."""
    q_lens, k_lens = [4, 0, 7, 3, 2], [6, 3, 5, 0, 1]
    q, k, v, dout = make_inputs(q_lens, k_lens, hq, hkv, dtype=dtype, seed=2)
    scale = 0.4
    cut = [n // 2 for n in k_lens]
    ka, kb = _ranges(k_lens, cut)
    lens_a, lens_b = cut, [n - c for n, c in zip(k_lens, cut)]
    c_q, c_a, c_b = cu(q_lens), cu(lens_a), cu(lens_b)
    mq = max(q_lens)
    out_a, lse_a = backend.forward(q, k[ka], v[ka], c_q, c_a, mq, max(lens_a), False, scale)
    out_b, lse_b = backend.forward(q, k[kb], v[kb], c_q, c_b, mq, max(lens_b), False, scale)
    out, lse = merge_attention(None, None, out_a, lse_a)
    out, lse = merge_attention(out, lse, out_b, lse_b)

    want_out, want_lse = dense_attention(q, k, v, q_lens, k_lens, False, scale)
    assert_close(out, want_out, tol, "merged out")
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close(lse[finite], want_lse[finite], tol, "merged lse")

    dq_a, dk_a, dv_a = backend.backward(dout, q, k[ka], v[ka], out, lse, c_q, c_a, mq, max(lens_a), False, scale)
    dq_b, dk_b, dv_b = backend.backward(dout, q, k[kb], v[kb], out, lse, c_q, c_b, mq, max(lens_b), False, scale)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dk[ka], dk[kb] = dk_a, dk_b
    dv[ka], dv[kb] = dv_a, dv_b
    want = dense_grads(q, k, v, dout, q_lens, k_lens, False, scale)
    for name, got, exp in zip(("dq", "dk", "dv"), (dq_a + dq_b, dk, dv), want):
        assert torch.isfinite(got).all(), name
        assert_close(got, exp, tol, name)


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
def test_backward_with_merged_out_lse_causal_ring(hq, hkv, backend, dtype, tol):
    """Two-member causal ring: rows and keys split into halves; the second half of the rows merges
    a full block (its keys in the first half) and a causal diagonal block."""
    lens = [8, 0, 5, 1, 2, 9]
    q, k, v, dout = make_inputs(lens, lens, hq, hkv, dtype=dtype, seed=3)
    scale = 0.5
    half = [n // 2 for n in lens]
    rest = [n - h for n, h in zip(lens, half)]
    i1, i2 = _ranges(lens, half)
    c1, c2 = cu(half), cu(rest)
    m1, m2 = max(half), max(rest)
    q1, q2, k1, k2, v1, v2 = q[i1], q[i2], k[i1], k[i2], v[i1], v[i2]

    out1, lse1 = backend.forward(q1, k1, v1, c1, c1, m1, m1, True, scale)  # rows of half 1: one block
    o21, l21 = backend.forward(q2, k1, v1, c2, c1, m2, m1, False, scale)  # half 2 x keys of half 1
    o22, l22 = backend.forward(q2, k2, v2, c2, c2, m2, m2, True, scale)  # half 2 diagonal
    out2, lse2 = merge_attention(*merge_attention(None, None, o21, l21), o22, l22)

    want_out, want_lse = dense_attention(q, k, v, lens, lens, True, scale)
    assert_close(out1, want_out[i1], tol, "out half 1")
    assert_close(out2, want_out[i2], tol, "out half 2")
    assert_close(lse2, want_lse[i2], tol, "lse half 2")

    dq1, dk1_a, dv1_a = backend.backward(dout[i1], q1, k1, v1, out1, lse1, c1, c1, m1, m1, True, scale)
    dq2_a, dk1_b, dv1_b = backend.backward(dout[i2], q2, k1, v1, out2, lse2, c2, c1, m2, m1, False, scale)
    dq2_b, dk2, dv2 = backend.backward(dout[i2], q2, k2, v2, out2, lse2, c2, c2, m2, m2, True, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq[i1], dq[i2] = dq1, dq2_a + dq2_b
    dk[i1], dk[i2] = dk1_a + dk1_b, dk2
    dv[i1], dv[i2] = dv1_a + dv1_b, dv2
    want = dense_grads(q, k, v, dout, lens, lens, True, scale)
    for name, got, exp in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert_close(got, exp, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_block_without_keys_gives_no_gradient(backend):
    """A block whose sequence has no keys contributes exactly zero, even with a finite merged lse."""
    q, k, v, dout = make_inputs([3], [4], 2, 1, dtype=torch.float32)
    out, lse = backend.forward(q, k, v, cu([3]), cu([4]), 3, 4, False, 1.0)
    empty_k = k[:0]
    dq, dk, dv = backend.backward(dout, q, empty_k, empty_k, out, lse, cu([3]), cu([0]), 3, 0, False, 1.0)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == (0, 1, 8) and dv.shape == (0, 1, 8)


# ------------------------------------------------------------------------------------------
# varlen (autograd)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
@pytest.mark.parametrize("q_lens,k_lens,causal,hq,hkv", list(cases()))
def test_varlen_autograd(q_lens, k_lens, causal, hq, hkv, backend, dtype, tol):
    q, k, v, dout = make_inputs(q_lens, k_lens, hq, hkv, dtype=dtype, seed=4)
    scale = q.shape[-1] ** -0.5
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = backend.varlen(qq, kk, vv, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), causal, scale)
    assert out.dtype == dtype and out.requires_grad
    (out * dout).sum().backward()
    want_out, _ = dense_attention(q, k, v, q_lens, k_lens, causal, scale)
    assert_close(out.detach(), want_out, tol, "out")
    for name, got, exp in zip(
        ("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), dense_grads(q, k, v, dout, q_lens, k_lens, causal, scale)
    ):
        assert_close(got, exp, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_dtypes(backend, dtype):
    q, k, v, dout = make_inputs([5, 3], [5, 3], 4, 2, dtype=dtype)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = backend.varlen(qq, kk, vv, cu([5, 3]), cu([5, 3]), 5, 5, True, 0.35)
    (out.float() * dout.float()).sum().backward()
    assert out.dtype == dtype
    assert qq.grad.dtype == kk.grad.dtype == vv.grad.dtype == dtype
    _, lse = backend.forward(q, k, v, cu([5, 3]), cu([5, 3]), 5, 5, True, 0.35)
    assert lse.dtype == torch.float32
    want_out, _ = dense_attention(q, k, v, [5, 3], [5, 3], True, 0.35)
    assert_close(out.detach(), want_out, 2e-2, f"{dtype} out")
    for name, got, exp in zip(
        ("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), dense_grads(q, k, v, dout, [5, 3], [5, 3], True, 0.35)
    ):
        assert_close(got, exp, 5e-2, f"{dtype} {name}")


def test_cpu_flash_refuses_float64_and_other_devices_with_advice():
    q, k, v, dout = make_inputs([4], [4], 2, 2)  # float64
    with pytest.raises(ValueError, match="float32, bfloat16 or float16.*float64.*'reference'"):
        CPU_FLASH.forward(q, k, v, cu([4]), cu([4]), 4, 4, True, 0.5)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16.*'reference'"):
        CPU_FLASH.backward(dout, q, k, v, q, q[:, :, 0], cu([4]), cu([4]), 4, 4, True, 0.5)
    meta = torch.zeros(4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="CPU tensors only"):
        CPU_FLASH.forward(meta, meta, meta, cu([4]), cu([4]), 4, 4, True, 0.5)


# ------------------------------------------------------------------------------------------
# merge_attention
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_merge_equals_attention_over_concatenated_keys(hq, hkv):
    # sequence 1 has keys only in block b, sequence 2 in neither: both sides -inf there
    q_lens, ka_lens, kb_lens = [3, 4, 2, 5], [2, 0, 0, 6], [3, 5, 0, 1]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(q_lens), hq, 8, generator=g, dtype=torch.float64)
    ka = torch.randn(sum(ka_lens), hkv, 8, generator=g, dtype=torch.float64)
    va = torch.randn(sum(ka_lens), hkv, 8, generator=g, dtype=torch.float64)
    kb = torch.randn(sum(kb_lens), hkv, 8, generator=g, dtype=torch.float64)
    vb = torch.randn(sum(kb_lens), hkv, 8, generator=g, dtype=torch.float64)
    # the concatenation, sequence by sequence: keys of block a, then keys of block b
    parts_k, parts_v = [], []
    for i in range(len(q_lens)):
        sa, sb = slice(cu(ka_lens)[i], cu(ka_lens)[i + 1]), slice(cu(kb_lens)[i], cu(kb_lens)[i + 1])
        parts_k += [ka[sa], kb[sb]]
        parts_v += [va[sa], vb[sb]]
    k_all, v_all = torch.cat(parts_k), torch.cat(parts_v)
    k_lens = [a + b for a, b in zip(ka_lens, kb_lens)]
    scale = 0.6
    out_a, lse_a = REF.forward(q, ka, va, cu(q_lens), cu(ka_lens), 5, 6, False, scale)
    out_b, lse_b = REF.forward(q, kb, vb, cu(q_lens), cu(kb_lens), 5, 5, False, scale)
    out, lse = merge_attention(out_a.clone(), lse_a.clone(), out_b, lse_b)
    want_out, want_lse = REF.forward(q, k_all, v_all, cu(q_lens), cu(k_lens), 5, 7, False, scale)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close(out, want_out, 1e-12, "merged out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    assert_close(lse[fin], want_lse[fin], 1e-12, "merged lse")
    assert (out[7:9] == 0).all()  # sequence 2 (rows 7, 8) has no keys at all

    # order does not matter, and the in-place form gives the same result
    out2, lse2 = merge_attention(out_b.clone(), lse_b.clone(), out_a, lse_a)
    assert_close(out2, out, 1e-12, "merge order")
    acc, acc_lse = out_a.clone(), lse_a.clone()
    res = merge_attention(acc, acc_lse, out_b, lse_b, inplace=True)
    assert res[0] is acc and res[1] is acc_lse
    assert_close(acc, out, 0, "inplace out")


def test_merge_bf16_block_into_float32_accumulator():
    g = torch.Generator().manual_seed(6)
    out = torch.randn(4, 2, 8, generator=g)
    lse = torch.randn(4, 2, generator=g)
    block = torch.randn(4, 2, 8, generator=g).bfloat16()
    block_lse = torch.tensor([[float("-inf")] * 2, [0.5, -1.0], [3.0, 2.0], [float("-inf"), 1.0]])
    new_out, new_lse = merge_attention(out, lse, block, block_lse)
    assert new_out.dtype == torch.float32 and new_lse.dtype == torch.float32
    torch.testing.assert_close(new_out[0], out[0])  # a -inf block leaves the rows unchanged
    torch.testing.assert_close(new_lse, torch.logaddexp(lse, block_lse))
    w = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    torch.testing.assert_close(new_out, (1 - w) * out + w * block.float())
    start_out, start_lse = merge_attention(None, None, block, block_lse)
    assert start_out.dtype == torch.float32 and torch.equal(start_out, block.float())
    assert start_lse is not block_lse


# ------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------


def test_accumulator_dtype_rule():
    assert accumulator_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert accumulator_dtype(torch.zeros(1, dtype=dtype)) == torch.float32


def test_auto_on_cpu_picks_cpu_flash_for_float32_and_half_reference_for_float64():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert get_backend("auto", "cpu", dtype) is get_backend("cpu_flash", torch.device("cpu"))
    a = get_backend("auto", torch.device("cpu"), torch.float64)
    assert isinstance(a, ReferenceBackend) and a.name == "reference"
    assert a is get_backend("auto", "cpu", dtype=torch.float64) is get_backend("reference")
    assert get_backend("auto", "cpu").name == "cpu_flash"  # no dtype: torch's default, float32
    assert "flash_attn" not in sys.modules  # the CPU path never imports flash-attn


def test_explicit_cpu_flash_refused_for_float64_and_on_cuda():
    with pytest.raises(ValueError, match="float64.*'reference'"):
        get_backend("cpu_flash", "cpu", torch.float64)
    reason = backend_unavailable_reason("cpu_flash", torch.device("cuda"))
    assert reason is not None and "cpu_flash requested but the device is cuda" in reason
    assert "CPU tensors only" in reason and "'reference'" in reason
    with pytest.raises(ValueError, match="cpu_flash requested but the device is cuda"):
        get_backend("cpu_flash", "cuda", torch.bfloat16)


@pytest.mark.parametrize("name", ["flash_attn", "torch_varlen"])
def test_explicit_cuda_backend_on_cpu_raises(name):
    with pytest.raises(ValueError, match=f"{name} requested but the device is cpu.*CUDA.*reference"):
        get_backend(name, "cpu")


def test_flash_attn_not_installed_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flash_attn_module, "_FLASH_ATTN_PROBE", [])
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    with pytest.raises(
        ValueError, match=r"flash_attn package is not installed.*pip install 'hf-hdp\[flash-attn\]'.*auto"
    ):
        get_backend("flash_attn", "cuda")


def test_torch_varlen_missing_api_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(TorchVarlenBackend, "api_problem", staticmethod(lambda: "torch X lacks return_aux"))
    with pytest.raises(ValueError, match="torch_varlen requested but torch X lacks return_aux.*return_aux=AuxRequest"):
        get_backend("torch_varlen", "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_on_cuda_prefers_flash_then_torch_then_reference(monkeypatch, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flash_attn_module, "_FLASH_ATTN_PROBE", ["not installed"])
    monkeypatch.setattr(TorchVarlenBackend, "api_problem", staticmethod(lambda: None))
    assert get_backend("auto", "cuda", dtype).name == "torch_varlen"
    monkeypatch.setattr(flash_attn_module, "_FLASH_ATTN_PROBE", [None])
    assert get_backend("auto", "cuda", dtype).name == "flash_attn"
    monkeypatch.setattr(flash_attn_module, "_FLASH_ATTN_PROBE", ["not installed"])
    monkeypatch.setattr(TorchVarlenBackend, "api_problem", staticmethod(lambda: "old torch"))
    assert get_backend("auto", "cuda", dtype).name == "reference"  # never cpu_flash on CUDA


def test_unknown_backend_lists_valid_names():
    with pytest.raises(
        ValueError,
        match="unknown attention backend 'sdpa'.*'auto'.*'flash_attn'.*'torch_varlen'.*'cpu_flash'.*'reference'",
    ):
        get_backend("sdpa", "cpu")
    assert BACKEND_NAMES == ("flash_attn", "torch_varlen", "cpu_flash", "reference")


def test_fused_backends_refuse_cpu_and_float32_with_advice():
    q = torch.zeros(4, 2, 8)
    c = cu([4])
    with pytest.raises(ValueError, match="CUDA tensors only"):
        check_fused_inputs("torch_varlen", q, q, q, c, c, False)

    class LooksCuda(torch.Tensor):  # reaches the dtype check without a GPU
        @property
        def is_cuda(self):
            return True

    fake = q.to("meta").as_subclass(LooksCuda)
    with pytest.raises(ValueError, match="float16 or bfloat16.*bf16/fp16.*'reference'"):
        check_fused_inputs("flash_attn", fake, fake, fake, c, c, False)
    odd = torch.zeros(4, 2, 12, dtype=torch.bfloat16, device="meta").as_subclass(LooksCuda)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_fused_inputs("flash_attn", odd, odd, odd, c, c, False)


# ------------------------------------------------------------------------------------------
# multi-head latent attention: q/k heads wider than v heads (DeepSeek-V3: 192 and 128)
# ------------------------------------------------------------------------------------------

MLA_DIMS = (24, 16)  # q/k head size, v head size (nope 16 + rope 8, v 16)


def make_mla_inputs(q_lens, k_lens, hq, hkv, dims=MLA_DIMS, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dk, dv = dims
    q = torch.randn(sum(q_lens), hq, dk, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(k_lens), hkv, dk, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(k_lens), hkv, dv, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(sum(q_lens), hq, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


@pytest.mark.parametrize("dims", [(24, 16), (16, 24)], ids=["qk-wider", "v-wider"])
@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
@pytest.mark.parametrize(
    "q_lens,k_lens,causal,hq,hkv",
    [
        pytest.param([5, 0, 7, 1, 3], [5, 0, 7, 1, 3], True, 4, 2, id="causal-gqa"),
        pytest.param([9, 4], [9, 4], True, 4, 4, id="causal-mha"),
        pytest.param([3, 0, 6, 2], [4, 5, 0, 7], False, 4, 1, id="cross-mqa"),
    ],
)
def test_mla_head_sizes_forward_backward_varlen_match_dense(q_lens, k_lens, causal, hq, hkv, backend, dtype, tol, dims):
    """q/k and v of different head sizes: forward (out at v's size, lse), backward from the merged out/lse, and the
    autograd varlen, every CPU backend against the float64 dense attention."""
    q, k, v, dout = make_mla_inputs(q_lens, k_lens, hq, hkv, dims, dtype=dtype, seed=7)
    scale = dims[0] ** -0.5
    cq, ck, mq, mk = cu(q_lens), cu(k_lens), max(q_lens), max(k_lens)
    out, lse = backend.forward(q, k, v, cq, ck, mq, mk, causal, scale)
    want_out, want_lse = dense_attention(q, k, v, q_lens, k_lens, causal, scale)
    assert out.shape == (sum(q_lens), hq, dims[1]) and out.dtype == dtype
    assert_close(out, want_out, tol, "out")
    ok = ~torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), ~ok)
    assert_close(lse[ok], want_lse[ok], tol, "lse")
    want = dense_grads(q, k, v, dout, q_lens, k_lens, causal, scale)
    grads = backend.backward(dout, q, k, v, out, lse, cq, ck, mq, mk, causal, scale)
    for name, got, exp, ref in zip(("dq", "dk", "dv"), grads, want, (q, k, v)):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert_close(got, exp, tol, name)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    (backend.varlen(qq, kk, vv, cq, ck, mq, mk, causal, scale) * dout).sum().backward()
    for name, got, exp in zip(("varlen dq", "varlen dk", "varlen dv"), (qq.grad, kk.grad, vv.grad), want):
        assert_close(got, exp, tol, name)


@pytest.mark.parametrize("backend,dtype,tol", KERNELS)
def test_mla_windowed_and_offset_blocks_match_dense(backend, dtype, tol):
    """The blocks a windowed ring exchange runs (offset positions, a window) with v narrower than q/k."""
    window, scale = 5, 0.3
    q, k, v, dout = make_mla_inputs([6], [9], 4, 2, dtype=dtype, seed=11)
    positions = [(10, 4)]  # rows at positions 10..15, keys at 4..12
    c_q, c_k = cu([6]), cu([9])
    out, lse = backend.forward(q, k, v, c_q, c_k, 6, 9, True, scale, window=window, positions=positions)
    qp = torch.arange(10, 16)[:, None]
    kp = torch.arange(4, 13)[None, :]
    allowed = (kp <= qp) & (qp - kp < window)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    s = torch.einsum("qhd,khd->hqk", q64, k64.repeat_interleave(2, 1)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    want_out = torch.einsum("hqk,khd->qhd", s.softmax(-1), v64.repeat_interleave(2, 1))
    assert_close(out, want_out.detach(), tol, "out")
    assert_close(lse, torch.logsumexp(s, -1).t().detach(), tol, "lse")
    (want_out * dout.double()).sum().backward()
    grads = backend.backward(dout, q, k, v, out, lse, c_q, c_k, 6, 9, True, scale, window=window, positions=positions)
    for name, got, exp in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad)):
        assert_close(got, exp, tol, name)


def test_fused_backends_pad_mla_head_sizes_for_one_size_kernels(monkeypatch):
    """The CUDA backends (flash_attn, torch_varlen) share FusedBackend, whose kernels take one head size: q/k and v
    of different sizes reach the kernel zero-padded to the larger, and come back exact at their own sizes. Checked
    on the CPU with a stand-in library whose kernels refuse unequal head sizes and compute in float64."""
    import hf_hdp.attention.backends._fused as fused

    calls = []

    class OneSizeKernels(fused.FusedBackend):
        name = "one_size"

        @classmethod
        def library_problem(cls):
            return None

        def _check(self, q, k, v):
            assert q.shape[-1] == k.shape[-1] == v.shape[-1], "the kernel takes one head size"
            calls.append(q.shape[-1])

        def _kernel_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
            self._check(q, k, v)
            causal = tuple(window_size) == fused.CAUSAL_WINDOW
            return REF.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)  # lse [Tq, Hq]: the "th" layout

        def _kernel_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window_size, softcap):
            self._check(q, k, v)
            causal = tuple(window_size) == fused.CAUSAL_WINDOW
            lse = lse.double().masked_fill(lse == float("inf"), float("-inf"))
            return REF.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)

    def cpu_inputs(backend, q, k, v, cu_q, cu_k, causal, positions=None):  # the stand-in runs float64 on the CPU
        base_check_shapes(q, k, v, cu_q, cu_k)
        head = max(q.shape[-1], v.shape[-1])
        if head % 8 or head > 256:
            raise ValueError("multiple of 8")

    from hf_hdp.attention.backends.base import check_shapes as base_check_shapes

    monkeypatch.setattr(fused, "check_fused_inputs", cpu_inputs)
    backend = OneSizeKernels()
    lens = [7, 0, 5, 9]
    q, k, v, dout = make_mla_inputs(lens, lens, 4, 2, seed=13)
    scale = 24**-0.5
    c = cu(lens)
    out, lse = backend.forward(q, k, v, c, c, 9, 9, True, scale)
    want_out, want_lse = dense_attention(q, k, v, lens, lens, True, scale)
    assert out.shape == (sum(lens), 4, 16)
    assert_close(out, want_out, 1e-6, "out")  # the fused path keeps its lse in float32
    grads = backend.backward(dout, q, k, v, out, lse, c, c, 9, 9, True, scale)
    for name, got, exp, ref in zip(
        ("dq", "dk", "dv"), grads, dense_grads(q, k, v, dout, lens, lens, True, scale), (q, k, v)
    ):
        assert got.shape == ref.shape, name
        assert_close(got, exp, 1e-6, name)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    (backend.varlen(qq, kk, vv, c, c, 9, 9, True, scale) * dout).sum().backward()
    assert_close(vv.grad, dense_grads(q, k, v, dout, lens, lens, True, scale)[2], 1e-6, "varlen dv")
    assert calls and set(calls) == {24}  # every kernel call padded to the q/k size


def test_fused_head_size_check_takes_the_padded_size():
    class LooksCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    c = cu([4])

    def fake(d, heads=2):
        return torch.zeros(4, heads, d, dtype=torch.bfloat16, device="meta").as_subclass(LooksCuda)

    check_fused_inputs("flash_attn", fake(24), fake(24), fake(16), c, c, False)  # MLA: padded to 24
    check_fused_inputs("flash_attn", fake(192), fake(192), fake(128), c, c, False)  # DeepSeek-V3
    with pytest.raises(ValueError, match="24 for q/k and 264 for v"):
        check_fused_inputs("flash_attn", fake(24), fake(24), fake(264), c, c, False)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_fused_inputs("flash_attn", fake(12), fake(12), fake(4), c, c, False)
