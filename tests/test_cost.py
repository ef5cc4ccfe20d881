"""Cost model: scaling of its terms, ring communication, fitting and calibration, configs, memory."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from dataclasses import fields, replace

import pytest

from hf_hdp.planning import MicroBatch, Piece
from hf_hdp.planning.cost import (
    BYTESCALE_LAYER_MS,
    FWD_BWD,
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    CostModel,
    HardwareSpec,
    ModelSpec,
    activation_bytes_per_token,
    bytescale_fit,
    bytescale_hardware,
    calibrate,
    fit_coefficients,
    hardware_from_coefficients,
    layer_activation_bytes_per_token,
    memory_per_rank,
    model_state_bytes,
    relative_residuals,
    tokens_per_rank_for_memory,
)

FREE_COMM = dict(kv_bytes_per_token=1024, intra_bandwidth=math.inf, inter_bandwidth=math.inf)


# ------------------------------------------------------------------ the terms


@pytest.mark.parametrize(
    "cost", [CostModel.default(), CostModel.bytescale(), CostModel(2e-9, 3e-6, 1e-4, num_layers=7)]
)
def test_attention_term_is_quadratic_and_linear_term_linear(cost):
    s = 3000
    att = [cost.attention_time(s * m) for m in (1, 2, 4)]
    lin = [cost.linear_time(s * m) for m in (1, 2, 4)]
    assert att[1] / att[0] == pytest.approx(4.0) and att[2] / att[0] == pytest.approx(16.0)
    assert lin[1] / lin[0] == pytest.approx(2.0) and lin[2] / lin[0] == pytest.approx(4.0)
    # the whole sequence is exactly attention + linear + overhead
    for m in (1, 2, 4):
        assert cost.sequence_time(s * m) == pytest.approx(
            cost.attention_time(s * m) + cost.linear_time(s * m) + cost.overhead_time()
        )
    # and the quadratic term takes over: its share grows with the length
    shares = [cost.attention_time(x) / cost.sequence_time(x) for x in (1000, 10_000, 100_000)]
    assert shares[0] < shares[1] < shares[2]


def test_default_model_is_llama7b_on_h100_with_published_crossover_scale():
    cost = CostModel.default()
    m, hw = MODEL_PRESETS["llama-7b"], HARDWARE_PRESETS["h100"]
    assert cost.num_layers == 32 and cost.kv_bytes_per_token == 2 * 32 * 128 * 2
    # a: 6·H·D FLOPs per s² over the attention rate; b: 6·(layer params + head share) per token
    assert cost.a == pytest.approx(6 * 32 * 128 / (989e12 * 0.45))
    assert cost.b == pytest.approx(6 * (m.layer_params + 32000 * 4096 / 32) / (989e12 * 0.60))
    assert cost.c == hw.overhead_per_layer
    assert cost.grad_bytes == m.num_params * 4
    # attention overtakes the linear layers in the 10K-50K range for the fwd+bwd roofline
    assert 10_000 < cost.b / cost.a < 50_000


def test_piece_time_splits_compute_k_ways_when_communication_is_free():
    cost = CostModel(1e-9, 2e-6, 0.0, num_layers=4, **FREE_COMM)
    for s in (1000, 8192, 100_000):
        for k in (2, 3, 5, 8):
            assert cost.piece_time(s, k) == pytest.approx(cost.sequence_time(s) / k)
            assert cost.piece_time(s, k) == pytest.approx(cost.piece_compute_time(s, k))
    assert cost.piece_time(5000, 1) == cost.sequence_time(5000)
    # the overhead c is paid once by every member, not split
    with_c = CostModel(1e-9, 2e-6, 3e-4, num_layers=4, **FREE_COMM)
    assert with_c.piece_time(8192, 4) == pytest.approx(with_c.sequence_time(8192) / 4 + 0.75 * 4 * 3e-4)


def test_communication_is_exposed_when_bandwidth_is_tiny():
    L, kvb, vb, bw = 3, 1000.0, 2, 1e6
    cost = CostModel(
        1e-12, 1e-9, 0.0, num_layers=L, kv_bytes_per_token=kvb, value_bytes=vb, intra_bandwidth=bw, inter_bandwidth=bw
    )
    s, k = 4000, 4
    n = s / k
    compute = cost.piece_compute_time(s, k)
    t_kv, t_grad = n * kvb / bw, n * kvb * 2 / bw  # dK/dV in float32: twice the bf16 bytes
    block = cost.a * s * s / k**2
    expected = L * ((k - 1) * (t_kv - block / 3) + (k - 1) * (t_kv - 2 * block / 3) + k * t_grad)
    assert cost.piece_time(s, k) - compute == pytest.approx(expected, rel=1e-9)
    assert cost.piece_time(s, k) > 100 * compute
    # more ranks only add hops once communication dominates
    assert cost.piece_time(s, 8) > cost.piece_time(s, 4) > cost.piece_time(s, 2)


def test_hops_hide_behind_large_blocks_except_the_exposed_gradient_hops():
    L, kvb, bw, lat = 2, 100.0, 1e9, 1e-5
    cost = CostModel(1e-9, 0.0, 0.0, num_layers=L, kv_bytes_per_token=kvb, intra_bandwidth=bw, intra_latency=lat)
    s, k = 80_000, 4
    t_grad = lat + (s / k) * kvb * 2 / bw
    assert cost.piece_time(s, k) - cost.piece_compute_time(s, k) == pytest.approx(L * k * t_grad)
    overlapped = replace(cost, overlap_grad_hops=True)
    assert overlapped.piece_time(s, k) - overlapped.piece_compute_time(s, k) == pytest.approx(L * t_grad)


def test_groups_across_nodes_use_the_slower_link():
    cost = CostModel.default()  # 8 ranks per node
    assert not cost.group_spans_nodes((0, 1, 7)) and cost.group_spans_nodes((6, 7, 8, 9))
    assert cost.piece_time(64_000, 4, spans_nodes=True) > cost.piece_time(64_000, 4, spans_nodes=False)


def test_ring_bytes_and_exact_per_member_bytes_agree_with_the_ring_messages():
    cost = CostModel(0, 0, 0, num_layers=3, kv_bytes_per_token=10, value_bytes=2)
    for s, k in [(1000, 4), (1001, 3), (7, 5), (5, 4)]:
        per_member = cost.segment_bytes_by_member([s], k)
        # forward and backward: k-1 K/V messages; k float32 dK/dV accumulators; summed over members exactly
        assert sum(per_member) == pytest.approx(3 * 10 * s * (2 * (k - 1) + k * 2))
        assert sum(per_member) == pytest.approx(k * cost.ring_bytes(s, k))
        assert cost.segment_bytes_sent([s], k, 1) == per_member[1]
    # a member sends everything but the rows of its successor, twice, and all the rows once as dK/dV
    assert cost.segment_bytes_by_member([10], 2) == [3 * 10 * (2 * 5 + 10 * 2)] * 2
    assert cost.segment_messages(4) == 3 * (3 + 3 + 4) and cost.segment_messages(1) == 0
    assert cost.ring_bytes(100, 1) == 0


def test_micro_batch_time_shares_one_ring_segment_per_group():
    cost = CostModel(1e-9, 1e-6, 2e-4, num_layers=4, kv_bytes_per_token=4096, intra_bandwidth=1e9, intra_latency=1e-3)
    g = (0, 1, 2)
    one = MicroBatch(0, 0, (Piece(0, 3000, g),))
    assert cost.micro_batch_time(one) == pytest.approx(cost.piece_time(3000, 3))
    local = MicroBatch(0, 0, (Piece(1, 500, (0,)),))
    assert cost.micro_batch_time(local) == pytest.approx(cost.sequence_time(500))
    # two pieces on the same group: one segment, one set of messages (latency paid once)
    both = MicroBatch(0, 0, (Piece(0, 3000, g), Piece(2, 1500, g)))
    assert cost.micro_batch_time(both) == pytest.approx(cost.overhead_time() + cost.segment_time([3000, 1500], 3))
    assert cost.micro_batch_time(both) < cost.piece_time(3000, 3) + cost.piece_time(1500, 3) - cost.overhead_time()
    # a local sequence next to it adds its own compute only
    mixed = MicroBatch(0, 0, (Piece(0, 3000, g), Piece(1, 500, (0,)), Piece(2, 1500, g)))
    assert cost.micro_batch_time(mixed) == pytest.approx(cost.micro_batch_time(both) + cost.local_time(500))
    total, comm = cost.micro_batch_breakdown(mixed)
    assert 0 < comm < total
    # a different group is a second segment
    other = MicroBatch(0, 0, (Piece(0, 3000, g), Piece(2, 1500, (0, 2, 1))))
    assert cost.micro_batch_time(other) > cost.micro_batch_time(both)


def test_allreduce_time():
    cost = CostModel(
        0,
        0,
        0,
        intra_bandwidth=100.0,
        intra_latency=0.5,
        ranks_per_node=8,
        inter_bandwidth=10.0,
        inter_latency=1.0,
        grad_bytes=1000.0,
    )
    assert cost.allreduce_time(None, 1) == 0
    assert cost.allreduce_time(None, 4) == pytest.approx(2 * 3 / 4 * 1000 / 100 + 2 * 2 * 0.5)
    assert cost.allreduce_time(None, 16) == pytest.approx(2 * 15 / 16 * 1000 / 10 + 2 * 4 * 1.0)
    assert cost.allreduce_time(0, 16) == 0
    assert CostModel(0, 0, 0).allreduce_time(None, 16) == 0  # grad bytes unknown: not modelled


# ------------------------------------------------------------------ fitting


def _synthetic(a, b, c, L, lengths, noise, seed=0):
    rng = random.Random(seed)
    out = []
    for item in lengths:
        s2 = item * item if isinstance(item, int) else sum(x * x for x in item)
        s1 = item if isinstance(item, int) else sum(item)
        out.append(L * (a * s2 + b * s1 + c) * (1 + rng.uniform(-noise, noise)))
    return out


@pytest.mark.parametrize("relative", [False, True])
def test_fit_coefficients_recovers_known_coefficients(relative):
    a, b, c, L = 9.9e-8, 1.4e-5, 1.2e-3, 4  # about this machine's CPU figures
    lengths = [64, 128, 256, 384, 512, 768, 1024, 1536, 2048]
    exact = fit_coefficients(lengths, _synthetic(a, b, c, L, lengths, 0.0), L, relative=relative)
    assert exact == pytest.approx((a, b, c), rel=1e-6)
    noisy = fit_coefficients(lengths, _synthetic(a, b, c, L, lengths, 0.01), L, relative=relative)
    assert noisy[0] == pytest.approx(a, rel=0.03)
    assert noisy[1] == pytest.approx(b, rel=0.05)
    assert noisy[2] == pytest.approx(c, rel=0.10 if relative else 0.5)  # absolute fits hardly see c


def test_fit_on_gpu_scale_lengths_and_packed_micro_batches():
    a, b, c, L = 2.7e-11, 1.07e-6, 3e-4, 32
    lengths = [1024, 4096, 8192, 16384, 32768, 65536, (256,) * 32, (512,) * 16]
    fit = fit_coefficients(lengths, _synthetic(a, b, c, L, lengths, 0.01, seed=3), L, relative=True)
    assert fit == pytest.approx((a, b, c), rel=0.05)


def test_fit_never_returns_negative_coefficients():
    lengths = [100, 200, 400, 800]
    a, b, c = fit_coefficients(lengths, [2e-4 * s for s in lengths])  # purely linear data
    assert a == pytest.approx(0, abs=1e-15) and b == pytest.approx(2e-4) and c >= 0
    with pytest.raises(ValueError):
        fit_coefficients([1, 2], [1.0, 2.0])


def test_calibrate_recovers_coefficients_from_a_noisy_measure():
    a, b, c, L = 1e-7, 1.5e-5, 1e-3, 4
    rng = random.Random(7)
    calls = []

    def measure(item):
        calls.append(item)
        s2 = item * item if isinstance(item, int) else sum(x * x for x in item)
        s1 = item if isinstance(item, int) else sum(item)
        return L * (a * s2 + b * s1 + c) * (1 + rng.uniform(-0.01, 0.01))

    base = CostModel.from_specs(
        ModelSpec("tiny", 128, 4, 4, 2, 336, 2048, tie_word_embeddings=True), HARDWARE_PRESETS["cpu"]
    )
    lengths = [64, 128, 256, 512, 1024, 2048, (64,) * 16]
    cost = calibrate(measure, lengths, base=base, repeats=3, warmup=1)
    assert len(calls) == 4 * len(lengths)
    assert (cost.a, cost.b, cost.c) == pytest.approx((a, b, c), rel=0.05)
    # everything else comes from the base model
    assert cost.kv_bytes_per_token == base.kv_bytes_per_token and cost.grad_bytes == base.grad_bytes
    cal = cost.extra["calibration"]
    assert cal["lengths"][-1] == (64,) * 16 and len(cal["seconds"]) == len(lengths)
    assert max(abs(r) for r in cal["residuals"]) < 0.02
    assert relative_residuals(cost, cal["lengths"], cal["seconds"]) == pytest.approx(cal["residuals"])


def test_hardware_from_coefficients_inverts_from_specs():
    model = MODEL_PRESETS["llama-13b"]
    target = CostModel(3e-11, 1.5e-6, 2e-4)
    hw = hardware_from_coefficients(model, target.a, target.b, target.c, HARDWARE_PRESETS["h100"])
    again = CostModel.from_specs(model, hw)
    assert (again.a, again.b, again.c) == pytest.approx((target.a, target.b, target.c))
    assert hw.inter_bandwidth == HARDWARE_PRESETS["h100"].inter_bandwidth


def test_cpu_preset_reproduces_its_calibration_on_the_calibrated_model():
    tiny = ModelSpec("tiny", 128, 4, 4, 2, 336, 2048, tie_word_embeddings=True)
    cost = CostModel.from_specs(tiny, HARDWARE_PRESETS["cpu"])
    assert cost.a == pytest.approx(9.9e-8, rel=0.02)
    assert cost.b == pytest.approx(1.39e-5, rel=0.02)
    assert cost.c == pytest.approx(1.16e-3, rel=0.02)


def test_stored_bytescale_preset_equals_a_fresh_fit():
    # HARDWARE_PRESETS stores the fit's result, so importing runs no fit; the two must not drift apart
    stored, fresh = HARDWARE_PRESETS["bytescale"], bytescale_hardware()
    for f in fields(HardwareSpec):
        want = getattr(fresh, f.name)
        assert getattr(stored, f.name) == (want if isinstance(want, str) else pytest.approx(want, rel=1e-12)), f.name


def test_importing_the_cost_model_runs_no_fit():
    code = (
        "import sys\n"
        "calls = []\n"
        "def watch(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name in ('fit_coefficients', 'bytescale_fit', '_lstsq'):\n"
        "        calls.append(frame.f_code.co_name)\n"
        "sys.setprofile(watch)\n"
        "import hf_hdp.planning, hf_hdp.planning.cost\n"
        "sys.setprofile(None)\n"
        "assert not calls, calls\n"
        "assert list(hf_hdp.planning.cost.HARDWARE_PRESETS) == ['h100', 'cpu', 'h200', 'bytescale']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_bytescale_fit_matches_the_published_per_layer_times():
    fit = bytescale_fit()
    assert fit["max_abs_residual"] < 0.02  # the layer (attention + MLP) within 2% at every length
    assert max(abs(r) for r in fit["attention"]["residuals"]) < 0.02
    assert max(abs(r) for r in fit["mlp"]["residuals"]) < 0.05
    assert 7_000 < fit["crossover_tokens"] < 10_000  # "the crossover is about 8K tokens"
    for s, (att, mlp) in BYTESCALE_LAYER_MS.items():
        layer = fit["a"] * s * s + fit["b"] * s + fit["c"]
        assert layer == pytest.approx((att + mlp) * 1e-3, rel=0.02)
    cost = CostModel.bytescale()
    assert (cost.a, cost.b, cost.c) == pytest.approx((FWD_BWD * fit["a"], FWD_BWD * fit["b"], FWD_BWD * fit["c"]))
    assert cost.num_layers == 32 and cost.kv_bytes_per_token == CostModel.default().kv_bytes_per_token
    # the "bytescale" hardware preset reproduces it through from_specs, so it applies to any model
    again = CostModel.from_specs(MODEL_PRESETS["llama-7b"], HARDWARE_PRESETS["bytescale"])
    assert (again.a, again.b, again.c) == pytest.approx((cost.a, cost.b, cost.c))
    assert CostModel.from_specs(MODEL_PRESETS["llama-13b"], HARDWARE_PRESETS["bytescale"]).a > cost.a
    # forward of one layer at 128K: 175.5 + 28.2 ms
    assert cost.sequence_time(131072) / 32 / FWD_BWD == pytest.approx(0.2037, rel=0.02)


# ------------------------------------------------------------------ configs


def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {
        "llama": transformers.LlamaConfig(**common),
        "llama-tied": transformers.LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": transformers.Qwen2Config(**common),
        "llama-headdim": transformers.LlamaConfig(**{**common, "head_dim": 32}),
        "llama-bias": transformers.LlamaConfig(**common, attention_bias=True, mlp_bias=True),
    }


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2", "llama-headdim", "llama-bias"])
def test_model_spec_from_real_transformers_configs(name):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()[name]
    spec = ModelSpec.from_config(config, name=name)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (64, 3, 4, 2)
    assert (spec.intermediate_size, spec.vocab_size) == (176, 320)
    assert spec.head_dim == (32 if name == "llama-headdim" else 16)
    assert spec.tie_word_embeddings == (name == "llama-tied")
    assert spec.kv_bytes_per_token == 2 * 2 * spec.head_dim * 2
    # the parameter count matches the real model's, weight for weight
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert spec.num_params == model.num_parameters()
    layer = model.model.layers[0]
    no_norms = sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n and "bias" not in n)
    assert spec.layer_params == no_norms
    cost = CostModel.from_config(config, "cpu", bytes_per_value=4)
    assert cost.num_layers == 3 and cost.value_bytes == 4 and cost.grad_bytes == 4 * (spec.num_params)


def test_model_presets_have_the_published_sizes():
    sizes = {name: spec.num_params / 1e9 for name, spec in MODEL_PRESETS.items()}
    assert sizes["llama-7b"] == pytest.approx(6.74, rel=0.01)
    assert sizes["llama-13b"] == pytest.approx(13.0, rel=0.01)
    assert sizes["llama-30b"] == pytest.approx(32.5, rel=0.01)
    assert sizes["llama-70b"] == pytest.approx(69.0, rel=0.01)


# ------------------------------------------------------------------ memory


def test_activation_bytes_follow_the_layer_shapes():
    m = MODEL_PRESETS["llama-7b"]
    # 2·(8h + 4i) + 4H bytes: about 37.5h, close to Korthikanti et al.'s 34h for a GPT layer
    assert layer_activation_bytes_per_token(m) == 2 * (8 * 4096 + 4 * 11008) + 4 * 32
    assert 30 < layer_activation_bytes_per_token(m) / m.hidden_size < 40
    full = activation_bytes_per_token(m, checkpointing=False)
    ckpt = activation_bytes_per_token(m, checkpointing=True)
    assert ckpt < full / 5
    assert full == pytest.approx(32 * layer_activation_bytes_per_token(m) + 2 * (4096 + 32000) + 8 * 32000)
    # GQA keeps less K/V; a float32 model keeps twice as much
    gqa = MODEL_PRESETS["llama-70b"]
    assert layer_activation_bytes_per_token(gqa) < layer_activation_bytes_per_token(
        ModelSpec("mha", 8192, 80, 64, 64, 28672, 32000)
    )
    f32 = ModelSpec("f32", 4096, 32, 32, 32, 11008, 32000, bytes_per_value=4)
    assert layer_activation_bytes_per_token(f32) == pytest.approx(2 * layer_activation_bytes_per_token(m) - 4 * 32)


def test_memory_estimate_is_monotonic_and_tokens_per_rank_inverts_it():
    m = MODEL_PRESETS["llama-7b"]
    kw = dict(checkpointing=True, zero1_ranks=64)
    mems = [memory_per_rank(m, t, **kw) for t in (0, 1024, 8192, 65536)]
    assert mems == sorted(mems) and mems[0] == model_state_bytes(m, zero1_ranks=64)
    assert memory_per_rank(m, 8192, checkpointing=False, zero1_ranks=64) > mems[2]
    assert model_state_bytes(m, zero1_ranks=64) < model_state_bytes(m, zero1_ranks=8) < model_state_bytes(m)
    assert model_state_bytes(m) == m.num_params * 18
    for budget in (60e9, 80e9, HARDWARE_PRESETS["h100"], 141e9):
        for ckpt in (True, False):
            t = tokens_per_rank_for_memory(m, budget, checkpointing=ckpt, zero1_ranks=64, reserve_fraction=0.1)
            usable = (budget.memory_bytes if isinstance(budget, HardwareSpec) else budget) * 0.9
            assert memory_per_rank(m, t, checkpointing=ckpt, zero1_ranks=64) <= usable
            assert memory_per_rank(m, t + 1, checkpointing=ckpt, zero1_ranks=64) > usable
    # more memory, more tokens; checkpointing buys several times more
    assert (
        tokens_per_rank_for_memory(m, 60e9, zero1_ranks=64)
        < tokens_per_rank_for_memory(m, 80e9, zero1_ranks=64)
        < tokens_per_rank_for_memory(m, 141e9, zero1_ranks=64)
    )
    assert tokens_per_rank_for_memory(m, 80e9, zero1_ranks=64) > 5 * tokens_per_rank_for_memory(
        m, 80e9, zero1_ranks=64, checkpointing=False
    )
    # ByteScale's C = 8K for LLaMA-7B on 80 GB is in the range the estimate gives without recomputation
    c = tokens_per_rank_for_memory(m, 80e9, checkpointing=False, zero1_ranks=1024, grad_bytes=2)
    assert 6_000 < c < 12_000


def test_tokens_per_rank_for_memory_explains_when_the_model_does_not_fit():
    with pytest.raises(ValueError, match=r"model states need .*\(zero1_ranks\)"):
        tokens_per_rank_for_memory(MODEL_PRESETS["llama-70b"], 80e9)
    with pytest.raises(ValueError):
        tokens_per_rank_for_memory(MODEL_PRESETS["llama-7b"], 80e9, reserve_fraction=1.0)


def test_planning_cost_and_metrics_do_not_import_torch():
    code = (
        "import sys, hf_hdp.planning.cost, hf_hdp.planning.metrics; "
        "hf_hdp.planning.cost.CostModel.bytescale(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
