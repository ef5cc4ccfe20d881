"""The cost model prices Gated DeltaNet layers (Qwen3.5, Qwen3-Next) as what they are: linear in the sample's length,
with a split sample's exchange counted exactly.

- Pricing: a 3:1 Qwen3.5 model's long sample costs less than an all-attention model of the same shapes, and its
  split pieces too; the per-layer projections and the recurrence's FLOPs are the layers' own; the two split
  methods trade bytes for compute, and the choice flips where the bytes say it should.
- Exactness: ONE spawn of four gloo processes runs a tiny Qwen3.5 whose layers are ALL Gated DeltaNet (so every P2P
  byte on the mesh is theirs) through three plans (naive HDP, a random valid plan, a Ulysses plan), forward and
  backward, for both methods forced; each rank's bytes and messages equal the cost model's estimate summed over
  that rank's segments (float64: 8 bytes a value).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_hdp.planning import StepPlan, plan_balanced, plan_naive
from hf_hdp.planning.cost import CostModel, ModelSpec
from hf_hdp.planning.cost.model import segments_of
from hf_hdp.planning.cost.recurrent import (
    CHUNK,
    conv_flops,
    delta_rule_flops,
    segment_layout,
    state_split_bytes,
    state_split_costs,
    state_split_loads,
)
from hf_hdp.planning.layers import StateShape, layer_state_shapes
from tests.dist_utils import run_distributed
from tests.models import MIXED_LENGTHS, VOCAB, mixed_batch
from tests.plan_helpers import random_plan

WORLD, C = 4, 16
# 12 value heads over 2 key heads: groups of 3 and 4 divide them, so "heads" runs on every split sample
_LINEAR = dict(
    linear_num_key_heads=2,
    linear_key_head_dim=8,
    linear_num_value_heads=12,
    linear_value_head_dim=4,
    linear_conv_kernel_dim=4,
)
TINY = dict(
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
    layer_types=["linear_attention", "linear_attention"],
    num_hidden_layers=2,
    **_LINEAR,
)
TINY_SHAPE = StateShape(2, 8, 12, 4, 4)
SPLITS = ("heads", "scan")


def qwen35(layer_types=None, **kw):
    """The released Qwen3.5-9B text shapes (transformers' defaults): hidden 4096, 32 layers 3:1 linear:full, 16
    attention heads / 4 KV heads of 256, linear 16 key heads x 128 and 32 value heads x 128, kernel 4."""
    extra = {} if layer_types is None else {"layer_types": layer_types}
    return AutoConfig.for_model("qwen3_5_text", **extra, **kw)


# ------------------------------------------------------------------------------------------ pricing
def test_a_hybrid_models_long_sample_is_cheaper_than_all_attention():
    hybrid = CostModel.from_config(qwen35(), "h100")
    dense = CostModel.from_config(qwen35(["full_attention"] * 32), "h100")
    assert hybrid.attention_layers == 8 and hybrid.num_layers == 32 and dense.attention_layers == 32
    assert hybrid.describe_layers().startswith("24 Gated DeltaNet (16x128 key, 32x128 value heads, kernel 4), 8 full")
    # attention is a quarter of the layers: the quadratic term is a quarter of the all-attention model's
    assert hybrid.attention_time(131072) == pytest.approx(dense.attention_time(131072) / 4, rel=1e-12)
    # the longer the sample, the larger attention's share of the all-attention model, and the more the mix saves
    ratios = [hybrid.sequence_time(s) / dense.sequence_time(s) for s in (8192, 65536, 131072, 524288)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] < 1 and ratios[-1] < 0.4, ratios
    group = tuple(range(16))
    for s in (131072, 524288):
        assert hybrid.split_piece_time(s, group) < 0.6 * dense.split_piece_time(s, group)
        assert hybrid.split_piece_time(s, group, 4) < 0.6 * dense.split_piece_time(s, group, 4)
    # the state layers are linear in s (to whole chunks) and part of the sequence's time
    t1, t2 = hybrid.state_local_time(64 * 1000), hybrid.state_local_time(64 * 2000)
    assert t2 == pytest.approx(2 * t1, rel=1e-12) and t1 > 0
    assert hybrid.local_time(8192) == pytest.approx(
        hybrid.attention_time(8192) + hybrid.linear_time(8192) + hybrid.state_local_time(8192), rel=1e-12
    )
    assert hybrid.sequence_time(8192) == pytest.approx(hybrid.local_time(8192) + hybrid.overhead_time(), rel=1e-12)


def test_a_model_without_state_layers_is_priced_as_before():
    """Llama's figures do not move: no state layers, every layer attention."""
    from transformers import LlamaConfig

    cost = CostModel.from_config(LlamaConfig(), "h100")
    assert cost.layer_states == () and cost.attention_layers == cost.num_layers
    assert cost.sequence_time(4096) == cost.num_layers * (cost.a * 4096**2 + cost.b * 4096 + cost.c)


def test_gated_deltanet_projections_replace_the_attention_ones():
    spec = ModelSpec.from_config(qwen35())
    h, i = 4096, 12288
    st = StateShape(16, 128, 32, 128, 4)
    chan = 2 * 16 * 128 + 32 * 128
    gdn = h * chan + h * 32 * 128 + 2 * h * 32 + 32 * 128 * h + chan * 4
    attention = h * 16 * 256 * 2 + 2 * h * 4 * 256 + 16 * 256 * h  # q (with its output gate), k, v, o
    assert spec.state_layer_params(st) == gdn
    assert spec.layer_params == pytest.approx((24 * gdn + 8 * attention) / 32 + 3 * h * i, rel=1e-12)
    assert layer_state_shapes(qwen35()) == [st if (j + 1) % 4 else None for j in range(32)]
    assert 8.9e9 < spec.num_params < 9.1e9  # Qwen3.5-9B's text model
    # a mixture of experts: the routed and shared experts a token uses, the others as weights only
    moe = ModelSpec.from_config(AutoConfig.for_model("qwen3_5_moe_text"))
    assert moe.intermediate_size == 8 * 512 + 512 and moe.inactive_params_per_layer > 0 and moe.num_state_layers == 30


def test_delta_rule_flops_count_the_chunked_algorithm():
    """The forward's matrix products, per chunk of 64 rows and head, as delta_rule.py computes them."""
    c, dk, dv = CHUNK, 128, 128
    per_chunk = (
        2 * c * c * dk  # K K^T
        + 2 * c * c * dk  # Q K^T
        + c * c * (dk + dv)  # the unit-triangular solve for U and W
        + 3 * 2 * c * dk * dv  # W S, Qd S, Kd^T V'
        + 2 * c * c * dv
    )  # A V'
    assert delta_rule_flops(64, 1, dk, dv) == per_chunk
    assert delta_rule_flops(65, 3, dk, dv) == 2 * 3 * per_chunk  # padded to whole chunks
    assert delta_rule_flops(0, 3, dk, dv) == 0
    assert delta_rule_flops(128, 2, dk, dv, scan=True) > delta_rule_flops(128, 2, dk, dv)


def test_split_bytes_follow_the_pieces_layout():
    """By hand, one document of 100 rows on 2 members (zigzag: member 0 holds [0, 25) and [75, 100), member 1
    [25, 75)), the tiny shape (C = 2*2*8 + 12*4 = 80 channels, kernel 4)."""
    sh, n = TINY_SHAPE, 100
    assert segment_layout((n,), 2) == (((0, 0, 25), (1, 25, 75), (0, 75, 100)),)
    # scan: member 1's piece needs 3 halo rows of member 0, member 0's second piece 3 of member 1; member 0 sends
    # its 2 pieces' states (12 heads x 8 x (8 + 4)) to member 1, which sends its 1 piece's; backward the reverse
    state = 12 * 8 * 12
    assert state_split_bytes((n,), 2, 1, sh, "scan", 0, 1) == (3 * 80 + 2 * state) + (3 * 80 + 1 * state)
    assert state_split_bytes((n,), 2, 1, sh, "scan", 1, 1) == (3 * 80 + 1 * state) + (3 * 80 + 2 * state)
    # heads: each member keeps 6 value heads (1 key head); member 0 sends its 50 rows of member 1's columns
    # (2*8 + 6*4 + 2*6 = 52) and gets back member 1's 50 rows of its 6*4 outputs, and the reverse
    w, o = 2 * 8 + 6 * 4 + 2 * 6, 6 * 4
    for m in (0, 1):
        assert state_split_bytes((n,), 2, 1, sh, "heads", m, 1) == 2 * (50 * w + 50 * o)
    loads = state_split_loads((n,), 2, 1, sh, "scan")
    assert [ld.messages for ld in loads] == [4, 4]  # halo and states, forward; and each back in backward
    # the heads member's recurrence is its heads' share; the scan's adds transitions and one read-out
    heads = state_split_loads((n,), 2, 1, sh, "heads")
    assert heads[0].flops == delta_rule_flops(n, 6, 8, 4) + conv_flops(n, 2 * 8 + 6 * 4, 4)


def test_the_choice_flips_where_the_bytes_say():
    """Head-parallel moves every row's channels (bytes grow with s/k); the scan moves each piece's state (bytes
    fixed by k). So on a Qwen3.5 layer, short pieces over many members go head-parallel, long pieces scan."""
    cost = CostModel.from_config(qwen35(), "h100")
    st = StateShape(16, 128, 32, 128, 4)
    short = cost.state_methods([4096], 32)[st]
    long = cost.state_methods([1 << 20], 32)[st]
    assert (short, long) == ("heads", "scan")
    b = {m: state_split_bytes((4096,), 32, 1, st, m, 0) for m in SPLITS}
    assert b["heads"] < b["scan"]
    b = {m: state_split_bytes((1 << 20,), 32, 1, st, m, 0) for m in SPLITS}
    assert b["scan"] < b["heads"]
    # the runtime's choice (choose_split's costs) agrees with the cost model on the same hardware
    for s in (4096, 1 << 20):
        costs = state_split_costs((s,), 32, 16, 128, 32, 128, 4, "h100")
        assert min(costs, key=lambda m: (costs[m].seconds, m)) == cost.state_methods([s], 32)[st]
    # a forced method, and a group size that does not divide the value heads (the scan runs)
    heads_only = CostModel(**{**_fields(cost), "state_split": "heads"})
    assert heads_only.state_methods([1 << 20], 32)[st] == "heads"
    assert heads_only.state_methods([1 << 20], 3)[st] == "scan"


def _fields(cost: CostModel) -> dict:
    import dataclasses

    return {f.name: getattr(cost, f.name) for f in dataclasses.fields(cost)}


def test_the_planner_gives_a_hybrid_models_long_samples_fewer_rank_seconds():
    """On the same batch, the balanced plan of the 3:1 model is estimated faster than the all-attention model's."""
    lengths = [262144, 65536, 32768] + [4096] * 40 + [1024] * 100
    hybrid = CostModel.from_config(qwen35(), "h100")
    dense = CostModel.from_config(qwen35(["full_attention"] * 32), "h100")
    t_h = plan_balanced(lengths, 64, 16384, hybrid).meta["estimated_step_time_s"]
    t_d = plan_balanced(lengths, 64, 16384, dense).meta["estimated_step_time_s"]
    assert t_h < 0.7 * t_d


# --------------------------------------------------------------------------- bytes on the mesh = estimate
def _save(path: str) -> str:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_5_text", **TINY)).save_pretrained(path)
    return path


def _worker(rank, world_size, path, plan_jsons):
    from hf_hdp.collators import HDPCollator, count_loss_tokens
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import enable_hdp_attention, run_micro_batches

    torch.set_num_threads(1)
    mesh = DynamicMesh()
    samples = dict(enumerate(mixed_batch(0)))
    n_loss = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in samples.values())
    plans = [StepPlan.from_json(pj) for pj in plan_jsons]
    collator = HDPCollator(vocab_size=VOCAB)
    out = {}
    for split in SPLITS:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
        enable_hdp_attention(model, split)
        for i, plan in enumerate(plans):
            mesh.check_plan(plan.fingerprint(), 0)
            model.zero_grad(set_to_none=True)
            bytes0, messages0 = mesh.stats.bytes_sent, mesh.stats.messages_sent
            micro = [collator(mb, samples) for mb in plan.for_rank(rank)]
            run_micro_batches(model, micro, n_loss, mesh, "reference", torch.device("cpu"))
            out[split, i] = (mesh.stats.bytes_sent - bytes0, mesh.stats.messages_sent - messages0)
    return out


def _plans():
    cost = CostModel.from_config(AutoConfig.for_model("qwen3_5_text", **TINY), "cpu", bytes_per_value=8)
    ulysses = plan_balanced(MIXED_LENGTHS, WORLD, C, cost, attention_split="ulysses")
    return [plan_naive(MIXED_LENGTHS, WORLD, C), random_plan(MIXED_LENGTHS, WORLD, C, random.Random(5)), ulysses]


def _estimate(cost: CostModel, plan: StepPlan, rank: int) -> tuple[int, int]:
    """Bytes and messages ``rank`` sends in the plan's step, from the cost model, summed over its segments."""
    sent = messages = 0
    for mb in plan.for_rank(rank):
        for seg in segments_of(mb.pieces):
            if len(seg.group) > 1:
                member = seg.group.index(rank)
                sent += cost.segment_bytes_by_member(seg.lengths, len(seg.group), seg.ulysses)[member]
                messages += cost.segment_messages_by_member(seg.lengths, len(seg.group), seg.ulysses)[member]
    return int(sent), messages


def test_p2p_bytes_of_the_linear_layers_equal_the_estimate(tmp_path):
    plans = _plans()
    assert {1, 3, 4} <= {p.k for p in plans[0].pieces()}
    assert any(p.ulysses > 1 for p in plans[2].pieces()), "the Ulysses plan has a head-parallel piece"
    results = run_distributed(_worker, WORLD, _save(str(tmp_path / "m")), [p.to_json() for p in plans], timeout=600)
    config = AutoConfig.for_model("qwen3_5_text", **TINY)
    base = CostModel.from_config(config, "cpu", bytes_per_value=8)  # float64 on the wire
    assert base.attention_layers == 0 and base.state_value_bytes == 8
    for split in SPLITS:
        cost = CostModel(**{**_fields(base), "state_split": split})
        for i, plan in enumerate(plans):
            total = 0
            for rank in range(WORLD):
                got = results[rank][split, i]
                assert got == _estimate(cost, plan, rank), (split, plan.planner, rank)
                total += got[0]
            assert total > 0


# ------------------------------------------------------- Mamba-2 and short convolutions: bytes on the mesh = estimate
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
# every layer a state mixer, so every P2P byte on the mesh is theirs: Nemotron-H's Mamba-2 (12 heads of 4 over 2 groups
# of state 8: groups of 3 and 4 divide the heads, so "heads" runs on every split sample) and LFM2's short convolution
# (kernel 3: a halo of 2 rows)
MIXER_MODELS = {
    "nemotron_h": (
        dict(
            _SMALL,
            head_dim=16,
            layer_types=["mamba", "mamba"],
            mamba_num_heads=12,
            mamba_head_dim=4,
            ssm_state_size=8,
            n_groups=2,
            conv_kernel=4,
            use_conv_bias=True,
            chunk_size=16,
        ),
        SPLITS,
    ),
    "lfm2": (dict(_SMALL, layer_types=["conv", "conv"], conv_L_cache=3, conv_bias=True), ("auto",)),
}


def _mixer_worker(rank, world_size, paths, plan_jsons):
    from hf_hdp.collators import HDPCollator, count_loss_tokens
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import enable_hdp_attention, run_micro_batches

    torch.set_num_threads(1)
    mesh = DynamicMesh()
    samples = dict(enumerate(mixed_batch(0)))
    n_loss = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in samples.values())
    collator = HDPCollator(vocab_size=VOCAB)
    out = {}
    for family, path in paths.items():
        plans = [StepPlan.from_json(pj) for pj in plan_jsons[family]]
        for split in MIXER_MODELS[family][1]:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
            enable_hdp_attention(model, split)
            for i, plan in enumerate(plans):
                mesh.check_plan(plan.fingerprint(), 0)
                model.zero_grad(set_to_none=True)
                bytes0, messages0 = mesh.stats.bytes_sent, mesh.stats.messages_sent
                micro = [collator(mb, samples) for mb in plan.for_rank(rank)]
                run_micro_batches(model, micro, n_loss, mesh, "reference", torch.device("cpu"))
                out[family, split, i] = (mesh.stats.bytes_sent - bytes0, mesh.stats.messages_sent - messages0)
    return out


def test_p2p_bytes_of_mamba2_and_short_convolutions_equal_the_estimate(tmp_path):
    """Nemotron-H's Mamba-2 layers (both methods forced) and LFM2's short convolutions (their halo), on 4 gloo ranks:
    each rank's bytes and messages equal the cost model's, per segment, summed (float64: 8 bytes a value)."""
    paths, plans, configs = {}, {}, {}
    for family, (kw, _) in MIXER_MODELS.items():
        configs[family] = AutoConfig.for_model(family, **kw)
        torch.manual_seed(0)
        paths[family] = str(tmp_path / family)
        AutoModelForCausalLM.from_config(configs[family]).save_pretrained(paths[family])
        cost = CostModel.from_config(configs[family], "cpu", bytes_per_value=8)
        assert cost.attention_layers == 0 and cost.num_layers == 2
        plans[family] = [
            plan_naive(MIXED_LENGTHS, WORLD, C),
            random_plan(MIXED_LENGTHS, WORLD, C, random.Random(5)),
            plan_balanced(MIXED_LENGTHS, WORLD, C, cost, attention_split="ulysses"),
        ]
    assert CostModel.from_config(configs["nemotron_h"], "cpu").layer_states[0] == StateShape(2, 8, 12, 4, 4, "ssd")
    assert CostModel.from_config(configs["lfm2"], "cpu").layer_states[0] == StateShape(0, 0, 1, 64, 3, "conv")
    results = run_distributed(
        _mixer_worker, WORLD, paths, {f: [p.to_json() for p in ps] for f, ps in plans.items()}, timeout=600
    )
    for family, (_, splits) in MIXER_MODELS.items():
        base = CostModel.from_config(configs[family], "cpu", bytes_per_value=8)
        assert any(p.ulysses > 1 for p in plans[family][2].pieces())
        for split in splits:
            cost = CostModel(**{**_fields(base), "state_split": split})
            for i, plan in enumerate(plans[family]):
                total = 0
                for rank in range(WORLD):
                    got = results[rank][family, split, i]
                    assert got == _estimate(cost, plan, rank), (family, split, plan.planner, rank)
                    total += got[0]
                assert total > 0, (family, split, i)


# ------------------------------------------------------------------------ Mamba-2 and short convolutions: pricing
def test_each_family_reads_its_mixers_shapes_and_blocks():
    """The StateShape of every Mamba-2 family's layers is its mixer module's (n_groups, ssm_state_size, num_heads,
    head_dim, kernel); hybrid layers hold attention and a mixer; Nemotron-H's layers hold one block each."""
    from hf_hdp.planning.layers import layer_blocks
    from tests.test_linear_families import LINEAR_FAMILIES, MAMBA2

    for family in MAMBA2:
        config = AutoConfig.for_model(family, **LINEAR_FAMILIES[family])
        model = AutoModelForCausalLM.from_config(config)
        mixers = [m for m in model.modules() if hasattr(m, "A_log") and hasattr(m, "ssm_state_size")]
        shapes = [st for st in layer_state_shapes(config) if st]
        assert len(shapes) == len(mixers) > 0, family
        for st, m in zip(shapes, mixers):
            assert st == StateShape(
                m.n_groups, m.ssm_state_size, m.num_heads, m.head_dim, m.conv1d.kernel_size[0], "ssd"
            ), family
            assert st.channels == m.conv_dim and st.value_heads * st.value_dim == m.intermediate_size
    falcon = ModelSpec.from_config(AutoConfig.for_model("falcon_h1", **LINEAR_FAMILIES["falcon_h1"]))
    assert falcon.num_attention_layers == 2 and falcon.num_state_layers == 2  # every layer both
    zamba = CostModel.from_config(AutoConfig.for_model("zamba2", **LINEAR_FAMILIES["zamba2"]), "h100")
    assert zamba.attention_layer_index == (1,) and zamba.describe_layers().startswith("1 Mamba-2 (2 groups x 8 state")
    assert "1 hybrid (full attention + Mamba-2" in zamba.describe_layers()
    nem = AutoConfig.for_model("nemotron_h")  # released shapes: Mamba-2, MoE, attention and MLP layers
    blocks = layer_blocks(nem, 1, 0)
    kinds = list(nem.layers_block_type)
    for b, kind in zip(blocks, kinds):
        assert b.attention == (kind == "full_attention") and (b.state is not None) == (kind == "linear_attention")
        assert (b.mlp > 0) == (kind in ("mlp", "moe")) and (b.inactive > 0) == (kind == "moe")
    cost = CostModel.from_config(nem, "h100")
    assert "MLP only" in cost.describe_layers() and cost.attention_layers == kinds.count("full_attention")


def test_mamba2_and_short_convolutions_are_priced_linear_in_s():
    """A Bamba-shaped model (all Mamba-2) and an LFM2-shaped one (short convolutions): no quadratic term on their state
    layers, linear in s to whole chunks, and the SSD recurrence is the chunked algorithm without the delta."""
    from hf_hdp.planning.cost.recurrent import local_state_flops, ssd_flops

    bamba = CostModel.from_config(AutoConfig.for_model("bamba"), "h100")
    assert bamba.attention_layers == 0 and bamba.attention_time(1 << 20) == 0
    t1, t2 = bamba.state_local_time(64 * 1000), bamba.state_local_time(64 * 2000)
    assert t2 == pytest.approx(2 * t1, rel=1e-12) and t1 > 0
    c, dk, dv = CHUNK, 128, 64
    per_chunk = 2 * c * c * dk + 2 * c * c * dv + 2 * 2 * c * dk * dv  # Q K^T, A V, Qd S, Kd^T V
    assert ssd_flops(64, 1, dk, dv) == per_chunk + 2 * 64 * dv  # and the skip D x
    assert ssd_flops(64, 1, dk, dv) < delta_rule_flops(64, 1, dk, dv)  # no triangular solve, no W
    conv = StateShape(0, 0, 1, 2048, 3, "conv")
    assert local_state_flops(1000, conv) == conv_flops(1000, 2048, 3)
    lfm = ModelSpec.from_config(
        AutoConfig.for_model("lfm2", layer_types=["conv", "full_attention"] * 8, num_hidden_layers=16)
    )
    h = lfm.hidden_size
    assert lfm.num_state_layers == 8 and lfm.state_layer_params(lfm.layer_states[0]) == 4 * h * h + h * 3
    cost = CostModel.from_specs(lfm, __import__("hf_hdp.planning.cost", fromlist=["x"]).HARDWARE_PRESETS["h100"])
    dense = CostModel.from_config(AutoConfig.for_model("lfm2", num_hidden_layers=16), "h100")
    assert cost.attention_time(1 << 17) == pytest.approx(dense.attention_time(1 << 17) / 2, rel=1e-12)
    assert cost.sequence_time(1 << 17) < 0.75 * dense.sequence_time(1 << 17)


def test_short_convolution_halo_by_hand():
    """One document of 100 rows on 2 members (member 0: [0, 25) and [75, 100); member 1: [25, 75)), kernel 3: member 1
    receives 2 halo rows of member 0 and sends 2 back to member 0's second piece; nothing else, no heads method."""
    from hf_hdp.planning.cost.recurrent import resolve_method, state_split_messages

    sh = StateShape(0, 0, 1, 64, 3, "conv")
    for m in (0, 1):
        assert state_split_bytes((100,), 2, 1, sh, "halo", m, 1) == (2 * 64) + (2 * 64)  # forward, and backward
        assert state_split_messages((100,), 2, 1, sh, "halo", m) == 2
    assert resolve_method("heads", 2, sh) == resolve_method("auto", 2, sh) == "halo"
    assert list(state_split_costs((100,), 2, 0, 0, 1, 64, 3, "cpu", kind="conv")) == ["halo"]
    # three documents on 4 members: each piece needs the 2 positions before it (fewer at a document's start), sent
    # by their owner when that is another member; in backward each comes back as a gradient
    docs = segment_layout((5, 100, 7), 4)
    halo = 0
    for doc in docs:
        owner = {pos: m for m, a, b in doc for pos in range(a, b)}
        halo += sum(1 for m, a, _ in doc for pos in range(max(0, a - 2), a) if owner[pos] != m)
    loads = state_split_loads((5, 100, 7), 4, 1, sh, "halo")
    assert halo > 0 and sum(ld.sent for ld in loads) == 2 * 64 * halo
    assert all(ld.sent == ld.received for ld in loads)


def test_mamba2_split_choice_uses_its_own_flops():
    """The runtime's choice for a Mamba-2 layer prices SSD's recurrence (kind "ssd"): the scan's extra work is the
    read-out alone (its transition is a product of decays), so it wins earlier than a Gated DeltaNet layer's."""
    ssd = StateShape(8, 128, 128, 64, 4, "ssd")
    delta = StateShape(8, 128, 128, 64, 4)
    loads = {kind: state_split_loads((1 << 16,), 8, 1, st, "scan") for kind, st in (("ssd", ssd), ("delta", delta))}
    assert all(a.sent == b.sent and a.messages == b.messages for a, b in zip(loads["ssd"], loads["delta"]))
    assert max(ld.flops for ld in loads["ssd"]) < 0.6 * max(ld.flops for ld in loads["delta"])
    costs = state_split_costs((1 << 16,), 8, 8, 128, 128, 64, 4, "h100", kind="ssd")
    cost = CostModel.from_config(AutoConfig.for_model("bamba"), "h100")
    st = cost.layer_states[0]
    assert min(costs, key=lambda m: (costs[m].seconds, m)) in ("heads", "scan")
    for s in (2048, 1 << 20):
        costs = state_split_costs((s,), 8, *st[:5], "h100", kind="ssd")
        assert min(costs, key=lambda m: (costs[m].seconds, m)) == cost.state_methods([s], 8)[st]


def test_state_layers_activation_memory():
    """The state layers' saved activations enter the memory estimate: an all-Mamba-2 or short-convolution model keeps
    per token what its mixers' projections, convolution and chunk quantities hold; capacity follows."""
    from hf_hdp.planning.cost.memory import (
        layer_activation_bytes,
        layer_activation_bytes_per_token,
        state_activation_bytes_per_token,
        tokens_per_rank_for_memory,
    )

    spec = ModelSpec.from_config(AutoConfig.for_model("bamba"))  # 32 Mamba-2 layers, bf16
    st = spec.layer_states[0]
    h, hv, dk, dv, c = spec.hidden_size, st.value_heads, st.key_dim, st.value_dim, st.channels
    expected = 2 * (2 * hv * dv + c + hv) + 4 * (
        2 * c + hv * (2 * dk + dv) + hv * (2 * dk + CHUNK) + hv * dv + hv * dk * dv / CHUNK
    )
    assert state_activation_bytes_per_token(st, h, 2) == expected
    per_layer = 2 * 2 * h + expected + 2 * (2 * h + 4 * spec.intermediate_size)
    assert layer_activation_bytes(spec, 0) == per_layer == layer_activation_bytes_per_token(spec)
    # the same shapes with attention layers: a Mamba-2 layer keeps more per token than the attention it replaces
    attention = ModelSpec.from_config(AutoConfig.for_model("bamba", attn_layer_indices=list(range(32))))
    assert attention.num_state_layers == 0 and layer_activation_bytes_per_token(attention) < per_layer
    fit = [
        tokens_per_rank_for_memory(m, 80e9, checkpointing=False, world_size=64, zero_stage=1) for m in (spec, attention)
    ]
    assert fit[0] < fit[1]
    conv = StateShape(0, 0, 1, 2048, 3, "conv")
    assert state_activation_bytes_per_token(conv, 2048, 2) == 2 * 5 * 2048 + 4 * 2 * 2048
    # a model without state layers keeps its figure exactly
    from transformers import LlamaConfig

    llama = ModelSpec.from_config(LlamaConfig())
    assert layer_activation_bytes_per_token(llama) == 2 * (8 * 4096 + 4 * 11008) + 4 * 32
