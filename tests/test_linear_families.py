"""Hybrid Gated DeltaNet families (Qwen3.5 dense and MoE, Qwen3-Next) train exactly as on one device.

ONE spawn of four gloo processes runs, for each family and for both split methods of the state-carrying
layers forced (``"heads"``: all-to-all to head shards; ``"scan"``: zero-state pieces, one exchange of
chunk transitions and states, an exact correction), two placements of the same global batch (the naive
HDP plan and a random valid plan): samples whole on one rank, several packed per micro-batch, and samples
split over 3 and 4 ranks, whose convolution halos and states cross rank boundaries. Loss and every
gradient, float64, against one process running each sample alone.

The single-process side runs the families' own modules with the recurrence computed by
:func:`dense_delta_net_forward`: the module's projections, an explicit ``F.conv1d`` and the gated delta
rule token by token, in float64 (the families' own kernels compute in float32 whatever the model's
dtype); :func:`test_dense_reference_matches_the_stock_layer` checks it against the stock layer.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from hf_hdp.models import UnsupportedModelError, check_model_supported
from hf_hdp.planning import StepPlan, plan_naive
from tests.dist_utils import run_distributed
from tests.models import MIXED_LENGTHS, VOCAB, mixed_batch, reference_step
from tests.plan_helpers import random_plan

WORLD, C = 4, 16
LOSS_RTOL, GRAD_TOL = 1e-12, 1e-9

# 12 value heads over 2 key heads: group sizes 3 and 4 both divide them, so "heads" runs on every split sample
_LINEAR = dict(linear_num_key_heads=2, linear_key_head_dim=8, linear_num_value_heads=12, linear_value_head_dim=4,
               linear_conv_kernel_dim=4)
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             layer_types=["linear_attention", "full_attention"], num_hidden_layers=2, **_LINEAR)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            output_router_logits=False)
LINEAR_FAMILIES = {
    "qwen3_5_text": dict(_BASE),
    "qwen3_5_moe_text": dict(_BASE, **_MOE),
    "qwen3_next": dict(_BASE, **_MOE, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
}
SPLITS = ("heads", "scan")


def _save(family: str, path: str) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **LINEAR_FAMILIES[family]))
    with torch.no_grad():  # decays and strengths that make the state matter over tens of tokens
        for m in model.modules():
            if hasattr(m, "A_log") and hasattr(m, "dt_bias"):
                m.A_log.copy_(torch.linspace(-3.0, -1.0, m.A_log.numel()))
                m.dt_bias.normal_()
    model.save_pretrained(path)
    return path


def _load(path: str, dtype=torch.float64):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                experts_implementation="eager")


# ---------------------------------------------------------------------------------- dense reference
def dense_delta_net_forward(m, hidden_states, cache=None, attention_mask=None, **kwargs):
    """A Gated DeltaNet module's forward, one unpadded sample, in the model's dtype: the gated delta rule token
    by token (S_t = e^g S + k beta (v - e^g S^T k)^T, o_t = S_t^T q_t) after an explicit causal F.conv1d."""
    b, t, _ = hidden_states.shape
    dk, dv, hk, hv = m.head_k_dim, m.head_v_dim, m.num_k_heads, m.num_v_heads
    if hasattr(m, "in_proj_qkvz"):
        q, k, v, z, bb, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(hidden_states), m.in_proj_ba(hidden_states))
        mixed = torch.cat([x.reshape(b, t, -1) for x in (q, k, v)], dim=-1)
    else:
        mixed = m.in_proj_qkv(hidden_states)
        z = m.in_proj_z(hidden_states).reshape(b, t, hv, dv)
        bb, a = m.in_proj_b(hidden_states), m.in_proj_a(hidden_states)
    kernel = m.conv1d.weight.shape[-1]
    conv = F.conv1d(mixed.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=kernel - 1,
                    groups=mixed.shape[-1])[..., :t]
    conv = F.silu(conv).transpose(1, 2)
    q, k, v = conv.split([hk * dk, hk * dk, hv * dv], dim=-1)
    q, k = (x.reshape(b, t, hk, dk) for x in (q, k))
    q, k = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    q = q / dk ** 0.5
    q, k = (x.repeat_interleave(hv // hk, dim=2) for x in (q, k))
    v = v.reshape(b, t, hv, dv)
    beta = bb.sigmoid()
    g = -m.A_log.exp() * F.softplus(a + m.dt_bias)
    s = hidden_states.new_zeros(b, hv, dk, dv)
    outs = []
    for i in range(t):
        s = s * g[:, i].exp()[..., None, None]
        err = v[:, i] - torch.einsum("bhkv,bhk->bhv", s, k[:, i])
        s = s + torch.einsum("bhk,bhv->bhkv", k[:, i], err * beta[:, i, :, None])
        outs.append(torch.einsum("bhkv,bhk->bhv", s, q[:, i]))
    core = torch.stack(outs, dim=1)
    out = m.norm(core.reshape(-1, dv), z.reshape(-1, dv)).reshape(b, t, -1)
    return m.out_proj(out)


def _rms_norm_in_dtype(m, x):
    """The families' zero-centred RMSNorm, ``x / rms(x) * (1 + w)``, in the model's dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * (1.0 + m.weight)


def _gated_norm_in_dtype(m, x, gate):
    """The Gated DeltaNet output norm, ``w * x / rms(x) * silu(gate)``, in the model's dtype."""
    return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)) * F.silu(gate)


def exact_norms(model):
    """These families round every RMSNorm's output to float32 (``x.float()`` inside), so a float64 model is only
    float32-accurate: any 1e-16 difference of order flips a float32 rounding somewhere (measured: loss within 3e-11,
    gradients within 1e-7 of their size, the same for both split methods). Both sides of the equivalence test
    compute the norms in float64 instead, so the comparison is float64-tight and isolates HDP's packing and splits;
    :func:`test_stock_norms_agree_to_float32` runs the stock norms."""
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNormGated"):
            m.forward = lambda x, gate, _m=m: _gated_norm_in_dtype(_m, x, gate)
        elif name.endswith("RMSNorm") and name.startswith("Qwen3"):
            m.forward = lambda x, _m=m: _rms_norm_in_dtype(_m, x)
    return model


def use_dense_reference(model):
    for m in model.modules():
        if type(m).__name__.endswith("GatedDeltaNet"):
            m.forward = lambda *a, _m=m, **kw: dense_delta_net_forward(_m, *a, **kw)
    return model


# ---------------------------------------------------------------------------------------- HDP side
def _plans():
    return [plan_naive(MIXED_LENGTHS, WORLD, C), random_plan(MIXED_LENGTHS, WORLD, C, random.Random(5))]


def _hdp_worker(rank, world_size, paths, plan_jsons, stock_norms=False):
    from hf_hdp.collators import HDPCollator, count_loss_tokens
    from hf_hdp.mesh import DynamicMesh
    from hf_hdp.trainer import enable_hdp_attention, run_micro_batches

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    mesh = DynamicMesh()
    samples = dict(enumerate(mixed_batch(0)))
    n_loss = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in samples.values())
    plans = [StepPlan.from_json(pj) for pj in plan_jsons]
    collator = HDPCollator(vocab_size=VOCAB)
    out = {}
    for family, path in paths.items():
        for split in SPLITS:
            model = _load(path)
            if not stock_norms:
                exact_norms(model)
            enable_hdp_attention(model, split)
            per_plan = []
            for plan in plans:
                mesh.check_plan(plan.fingerprint(), 0)
                model.zero_grad(set_to_none=True)
                before = mesh.stats.bytes_sent
                micro = [collator(mb, samples) for mb in plan.for_rank(rank)]
                loss = run_micro_batches(model, micro, n_loss, mesh, "reference", torch.device("cpu"))
                sent = mesh.stats.bytes_sent - before
                params = [p for p in model.parameters() if p.requires_grad]
                (total,) = mesh.reduce_gradients(params, extras=[loss])
                grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
                         for n, p in model.named_parameters()}
                per_plan.append((total, grads if rank == 0 else {k: v.sum() for k, v in grads.items()}, sent))
            out[(family, split)] = per_plan
    return out


@pytest.fixture(scope="module")
def hdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    paths = {f: _save(f, str(root / f)) for f in LINEAR_FAMILIES}
    plans = _plans()
    for plan in plans:
        assert {1, 3, 4} <= {p.k for p in plan.pieces()}, plan.planner
    results = run_distributed(_hdp_worker, WORLD, paths, [p.to_json() for p in plans], timeout=900)
    return paths, plans, results


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("family", list(LINEAR_FAMILIES))
def test_hybrid_family_gradients_equal_single_device(family, split, hdp_runs):
    paths, plans, results = hdp_runs
    model = exact_norms(use_dense_reference(_load(paths[family])))
    check_model_supported(model, max(MIXED_LENGTHS))
    ref_loss, ref_grads = reference_step(model, mixed_batch(0))
    names = {n for n, _ in model.named_parameters()}
    assert set(ref_grads) == names
    for i, plan in enumerate(plans):
        loss, grads, _ = results[0][(family, split)][i]
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), (family, split, plan.planner)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=GRAD_TOL, atol=GRAD_TOL * float(g.abs().max()),
                                       msg=lambda m: f"{family} {split} {plan.planner} {name}: {m}")
        for r in range(1, WORLD):
            assert results[r][(family, split)][i][0] == pytest.approx(loss, rel=1e-12)


def test_stock_norms_agree_to_float32(tmp_path):
    """With the families' own float32-rounding norms, HDP (both split methods, Qwen3.5) still matches one process to
    float32 accuracy: 8 float32 ulps of the loss and of each gradient's largest element."""
    path = _save("qwen3_5_text", str(tmp_path / "m"))
    plans = _plans()[1:]
    results = run_distributed(_hdp_worker, WORLD, {"qwen3_5_text": path}, [p.to_json() for p in plans], True,
                              timeout=600)
    ref_loss, ref_grads = reference_step(use_dense_reference(_load(path)), mixed_batch(0))
    tol = 8 * torch.finfo(torch.float32).eps
    for split in SPLITS:
        loss, grads, _ = results[0][("qwen3_5_text", split)][0]
        assert loss == pytest.approx(ref_loss, rel=tol)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=tol, atol=tol * float(g.abs().max()))


def test_split_methods_move_different_bytes(hdp_runs):
    """The two methods really ran: the state scan's messages are not the head-parallel all-to-alls."""
    _, _, results = hdp_runs
    for family in LINEAR_FAMILIES:
        heads = sum(results[r][(family, "heads")][0][2] for r in range(WORLD))
        scan = sum(results[r][(family, "scan")][0][2] for r in range(WORLD))
        assert heads > 0 and scan > 0 and heads != scan, (family, heads, scan)


@pytest.mark.parametrize("family", list(LINEAR_FAMILIES))
def test_dense_reference_matches_the_stock_layer(family, tmp_path):
    """The float64 dense reference is the family's layer: equal to the stock forward (whose kernels compute in
    float32) on one sample, to float32 accuracy."""
    model = _load(_save(family, str(tmp_path / family)), dtype=torch.float32)
    layer = next(m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    hidden = torch.randn(1, 37, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = layer(hidden)
        dense = dense_delta_net_forward(layer, hidden)
    torch.testing.assert_close(dense, stock, rtol=1e-4, atol=1e-5)


def test_unknown_gated_delta_net_is_refused():
    """A Gated DeltaNet module no adapter knows is refused when HDP is switched on, naming it."""
    from hf_hdp.attention.recurrent import UnsupportedLayerError, enable_hdp_mixers

    class SomeGatedDeltaNet(torch.nn.Module):
        pass

    model = torch.nn.Sequential(SomeGatedDeltaNet())
    with pytest.raises(UnsupportedLayerError, match="SomeGatedDeltaNet"):
        enable_hdp_mixers(model)


def test_a_changed_layer_is_refused(tmp_path):
    """An adapter that does not reproduce the module's own forward refuses it (a transformers release changing the
    layer's math): here the module's forward is made to differ."""
    from hf_hdp.attention.recurrent import UnsupportedLayerError, enable_hdp_mixers

    model = _load(_save("qwen3_5_text", str(tmp_path / "m")), dtype=torch.float32)
    layer = next(m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    stock = layer.forward
    layer.forward = lambda *a, **kw: 2 * stock(*a, **kw)
    with pytest.raises(UnsupportedLayerError, match="does not reproduce"):
        enable_hdp_mixers(model)


def test_other_state_space_families_are_refused():
    """Families whose state-carrying layers have no adapter yet stay refused, with the reason."""
    for family in ("lfm2", "minimax"):
        with pytest.raises(UnsupportedModelError):
            check_model_supported(AutoConfig.for_model(family), 64)
