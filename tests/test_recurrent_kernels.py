"""Kernel-level tests of the state-carrying layers (hf_hdp.attention.recurrent) against per-sample dense references.

float64 throughout: the chunked gated delta rule and the chunked state space dual form against the recurrences
token by token (from a zero and from a given state), the transition and read-out that the state scan uses, the
packed depthwise convolution against F.conv1d per sample (with halos), a packed micro-batch's layer against each
sample alone, and the layout of split samples' pieces and halos.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_hdp.attention.metadata import HDPAttentionMetadata
from hf_hdp.attention.recurrent.delta_rule import (
    chunk_quantities,
    delta_rule,
    delta_rule_reference,
    l2norm,
    linear_chunk_quantities,
    read_state,
    run_chunks,
    transition,
)
from hf_hdp.attention.recurrent.split import causal_conv, choose_split, gated_delta_net, short_conv
from hf_hdp.planning.layers import StateShape
from hf_hdp.planning.pieces import halo_index, halo_rows, member_rows, segment_pieces

DT = torch.float64


def _inputs(h=3, n=150, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(h, n, dk, generator=g, dtype=DT)) * dk**-0.5
    k = l2norm(torch.randn(h, n, dk, generator=g, dtype=DT))
    v = torch.randn(h, n, dv, generator=g, dtype=DT)
    decay = -torch.rand(h, n, generator=g, dtype=DT)
    beta = torch.rand(h, n, generator=g, dtype=DT)
    state = torch.randn(h, dk, dv, generator=g, dtype=DT)
    return q, k, v, decay, beta, state


def _ssd_reference(q, k, v, decay, state=None):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, token by token."""
    s = state.clone() if state is not None else v.new_zeros(q.shape[0], q.shape[2], v.shape[2])
    outs = []
    for t in range(q.shape[1]):
        s = s * decay[:, t].exp()[:, None, None] + k[:, t, :, None] * v[:, t, None, :]
        outs.append((s * q[:, t, :, None]).sum(1))
    return torch.stack(outs, 1), s


@pytest.mark.parametrize("n, chunk", [(150, 16), (64, 64), (5, 64), (1, 4)])
def test_chunked_delta_rule_is_the_recurrence(n, chunk):
    q, k, v, decay, beta, state = _inputs(n=n)
    for s0 in (None, state):
        out, final = delta_rule(q, k, v, decay, beta, s0, chunk=chunk)
        ref_out, ref_final = delta_rule_reference(q, k, v, decay, beta, s0)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final, ref_final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("linear", [False, True], ids=["delta", "ssd"])
def test_state_is_linear_in_the_incoming_state(linear):
    """What the state scan relies on: from S_in, the final state is M S_in + B and the outputs O0 + R(S_in)."""
    q, k, v, decay, beta, state = _inputs(n=77)
    ch = linear_chunk_quantities(q, k, v, decay, 16) if linear else chunk_quantities(q, k, v, decay, beta, 16)
    zero_out, zero_final = run_chunks(ch, None)
    ref_out, ref_final = (
        _ssd_reference(q, k, v, decay, state) if linear else delta_rule_reference(q, k, v, decay, beta, state)
    )
    torch.testing.assert_close(transition(ch) @ state + zero_final, ref_final, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zero_out + read_state(ch, state), ref_out, rtol=1e-12, atol=1e-12)


def test_chunked_ssd_is_the_recurrence():
    q, k, v, decay, _, state = _inputs(n=100, dk=5, dv=7)
    out, final = run_chunks(linear_chunk_quantities(q, k, v, decay, 32), state)
    ref_out, ref_final = _ssd_reference(q, k, v, decay, state)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=1e-12, atol=1e-12)


def test_packed_convolution_restarts_at_every_sample():
    g = torch.Generator().manual_seed(1)
    lengths = [7, 1, 12, 3]
    x = torch.randn(sum(lengths), 5, generator=g, dtype=DT)
    weight, bias = torch.randn(5, 4, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    pos = torch.cat([torch.arange(n) for n in lengths])
    out = causal_conv(x, pos, weight, bias, "silu")
    at = 0
    for n in lengths:
        ref = F.silu(F.conv1d(x[at : at + n].T[None], weight[:, None, :], bias, padding=3, groups=5)[0, :, :n].T)
        torch.testing.assert_close(out[at : at + n], ref, rtol=1e-12, atol=1e-12)
        at += n
    # a piece with its halo rows in front equals the same rows of the whole sample
    whole = causal_conv(x[8:20], torch.arange(12), weight, bias, None)
    piece = causal_conv(x[8 + 2 : 20], torch.arange(2, 12), weight, bias, None)  # no halo: wrong
    halo = causal_conv(x[8 + 2 - 2 : 20], torch.arange(0, 12), weight, bias, None)[2:]
    torch.testing.assert_close(halo, whole[2:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(piece[:3], whole[2:5])


def _meta(lengths):
    return HDPAttentionMetadata(num_tokens=sum(lengths), local_len=sum(lengths), local_seqlens=tuple(lengths), rings=())


@pytest.mark.parametrize("kind", ["delta", "ssd"])
def test_packed_layer_equals_each_sample_alone(kind):
    """A micro-batch of whole samples: every sample's outputs as if it ran alone (state and convolution restart)."""
    g = torch.Generator().manual_seed(2)
    shape = StateShape(2, 4, 6, 3, 4, kind)
    lengths = [9, 1, 70, 4]
    x = torch.randn(sum(lengths), shape.channels, generator=g, dtype=DT)
    decay = -torch.rand(sum(lengths), 6, generator=g, dtype=DT)
    beta = torch.rand(sum(lengths), 6, generator=g, dtype=DT)
    weight = torch.randn(shape.channels, 4, generator=g, dtype=DT)
    skip = torch.randn(6, generator=g, dtype=DT) if kind == "ssd" else None
    packed = gated_delta_net(x, decay, beta, weight, None, shape, _meta(lengths), None, skip=skip)
    at = 0
    for n in lengths:
        alone = gated_delta_net(
            x[at : at + n], decay[at : at + n], beta[at : at + n], weight, None, shape, _meta([n]), None, skip=skip
        )
        torch.testing.assert_close(packed[at : at + n], alone, rtol=1e-12, atol=1e-12)
        at += n
    # and one sample against an independent dense computation
    n = lengths[2]
    rows = slice(10, 80)
    conv = F.silu(F.conv1d(x[rows].T[None], weight[:, None, :], padding=3, groups=shape.channels)[0, :, :n].T)
    q, k, v = conv.split([8, 8, 18], dim=1)
    q, k, v = q.reshape(n, 2, 4), k.reshape(n, 2, 4), v.reshape(n, 6, 3)
    if kind == "delta":
        q, k = l2norm(q) * 4**-0.5, l2norm(k)
    else:
        v = v * beta[rows, :, None]
    q, k = q.repeat_interleave(3, 1), k.repeat_interleave(3, 1)
    args = (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), decay[rows].T)
    ref = delta_rule_reference(*args, beta[rows].T)[0] if kind == "delta" else _ssd_reference(*args)[0]
    ref = ref.transpose(0, 1)
    if skip is not None:
        ref = ref + conv[:, 16:].reshape(n, 6, 3) * skip[None, :, None]
    torch.testing.assert_close(packed[rows], ref, rtol=1e-12, atol=1e-12)


def test_short_convolution_packs():
    g = torch.Generator().manual_seed(3)
    lengths = [3, 10]
    x = torch.randn(13, 4, generator=g, dtype=DT)
    weight = torch.randn(4, 3, generator=g, dtype=DT)
    out = short_conv(x, weight, None, None, _meta(lengths), None)
    ref = F.conv1d(x[3:].T[None], weight[:, None, :], padding=2, groups=4)[0, :, :10].T
    torch.testing.assert_close(out[3:], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "lengths, k, u", [((40,), 3, 1), ((60, 33), 4, 1), ((5,), 4, 1), ((50, 9), 4, 2), ((7,), 2, 1)]
)
def test_pieces_cover_every_document_once_and_halos_are_the_rows_before(lengths, k, u):
    pieces = segment_pieces(lengths, k, u)
    for d, n in enumerate(lengths):
        covered = [pos for p in pieces[d] for pos in range(p.start, p.end)]
        assert covered == list(range(n))
    for m in range(k):
        rows = sum(p.length for doc in pieces for p in doc if p.member == m)
        assert rows == member_rows(pieces, m)
        # each piece's halo: exactly the positions [start - 3, start) of its document, from their owners' rows
        where = {}  # (doc, position) -> (member, row)
        for doc in pieces:
            for p in doc:
                for i in range(p.length):
                    where[(p.doc, p.start + i)] = (p.member, p.row + i)
        flat = [(src, r) for src in range(k) for r in halo_rows(lengths, k, u, 3, m, src)]
        for p, idx in halo_index(lengths, k, u, 3, m):
            want = [where[(p.doc, pos)] for pos in range(max(0, p.start - 3), p.start)]
            assert [flat[i] for i in idx] == want


def test_choose_split_honours_the_forced_method_where_it_can():
    from hf_hdp.attention.metadata import RingSegment
    from hf_hdp.planning.layout import zigzag_front_back

    def seg(k, n=4000):
        layout = tuple((fb,) for fb in zigzag_front_back(n, k))
        return RingSegment(start=0, end=0, group=tuple(range(k)), member=0, samples=(0,), layout=layout)

    shape = StateShape(16, 128, 32, 128, 4)
    assert choose_split(seg(4), shape, "heads") == "heads"
    assert choose_split(seg(3), shape, "heads") == "scan"  # 3 does not divide 32 value heads
    assert choose_split(seg(4), shape, "scan") == "scan"
    assert choose_split(seg(4), shape, "auto") in ("heads", "scan")
    with pytest.raises(ValueError, match="one of"):
        choose_split(seg(4), shape, "ring")


# --------------------------------------------------------------- the CUDA packages' kernels, by their contracts
def _conv_standin(x, weight, bias=None, seq_idx=None, activation=None):
    """causal_conv1d_fn's contract: x [B, C, T], weight [C, K], samples by seq_idx [B, T]."""
    assert x.dim() == 3 and x.shape[0] == 1 and seq_idx.dtype == torch.int32 and seq_idx.shape == (1, x.shape[2])
    out = torch.empty_like(x)
    for i in seq_idx.unique():
        cols = (seq_idx[0] == i).nonzero()[:, 0]
        y = F.conv1d(x[:, :, cols], weight[:, None, :], bias, padding=weight.shape[1] - 1, groups=x.shape[1])
        out[:, :, cols] = y[..., : cols.numel()]
    return F.silu(out) if activation == "silu" else out


def _delta_standin(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
):
    """fla's chunk_gated_delta_rule contract: [1, T, H, D] tensors, samples by cu_seqlens."""
    assert q.shape[0] == 1 and cu_seqlens.dtype == torch.long and not use_qk_l2norm_in_kernel
    out = torch.empty_like(v)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        args = [t[0, a:b].transpose(0, 1) for t in (q * scale, k, v)] + [t[0, a:b].T for t in (g, beta)]
        out[0, a:b] = delta_rule_reference(*args)[0].transpose(0, 1)
    return out, None


def _ssd_standin(x, dt, A, B, C, chunk_size, D=None, seq_idx=None, **kwargs):
    """mamba_chunk_scan_combined's contract: x [1, T, H, P], dt [1, T, H], A [H], B/C [1, T, G, N], samples by
    seq_idx; y = S C + D x with S_t = exp(dt A) S + dt x B^T."""
    heads, groups = x.shape[2], B.shape[2]
    out = torch.empty_like(x)
    for i in seq_idx.unique():
        rows = (seq_idx[0] == i).nonzero()[:, 0]
        xs, ds = x[0, rows], dt[0, rows]
        bs, cs = (t[0, rows].repeat_interleave(heads // groups, 1) for t in (B, C))
        out[0, rows] = (
            _ssd_reference(cs.transpose(0, 1), bs.transpose(0, 1), (xs * ds[..., None]).transpose(0, 1), (ds * A).T)[
                0
            ].transpose(0, 1)
            + D[None, :, None] * xs
        )
    return out


@pytest.mark.parametrize("kind", ["delta", "ssd"])
def test_fused_kernels_are_called_by_their_contracts(kind, monkeypatch):
    """Where the CUDA packages are installed their kernels run whole samples; here stand-ins that implement each
    package's documented contract on the CPU (samples by cu_seqlens / seq_idx) must give HDP's own results."""
    from hf_hdp.attention.recurrent import split as split_module
    from hf_hdp.attention.recurrent.fused import FusedKernels

    g = torch.Generator().manual_seed(5)
    shape = StateShape(2, 4, 6, 3, 4, kind)
    lengths = [9, 1, 40]
    n = sum(lengths)
    x = torch.randn(n, shape.channels, generator=g, dtype=DT)
    dt = torch.rand(n, 6, generator=g, dtype=DT) + 0.1
    rate = -torch.rand(6, generator=g, dtype=DT)
    if kind == "ssd":
        decay, beta = dt * rate, dt
    else:
        decay, beta = -torch.rand(n, 6, generator=g, dtype=DT), torch.rand(n, 6, generator=g, dtype=DT)
    weight = torch.randn(shape.channels, 4, generator=g, dtype=DT)
    bias = torch.randn(shape.channels, generator=g, dtype=DT)
    skip = torch.randn(6, generator=g, dtype=DT) if kind == "ssd" else None
    own = gated_delta_net(x, decay, beta, weight, bias, shape, _meta(lengths), None, skip=skip, rate=rate)
    called = []

    def record(fn, name):
        def wrapped(*a, **kw):
            called.append(name)
            return fn(*a, **kw)

        return wrapped

    kernels = FusedKernels(
        conv=record(_conv_standin, "conv"), delta=record(_delta_standin, "delta"), ssd=record(_ssd_standin, "ssd")
    )
    monkeypatch.setattr(split_module, "fused_kernels", lambda device: kernels)
    fused = gated_delta_net(x, decay, beta, weight, bias, shape, _meta(lengths), None, skip=skip, rate=rate)
    assert called == ["conv", kind]
    torch.testing.assert_close(fused, own, rtol=1e-12, atol=1e-12)


def test_no_fused_kernels_off_cuda():
    from hf_hdp.attention.recurrent.fused import fused_kernels

    assert fused_kernels(torch.device("cpu")) is None
