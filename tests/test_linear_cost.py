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
_LINEAR = dict(linear_num_key_heads=2, linear_key_head_dim=8, linear_num_value_heads=12, linear_value_head_dim=4,
               linear_conv_kernel_dim=4)
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            layer_types=["linear_attention", "linear_attention"], num_hidden_layers=2, **_LINEAR)
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
        hybrid.attention_time(8192) + hybrid.linear_time(8192) + hybrid.state_local_time(8192), rel=1e-12)
    assert hybrid.sequence_time(8192) == pytest.approx(hybrid.local_time(8192) + hybrid.overhead_time(), rel=1e-12)


def test_a_model_without_state_layers_is_priced_as_before():
    """Llama's figures do not move: no state layers, every layer attention."""
    from transformers import LlamaConfig

    cost = CostModel.from_config(LlamaConfig(), "h100")
    assert cost.layer_states == () and cost.attention_layers == cost.num_layers
    assert cost.sequence_time(4096) == cost.num_layers * (cost.a * 4096 ** 2 + cost.b * 4096 + cost.c)


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
    per_chunk = (2 * c * c * dk  # K K^T
                 + 2 * c * c * dk  # Q K^T
                 + c * c * (dk + dv)  # the unit-triangular solve for U and W
                 + 3 * 2 * c * dk * dv  # W S, Qd S, Kd^T V'
                 + 2 * c * c * dv)  # A V'
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
    from hf_hdp.mesh import DynamicMesh
    from hf_hdp.trainer import enable_hdp_attention, run_micro_batches

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
