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
from hf_hdp.planning import CostModel, StepPlan, plan_balanced, plan_naive
from tests.dist_utils import run_distributed
from tests.models import MIXED_LENGTHS, VOCAB, mixed_batch, reference_step
from tests.plan_helpers import random_plan

WORLD, C = 4, 16
LOSS_RTOL, GRAD_TOL = 1e-12, 1e-9

# 12 value heads over 2 key heads: group sizes 3 and 4 both divide them, so "heads" runs on every split sample
_LINEAR = dict(
    linear_num_key_heads=2,
    linear_key_head_dim=8,
    linear_num_value_heads=12,
    linear_value_head_dim=4,
    linear_conv_kernel_dim=4,
)
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    layer_types=["linear_attention", "full_attention"],
    num_hidden_layers=2,
    **_LINEAR,
)
_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    output_router_logits=False,
)
# Mamba-2: a Mamba-2 layer then an attention layer; 12 heads of 4 (Nemotron-H) or 16 heads of 4 (intermediate = 1 x hidden:
# group sizes of 3 then run the scan even when "heads" is asked) over 2 groups of state size 8
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    num_hidden_layers=2,
)
_M2 = dict(
    mamba_n_heads=16,
    mamba_d_head=4,
    mamba_d_state=8,
    mamba_n_groups=2,
    mamba_d_conv=4,
    mamba_expand=1,
    mamba_conv_bias=True,
    mamba_proj_bias=False,
)
LINEAR_FAMILIES = {
    "qwen3_5_text": dict(_BASE),
    "qwen3_5_moe_text": dict(_BASE, **_MOE),
    "qwen3_next": dict(_BASE, **_MOE, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
    "nemotron_h": dict(
        _SMALL,
        head_dim=16,
        layer_types=["mamba", "attention"],
        mamba_num_heads=12,
        mamba_head_dim=4,
        ssm_state_size=8,
        n_groups=2,
        conv_kernel=4,
        use_conv_bias=True,
        chunk_size=16,
    ),
    "bamba": dict(_SMALL, attn_layer_indices=[1], **_M2),
    "granitemoehybrid": dict(
        _SMALL, layer_types=["mamba", "attention"], **_M2, num_local_experts=0, shared_intermediate_size=64
    ),
    "falcon_h1": dict(_SMALL, head_dim=16, **_M2, mamba_d_ssm=64),
    # gated short convolutions (kernel 3) then attention
    "lfm2": dict(_SMALL, layer_types=["conv", "full_attention"], conv_L_cache=3, conv_bias=True),
    "lfm2_moe": dict(
        _SMALL,
        layer_types=["conv", "full_attention"],
        conv_L_cache=3,
        num_dense_layers=1,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    ),
    "lfm3": dict(_SMALL, layer_types=["conv", "full_attention"], conv_L_cache=3),
    # Zamba 2: a Mamba-2 layer, then a hybrid layer (the shared attention block beside a Mamba-2 mixer)
    "zamba2": dict(
        _SMALL,
        mamba_headdim=4,
        n_mamba_heads=16,
        mamba_d_state=8,
        mamba_ngroups=2,
        mamba_d_conv=4,
        mamba_expand=1,
        layers_block_type=["mamba", "hybrid"],
        hybrid_layer_ids=[1],
        attention_head_dim=16,
        use_shared_attention_adapter=False,
        num_mem_blocks=1,
    ),
}
SHORT_CONV = ("lfm2", "lfm2_moe", "lfm3")
MAMBA2 = ("nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "zamba2")
# NemotronHForCausalLM rounds its logits to float32 (`self.lm_head(hidden_states).float()`), so its loss and gradients
# are float32-accurate on both sides (measured with packing alone on one process: loss 3.6e-8, gradients 1.4e-7 of
# their size): 8 float32 ulps, as tests/family_models.py's FLOAT32_GATES; a wrong halo or state would show at 1e-2
FLOAT32_LOGITS = {"nemotron_h": 8 * torch.finfo(torch.float32).eps}
SPLITS = ("heads", "scan")


def _save(family: str, path: str) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **LINEAR_FAMILIES[family]))
    with torch.no_grad():  # decays and strengths that make the state matter over tens of tokens
        for m in model.modules():
            if hasattr(m, "A_log") and hasattr(m, "dt_bias"):
                m.A_log.copy_(torch.linspace(-3.0, -1.0, m.A_log.numel()))
                m.dt_bias.normal_()
            if isinstance(getattr(m, "D", None), torch.nn.Parameter):
                m.D.normal_()
    model.save_pretrained(path)
    return path


def _is_mixer(m) -> bool:
    name = type(m).__name__
    return name.endswith(("GatedDeltaNet", "ShortConv")) or hasattr(m, "A_log") and hasattr(m, "ssm_state_size")


def _load(path: str, dtype=torch.float64):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", experts_implementation="eager"
    )


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
    conv = F.conv1d(mixed.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=kernel - 1, groups=mixed.shape[-1])[
        ..., :t
    ]
    conv = F.silu(conv).transpose(1, 2)
    q, k, v = conv.split([hk * dk, hk * dk, hv * dv], dim=-1)
    q, k = (x.reshape(b, t, hk, dk) for x in (q, k))
    q, k = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    q = q / dk**0.5
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


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _norm_in_dtype(m, x, gate=None):
    """The families' RMSNorms in the model's dtype: Qwen's zero-centred ``x / rms(x) * (1 + w)`` and its Gated
    DeltaNet norm ``w * x / rms(x) * silu(gate)``; the Mamba-2 gated norms (``silu(gate)`` first unless
    ``norm_before_gate``, then per group of ``group_size`` channels); the plain ``w * x / rms(x)``."""
    name = type(m).__name__
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if name.startswith("Qwen3"):
        return m.weight * _rms(x, eps) * F.silu(gate) if name.endswith("Gated") else _rms(x, eps) * (1.0 + m.weight)
    if not name.endswith("Gated"):
        return m.weight * _rms(x, eps)
    before = getattr(m, "norm_before_gate", False)
    if gate is not None and not before:
        x = x * F.silu(gate)
    size = getattr(m, "group_size", None) or x.shape[-1] // m.n_groups
    y = _rms(x.reshape(*x.shape[:-1], -1, size), eps).reshape(x.shape)
    y = m.weight * y
    return y * F.silu(gate) if gate is not None and before else y


def exact_norms(model):
    """These families round every RMSNorm's output to float32 (``x.float()`` inside), so a float64 model is only
    float32-accurate: any 1e-16 difference of order flips a float32 rounding somewhere (measured for Qwen3.5: loss
    within 3e-11, gradients within 1e-7 of their size, the same for both split methods). Both sides of the
    equivalence test compute the norms in float64 instead, so the comparison is float64-tight and isolates HDP's
    packing and splits; :func:`test_float64_norms_are_the_stock_norms` checks each replacement against the stock
    norm and :func:`test_stock_norms_agree_to_float32` runs the stock norms."""
    for m in model.modules():
        if type(m).__name__.endswith(("RMSNorm", "RMSNormGated")):
            m.forward = lambda x, gate=None, _m=m: _norm_in_dtype(_m, x, gate)
    return model


def dense_mamba2_forward(m, hidden_states, cache=None, attention_mask=None, **kwargs):
    """A Mamba-2 mixer's forward, one unpadded sample, in the model's dtype: the selective state space recurrence
    token by token (S_t = exp(dt_t A) S + dt_t x_t B_t^T, y_t = S_t C_t + D x_t) after an explicit causal F.conv1d."""
    b, t, _ = hidden_states.shape
    h = hidden_states * m.ssm_in_multiplier if hasattr(m, "ssm_in_multiplier") else hidden_states
    p = m.in_proj(h)
    if getattr(m, "mup_vector", None) is not None:
        p = p * m.mup_vector
    gate, xbc, dt = p.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
    kernel = m.conv1d.weight.shape[-1]
    xbc = F.silu(
        F.conv1d(xbc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=kernel - 1, groups=m.conv_dim)[..., :t]
    ).transpose(1, 2)
    gn = m.n_groups * m.ssm_state_size
    x, bb, cc = xbc.split([m.intermediate_size, gn, gn], dim=-1)
    heads, groups = m.num_heads, m.n_groups
    x = x.reshape(b, t, heads, m.head_dim)
    bb, cc = (y.reshape(b, t, groups, m.ssm_state_size).repeat_interleave(heads // groups, dim=2) for y in (bb, cc))
    dt = torch.clamp(F.softplus(dt + m.dt_bias), *m.time_step_limit)
    a = -m.A_log.exp()
    s = hidden_states.new_zeros(b, heads, m.head_dim, m.ssm_state_size)
    ys = []
    for i in range(t):
        s = s * (dt[:, i] * a).exp()[..., None, None] + (dt[:, i, :, None] * x[:, i])[..., None] * bb[:, i, :, None, :]
        ys.append((s * cc[:, i, :, None, :]).sum(-1) + m.D[:, None] * x[:, i])
    y = torch.stack(ys, dim=1).reshape(b, t, -1)
    y = m.norm(y, gate) if getattr(m, "mamba_rms_norm", True) else y * F.silu(gate)
    return m.out_proj(y)


def dense_short_conv_forward(m, hidden_states, cache=None, attention_mask=None, **kwargs):
    """LFM2's gated short convolution, one unpadded sample: ``out_proj(C * conv(B * x))`` with an explicit causal
    F.conv1d."""
    t = hidden_states.shape[1]
    b, c, x = m.in_proj(hidden_states).chunk(3, dim=-1)
    kernel = m.conv.weight.shape[-1]
    conv = F.conv1d((b * x).transpose(1, 2), m.conv.weight, m.conv.bias, padding=kernel - 1, groups=x.shape[-1])[
        ..., :t
    ]
    return m.out_proj(c * conv.transpose(1, 2))


def use_dense_reference(model):
    for m in model.modules():
        if type(m).__name__.endswith("ShortConv"):
            m.forward = lambda *a, _m=m, **kw: dense_short_conv_forward(_m, *a, **kw)
        elif type(m).__name__.endswith("GatedDeltaNet"):
            m.forward = lambda *a, _m=m, **kw: dense_delta_net_forward(_m, *a, **kw)
        elif _is_mixer(m):
            m.forward = lambda *a, _m=m, **kw: dense_mamba2_forward(_m, *a, **kw)
    return model


# ---------------------------------------------------------------------------------------- HDP side
def _plans():
    """The naive plan, a random valid plan (rings over 3 and 4 ranks) and a balanced plan of head-parallel pieces
    (Ulysses segments: the layout a hybrid piece's rows have on its members)."""
    cost = CostModel.from_config(
        AutoConfig.for_model("qwen3_5_text", **LINEAR_FAMILIES["qwen3_5_text"]), "cpu", bytes_per_value=8
    )
    return [
        plan_naive(MIXED_LENGTHS, WORLD, C),
        random_plan(MIXED_LENGTHS, WORLD, C, random.Random(5)),
        plan_balanced(MIXED_LENGTHS, WORLD, C, cost, attention_split="ulysses"),
    ]


def _hdp_worker(rank, world_size, paths, plan_jsons, stock_norms=False):
    from hf_hdp.collators import HDPCollator, count_loss_tokens
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import enable_hdp_attention, run_micro_batches

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
                grads = {
                    n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
                    for n, p in model.named_parameters()
                }
                per_plan.append((total, grads if rank == 0 else {k: v.sum() for k, v in grads.items()}, sent))
            out[(family, split)] = per_plan
    return out


def _selected_families(request) -> list[str]:
    """The families the equivalence tests of this session ask for (so ``-k zamba2`` spawns for zamba2 only)."""
    chosen = {
        item.callspec.params["family"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_hybrid_family_gradients_equal_single_device"
    }
    return [f for f in LINEAR_FAMILIES if f in chosen] or list(LINEAR_FAMILIES)


@pytest.fixture(scope="module")
def hdp_runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    paths = {f: _save(f, str(root / f)) for f in _selected_families(request)}
    plans = _plans()
    for plan in plans[:2]:
        assert {1, 3, 4} <= {p.k for p in plan.pieces()}, plan.planner
    assert any(p.ulysses > 1 for p in plans[2].pieces()), "the balanced plan has a head-parallel piece"
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
    loss_rtol, grad_tol = (FLOAT32_LOGITS[family],) * 2 if family in FLOAT32_LOGITS else (LOSS_RTOL, GRAD_TOL)
    for i, plan in enumerate(plans):
        loss, grads, _ = results[0][(family, split)][i]
        assert loss == pytest.approx(ref_loss, rel=loss_rtol), (family, split, plan.planner)
        for name, g in ref_grads.items():
            torch.testing.assert_close(
                grads[name],
                g,
                rtol=grad_tol,
                atol=grad_tol * float(g.abs().max()),
                msg=lambda m: f"{family} {split} {plan.planner} {name}: {m}",
            )
        for r in range(1, WORLD):
            assert results[r][(family, split)][i][0] == pytest.approx(loss, rel=1e-12)


def test_stock_norms_agree_to_float32(tmp_path):
    """With the families' own float32-rounding norms, HDP (both split methods, Qwen3.5) still matches one process to
    float32 accuracy: 8 float32 ulps of the loss and of each gradient's largest element."""
    path = _save("qwen3_5_text", str(tmp_path / "m"))
    plans = _plans()[1:]
    results = run_distributed(
        _hdp_worker, WORLD, {"qwen3_5_text": path}, [p.to_json() for p in plans], True, timeout=600
    )
    ref_loss, ref_grads = reference_step(use_dense_reference(_load(path)), mixed_batch(0))
    tol = 8 * torch.finfo(torch.float32).eps
    for split in SPLITS:
        loss, grads, _ = results[0][("qwen3_5_text", split)][0]
        assert loss == pytest.approx(ref_loss, rel=tol)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=tol, atol=tol * float(g.abs().max()))


def test_split_methods_move_different_bytes(hdp_runs):
    """The two methods really ran: the state scan's messages are not the head-parallel all-to-alls (short
    convolutions have no state: their split is the halo either way)."""
    _, _, results = hdp_runs
    for family in {f for f, _ in results[0]} - set(SHORT_CONV):
        heads = sum(results[r][(family, "heads")][0][2] for r in range(WORLD))
        scan = sum(results[r][(family, "scan")][0][2] for r in range(WORLD))
        assert heads > 0 and scan > 0 and heads != scan, (family, heads, scan)


@pytest.mark.parametrize("family", list(LINEAR_FAMILIES))
def test_dense_reference_matches_the_stock_layer(family, tmp_path):
    """The float64 dense reference is the family's layer: equal to the stock forward (whose kernels compute in
    float32) on one sample, to float32 accuracy."""
    model = _load(_save(family, str(tmp_path / family)), dtype=torch.float32)
    layer = next(m for m in model.modules() if _is_mixer(m))
    hidden = torch.randn(1, 37, 64, generator=torch.Generator().manual_seed(1))
    dense_forward = (
        dense_mamba2_forward
        if family in MAMBA2
        else dense_short_conv_forward
        if family in SHORT_CONV
        else dense_delta_net_forward
    )
    with torch.no_grad():
        stock = layer(hidden)
        dense = dense_forward(layer, hidden)
    torch.testing.assert_close(dense, stock, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(LINEAR_FAMILIES))
def test_float64_norms_are_the_stock_norms(family, tmp_path):
    """:func:`exact_norms` computes each family's norms as the stock ones do (float32 inputs: equal to rounding)."""
    model = _load(_save(family, str(tmp_path / family)), dtype=torch.float32)
    norms = [m for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "RMSNormGated"))]
    assert norms
    gen = torch.Generator().manual_seed(2)
    for m in norms:
        with torch.no_grad():
            m.weight.normal_(generator=gen)
        x = torch.randn(1, 5, m.weight.numel(), generator=gen)
        gated = type(m).__name__.endswith("Gated")
        gate = torch.randn(x.shape, generator=gen) if gated else None
        with torch.no_grad():
            stock = m(x, gate) if gated else m(x)
            ours = _norm_in_dtype(m, x.double(), None if gate is None else gate.double())
        torch.testing.assert_close(ours.float(), stock, rtol=1e-5, atol=1e-5, msg=lambda e: f"{type(m).__name__}: {e}")


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
    layer = next(m for m in model.modules() if _is_mixer(m))
    stock = layer.forward
    layer.forward = lambda *a, **kw: 2 * stock(*a, **kw)
    with pytest.raises(UnsupportedLayerError, match="does not reproduce"):
        enable_hdp_mixers(model)


def test_other_state_space_families_are_refused():
    """Families whose state-carrying layers have no adapter yet stay refused, with the reason."""
    for family in ("minimax", "kimi_linear"):
        with pytest.raises(UnsupportedModelError):
            check_model_supported(AutoConfig.for_model(family), 64)
