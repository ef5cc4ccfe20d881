"""The chunked LM head and cross-entropy (hf_hdp.engine.loss) equal the full logits' loss.

The function alone, against ``F.cross_entropy`` of the full logits: loss and the gradients of the
hidden states, the weight and the bias, in float64 for chunks of 1, 3, T-1, T and more than T rows,
with -100 labels mixed in (a run of unlabelled rows longer than the small chunks) and every logit
transform a supported head applies; bf16 inputs and bf16 autocast against the float32-upcast path.
Through ``hdp_loss``: a tiny Llama (every parameter's gradient), Gemma 2 (final soft-capping),
Cohere (logit scale) and Granite (logits scaling) against their own full-logits path, with gradient
checkpointing, LoRA, bf16 autocast and accelerate's autocast wrapper; models and heads it cannot
reproduce (a custom forward, a LoRA head, a hooked head, a ``compute_loss_func``) take the full path.
Memory: the largest float32 tensor of forward + backward at T = 4096, V = 32000, chunk 256.
"""

from __future__ import annotations

import contextlib
from types import MethodType

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_hdp import HDPConfig
from hf_hdp.collators import HDPCollator, count_loss_tokens
from hf_hdp.distributed.mesh import DynamicMesh
from hf_hdp.engine import enable_hdp_attention, forward_micro_batch, hdp_loss
from hf_hdp.engine.loss import LogitTransform, chunked_cross_entropy, chunked_head
from hf_hdp.planning import plan_naive
from tests.family_models import family_config, load_family_model
from tests.models import MIXED_LENGTHS, VOCAB, load_model, mixed_batch, save_tiny_model

F64 = dict(rtol=1e-12, atol=1e-12)
TRANSFORMS = {
    "plain": LogitTransform(),
    "scaled": LogitTransform(scale=0.5, divisor=3.0),
    "softcap": LogitTransform(softcap=2.0),
}


# ---------------------------------------------------------------------------- the function
def _transformed(logits, transform):
    """The transform written out as the models' forwards write it (out of place)."""
    logits = logits * transform.scale / transform.divisor
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    return logits


def _full_loss(hidden, weight, targets, bias=None, transform=LogitTransform()):
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(_transformed(logits, transform), targets, ignore_index=-100, reduction="sum")


def _inputs(T, H, V, dtype=torch.float64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (2 * torch.randn(T, H, generator=g, dtype=torch.float64)).to(dtype)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    targets[4:12] = -100  # 8 unlabelled rows in a row: chunks of 1 and 3 rows there have no label
    targets[[0, 15, T - 1]] = -100
    return hidden, weight, b, targets


def _loss_and_grads(fn, hidden, weight, bias, targets, scale=0.37):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(*leaves[:2], targets, leaves[2] if bias is not None else None)
    (loss * scale).backward()
    return loss.detach(), [t.grad for t in leaves]


T, H, V = 23, 8, 37


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("chunk", [1, 3, T - 1, T, T + 9])
def test_chunked_equals_full_logits_float64(chunk, transform, bias):
    t = TRANSFORMS[transform]
    hidden, weight, b, targets = _inputs(T, H, V, bias=bias)
    want_loss, want = _loss_and_grads(lambda h, w, y, bb: _full_loss(h, w, y, bb, t), hidden, weight, b, targets)
    got_loss, got = _loss_and_grads(
        lambda h, w, y, bb: chunked_cross_entropy(h, w, y, bb, chunk_tokens=chunk, transform=t),
        hidden,
        weight,
        b,
        targets,
    )
    assert got_loss.dtype == torch.float64
    torch.testing.assert_close(got_loss, want_loss, **F64)
    assert len(got) == len(want) == (3 if bias else 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)
    assert got[0][4:12].abs().max() == 0 and got[0][4:12].shape[0] == 8  # unlabelled rows get no gradient
    assert got[0][12:].abs().max() > 0


def test_no_label_at_all_gives_zero_loss_and_gradients():
    hidden, weight, b, targets = _inputs(T, H, V, bias=True)
    targets[:] = -100
    got_loss, got = _loss_and_grads(
        lambda h, w, y, bb: chunked_cross_entropy(h, w, y, bb, chunk_tokens=4), hidden, weight, b, targets
    )
    want_loss, want = _loss_and_grads(_full_loss, hidden, weight, b, targets)
    assert float(got_loss) == float(want_loss) == 0.0
    for g, w in zip(got, want):
        assert g.abs().max() == 0 and w.abs().max() == 0


def _assert_low_precision_close(got, want, tol=2e-2):
    """Within bf16 rounding, relative to the tensor's largest element."""
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max()))


def test_bf16_inputs_agree_with_the_float32_upcast_path():
    hidden, weight, b, targets = _inputs(64, 32, 100, dtype=torch.bfloat16, bias=True)
    want_loss, want = _loss_and_grads(_full_loss, hidden, weight, b, targets)
    got_loss, got = _loss_and_grads(
        lambda h, w, y, bb: chunked_cross_entropy(h, w, y, bb, chunk_tokens=16), hidden, weight, b, targets
    )
    assert got_loss.dtype == want_loss.dtype == torch.float32  # the loss of bf16 logits is float32
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=0)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.bfloat16
        _assert_low_precision_close(g, w)


def test_autocast_casts_the_head_as_nn_linear_does():
    hidden, weight, b, targets = _inputs(64, 32, 100, dtype=torch.float32, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _loss_and_grads(_full_loss, hidden, weight, b, targets)
        got_loss, got = _loss_and_grads(
            lambda h, w, y, bb: chunked_cross_entropy(h, w, y, bb, chunk_tokens=16), hidden, weight, b, targets
        )
    fp32_loss, _ = _loss_and_grads(_full_loss, hidden, weight, b, targets)
    assert abs(float(got_loss) - float(fp32_loss)) > 1e-6 * abs(float(fp32_loss))  # the head did run in bf16
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=0)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32  # the leaves' gradients, through autocast's casts
        _assert_low_precision_close(g, w)


def test_bad_arguments_are_refused():
    hidden, weight, _, targets = _inputs(T, H, V)
    for bad in (0, -1, True, 2.0, None):
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunked_cross_entropy(hidden, weight, targets, chunk_tokens=bad)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hidden, weight, targets[1:])
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(hidden, weight[:, 1:], targets)
    with pytest.raises(TypeError, match="float32"):
        chunked_cross_entropy(hidden, weight.float(), targets)


# ---------------------------------------------------------------------------- the largest tensor
class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op returns (an upper bound on every live one)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


def _largest_float32(loss_fn, T, V, H=64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    weight = (0.1 * torch.randn(V, H, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    targets[: T // 8] = -100
    with _LargestFloat32() as fwd:
        loss = loss_fn(hidden, weight, targets)
    with _LargestFloat32() as bwd:
        loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().max() > 0 and weight.grad.abs().max() > 0
    return fwd.numel, bwd.numel


def test_the_largest_float32_tensor_is_a_chunk_of_logits_not_the_logits():
    T_, V_, chunk = 4096, 32000, 256
    fwd, bwd = _largest_float32(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_tokens=chunk), T_, V_)
    assert fwd == bwd == chunk * V_  # one chunk of logits (softmax) at a time, in forward and in backward
    assert max(fwd, bwd) * 8 <= T_ * V_  # 8.2M elements (33 MB) against 131M (524 MB)
    # the tracker sees the full path's [T, V] logits (a small T keeps it fast)
    full_fwd, full_bwd = _largest_float32(lambda h, w, y: _full_loss(h, w, y), 2 * chunk, V_)
    assert full_fwd >= 2 * chunk * V_ and full_bwd >= 2 * chunk * V_


# ---------------------------------------------------------------------------- through hdp_loss
@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("chunked") / "llama"))


SAMPLES = dict(enumerate(mixed_batch(0)))
N_LOSS = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in SAMPLES.values())


def _micro_batches():
    plan = plan_naive(MIXED_LENGTHS, 1, sum(MIXED_LENGTHS))  # one rank, one packed micro-batch
    collator = HDPCollator(vocab_size=VOCAB)
    return [collator(mb, SAMPLES) for mb in plan.for_rank(0)]


def _run(model, chunk_tokens, context=None, **kwargs):
    """Loss, gradients (every parameter that trains) and outputs of one step through ``hdp_loss``."""
    model.zero_grad(set_to_none=True)
    mesh, total, outs = DynamicMesh(), 0.0, []

    def loss_fn(m, batch, num_items_in_batch):
        loss, out = hdp_loss(m, batch, num_items_in_batch, return_outputs=True, chunk_tokens=chunk_tokens, **kwargs)
        outs.append(out)
        return loss

    for batch in _micro_batches():
        loss, _ = forward_micro_batch(
            model,
            batch,
            N_LOSS,
            mesh,
            "reference",
            torch.device("cpu"),
            loss_fn=loss_fn,
            context=context or contextlib.nullcontext,
        )
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads, outs


def _assert_same_step(got, want, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=rtol, atol=atol)
    assert got[1] and set(got[1]) == set(want[1])
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _chunked_and_full(model, chunk, **kwargs):
    got, want = _run(model, chunk, **kwargs), _run(model, None, **kwargs)
    assert all(o.logits is None for o in got[2])  # the chunked path ran
    assert all(o.logits is not None for o in want[2])
    return got, want


@pytest.mark.parametrize("chunk", ["1", "3", "T-1", "T", "T+5"])
def test_tiny_llama_chunked_loss_and_every_gradient_equal_the_full_logits(llama_path, chunk):
    model = load_model(llama_path)
    enable_hdp_attention(model)
    (batch,) = _micro_batches()
    T_ = batch["input_ids"].shape[1]
    assert sum(MIXED_LENGTHS) == T_ and (batch["labels"] == -100).sum() > 13  # a masked 13-token prompt among them
    size = {"1": 1, "3": 3, "T-1": T_ - 1, "T": T_, "T+5": T_ + 5}[chunk]
    got, want = _chunked_and_full(model, size)
    _assert_same_step(got, want)
    assert len(got[1]) == len(list(model.parameters()))  # every parameter, lm_head and embeddings included
    assert got[2][0].loss is not None


def _family_model(tmp_path, family, **overrides):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(family, **overrides)).save_pretrained(tmp_path / family)
    model = load_family_model(str(tmp_path / family), family)
    enable_hdp_attention(model)
    return model


def _no_softcap(model):
    model.config.final_logit_softcapping = None


def _no_scale(model):
    model.logit_scale = 1.0


def _no_scaling(model):
    model.config.logits_scaling = 1.0


@pytest.mark.parametrize(
    "family, overrides, transform, undo",
    [
        ("gemma2", {"final_logit_softcapping": 0.2}, LogitTransform(softcap=0.2), _no_softcap),
        ("cohere", {}, LogitTransform(scale=0.5), _no_scale),
        ("granite", {}, LogitTransform(divisor=4.0), _no_scaling),
    ],
)
def test_heads_with_a_logit_transform_match_their_own_full_logits(tmp_path, family, overrides, transform, undo):
    model = _family_model(tmp_path, family, **overrides)
    assert chunked_head(model).transform == transform
    got, want = _chunked_and_full(model, 7)
    _assert_same_step(got, want)
    undo(model)  # the transform matters: without it the model's loss is another
    assert chunked_head(model).transform == LogitTransform()
    assert abs(_run(model, 7)[0] - got[0]) > 1e-4


def test_gradient_checkpointing_takes_the_chunked_path(llama_path):
    model = load_model(llama_path)
    enable_hdp_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _assert_same_step(*_chunked_and_full(model, 16))


def _lora(model, targets):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    return peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )


def test_lora_adapters_get_the_full_paths_gradients(llama_path):
    model = _lora(load_model(llama_path), ["q_proj", "v_proj", "down_proj"])
    enable_hdp_attention(model)
    got, want = _chunked_and_full(model, 16)
    assert all("lora_" in n for n in got[1])
    _assert_same_step(got, want)


def test_bf16_autocast_agrees_with_the_full_path(llama_path):
    model = load_model(llama_path, dtype=torch.float32)
    enable_hdp_attention(model)
    got, want = _chunked_and_full(model, 16, context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=1e-3, atol=0)
    for name, g in want[1].items():
        assert got[1][name].dtype == torch.float32
        _assert_low_precision_close(got[1][name], g, tol=5e-2)


def test_accelerates_autocast_wrapper_is_honoured(llama_path):
    """HDPTrainer(bf16=True) gets its autocast from accelerate, which wraps ``model.forward``."""
    from accelerate.utils import convert_outputs_to_fp32

    model = load_model(llama_path, dtype=torch.float32)
    enable_hdp_attention(model)
    fp32 = _run(model, 16)
    model.forward = MethodType(
        convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward)), model
    )  # what Accelerator.prepare_model does with mixed_precision="bf16"
    assert chunked_head(model) is not None
    got, want = _chunked_and_full(model, 16)
    assert abs(got[0] - fp32[0]) > 1e-6 * abs(fp32[0])  # the head ran under bf16 autocast
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=1e-3, atol=0)


class _DoubledLogitsLlama(LlamaForCausalLM):
    """An unknown ForCausalLM with its own forward: the chunked path cannot know what it does."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out["logits"] = 2 * out.logits
        return out


def test_models_the_chunked_path_cannot_reproduce_compute_the_full_logits(llama_path):
    custom = _DoubledLogitsLlama.from_pretrained(llama_path, dtype=torch.float64, attn_implementation="sdpa")
    enable_hdp_attention(custom)
    plain = load_model(llama_path)
    enable_hdp_attention(plain)
    lora_head = _lora(load_model(llama_path), ["q_proj", "lm_head"])
    enable_hdp_attention(lora_head)
    hooked = load_model(llama_path)
    enable_hdp_attention(hooked)
    hooked.lm_head.register_forward_hook(lambda module, args, out: out * 3)
    for model in (custom, lora_head, hooked):
        assert chunked_head(model) is None
        got, want = _run(model, 16), _run(model, None)
        assert all(o.logits is not None for o in got[2])  # the full path ran, with the model's own logits
        _assert_same_step(got, want, rtol=0, atol=0)
    assert abs(_run(custom, 16)[0] - _run(plain, 16)[0]) > 1e-3  # and the custom forward's logits counted


def test_a_compute_loss_func_gets_the_full_logits(llama_path):
    model = load_model(llama_path)
    enable_hdp_attention(model)
    seen = []

    def loss_func(outputs, labels, num_items_in_batch):
        seen.append(outputs.logits.shape)
        return outputs.logits.sum() * 0

    _run(model, 16, loss_func=loss_func)
    assert seen == [(1, sum(MIXED_LENGTHS) + 1, VOCAB)]


def test_loss_chunk_tokens_is_validated():
    assert HDPConfig().loss_chunk_tokens == 1024
    assert HDPConfig(loss_chunk_tokens=None).loss_chunk_tokens is None
    assert HDPConfig(loss_chunk_tokens=1).loss_chunk_tokens == 1
    for bad in (0, -4, True, 4096.0, "4096"):
        with pytest.raises(ValueError, match="loss_chunk_tokens"):
            HDPConfig(loss_chunk_tokens=bad)
    with pytest.raises(ValueError, match="chunk_tokens"):
        hdp_loss(
            None, {"input_ids": None, "position_ids": None, "hdp_metadata": None, "labels": None}, 1, chunk_tokens=0
        )
