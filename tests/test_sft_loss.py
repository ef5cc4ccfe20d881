"""The per-chunk LM-head API of hf_hdp.engine.loss that TRL's loss types (HDPSFTTrainer) run on.

``map_head_chunks`` calls a ``per_chunk(h, weight, bias, t)`` function on every chunk of labelled
rows (logits from ``head_logits``, recomputed in backward); ``ChunkedHead.map_chunks`` does it at a
model's head in its own forward. Checked in float64 against the full logits, loss and every
gradient: DFT's ``-p.detach() * log p`` (TRL's ``loss_type="dft"``) and the cross-entropy, for
chunks of 1 row to more than all rows, with a bias and each logit transform, unlabelled rows mixed
in; under bf16 autocast the chunks see the head's inputs cast as ``nn.Linear`` casts them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_hdp.engine.loss import LogitTransform, chunked_cross_entropy, chunked_head, head_logits, map_head_chunks
from tests.models import VOCAB, load_model, save_tiny_model

F64 = dict(rtol=1e-12, atol=1e-12)
T, H, V = 23, 8, 37
TRANSFORMS = {"plain": LogitTransform(), "softcap": LogitTransform(softcap=2.0, scale=0.5)}


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (2 * torch.randn(T, H, generator=g, dtype=torch.float64)).to(dtype)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[[0, 4, 5, 6, 7, 15, T - 1]] = -100
    return hidden, weight, bias, targets


def _dft(z, t):
    """TRL's DFT on logits: each token's cross-entropy times its own detached probability, summed."""
    nll = F.cross_entropy(z, t, reduction="none")
    return (nll * torch.exp(-nll).detach()).sum()


def _full(kind, transform):
    def loss(h, w, b, t):
        z = F.linear(h, w, b) * transform.scale / transform.divisor
        if transform.softcap is not None:
            z = torch.tanh(z / transform.softcap) * transform.softcap
        keep = t != -100
        return _dft(z[keep], t[keep]) if kind == "dft" else F.cross_entropy(z[keep], t[keep], reduction="sum")

    return loss


def _chunked(kind, transform, chunk):
    def per_chunk(h, w, b, t):
        z = head_logits(h, w, b, transform)
        return _dft(z, t) if kind == "dft" else F.cross_entropy(z, t, reduction="sum")

    def loss(h, w, b, t):
        return torch.stack(map_head_chunks(h, w, b, t, per_chunk, chunk_tokens=chunk)).sum()

    return loss


def _loss_and_grads(fn, hidden, weight, bias, targets):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = fn(*leaves, targets)
    (loss * 0.37).backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kind", ["dft", "nll"])
@pytest.mark.parametrize("chunk", [1, 3, T + 9])
def test_per_chunk_losses_equal_the_full_logits(chunk, kind, transform):
    t = TRANSFORMS[transform]
    inputs = _inputs()
    want_loss, want = _loss_and_grads(_full(kind, t), *inputs)
    got_loss, got = _loss_and_grads(_chunked(kind, t, chunk), *inputs)
    torch.testing.assert_close(got_loss, want_loss, **F64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)
    assert got[0][4:8].abs().max() == 0 and got[0][8:15].abs().max() > 0  # unlabelled rows: no gradient
    if kind == "nll":  # the same as the library's own chunked cross-entropy
        ce = chunked_cross_entropy(inputs[0], inputs[1], inputs[3], inputs[2], chunk_tokens=chunk, transform=t)
        torch.testing.assert_close(got_loss, ce, **F64)


def test_chunks_see_the_head_inputs_autocast_would_give_nn_linear():
    hidden, weight, bias, targets = _inputs(torch.float32)
    seen = []

    def per_chunk(h, w, b, t):
        seen.append((h.dtype, w.dtype, b.dtype, torch.is_autocast_enabled("cpu")))
        return F.cross_entropy(head_logits(h, w, b), t, reduction="sum")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.stack(map_head_chunks(hidden, weight, bias, targets, per_chunk, chunk_tokens=8)).sum()
        want = chunked_cross_entropy(hidden, weight, targets, bias, chunk_tokens=8)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16, torch.bfloat16, False)}
    assert got.dtype == torch.float32  # bf16 logits are upcast before the loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_a_model_head_runs_per_chunk_in_the_models_forward(tmp_path):
    """ChunkedHead.map_chunks on a tiny Llama: DFT loss and every parameter's gradient equal the full logits'."""
    path = save_tiny_model("llama", str(tmp_path / "llama"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 40), generator=g)
    targets = torch.cat([ids[:, 1:], ids.new_full((1, 1), -100)], dim=1)
    targets[:, :6] = -100

    full = load_model(path)
    z = full(input_ids=ids).logits[0]
    keep = targets[0] != -100
    want = _dft(z[keep], targets[0][keep])
    want.backward()

    model = load_model(path)
    head = chunked_head(model)
    assert head is not None
    calls = []

    def per_chunk(h, w, b, t):
        calls.append(h.shape[0])
        return _dft(head.logits(h, w, b), t)

    terms, outputs = head.map_chunks(model, targets, per_chunk, 8, input_ids=ids)
    got = torch.stack(terms).sum()
    got.backward()
    assert outputs.logits.shape[-2] == 0  # the full logits were never built
    torch.testing.assert_close(got, want, **F64)
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    # forward: 33 labelled rows in chunks of 8; backward recomputes each chunk's logits once
    assert calls[:5] == [8, 8, 8, 8, 1] and sorted(calls[5:]) == sorted(calls[:5])
