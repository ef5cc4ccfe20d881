"""Every model family HDP claims trains exactly as on one device; every family it refuses is refused at construction.

Gradient equivalence: ONE spawn of four gloo processes loops over all families of
``tests/family_models.py`` (tiny saved models, loaded back in float64). For each family and for two
placements of the same global batch (the naive HDP plan and a random valid plan, both mixing
samples on one rank with samples split over 3 and 4 ranks) the ranks pack their micro-batches with
the real collator, run the registered ``"hdp"`` attention with the ``"reference"`` backend, and join
the single gradient all-reduce. The reference is one process running each sample alone with the
family's stock SDPA attention, in float64 (tolerance 1e-9 of each gradient's largest element; the
few norm weights whose gradient the model itself computes in float32 get 1e-5; Llama 4, whose router gates are
float32, gets 8 float32 ulps on its loss and every gradient: see FLOAT32_GATES).

The same spawn runs the feature cases of ``tests/family_models.py`` (FEATURES, gpt-oss and Llama 4):
sliding windows and attention chunks of 8 tokens, so every test sample longer than 8 is several
windows long and the samples split over 3 and 4 ranks have windows crossing rank boundaries;
Gemma 2's attention logit soft-capping and gpt-oss's attention sinks. Their single-process side is
the dense float64 attention ``DENSE_REFERENCE`` over transformers' own per-layer masks;
:func:`test_dense_reference_matches_stock_attention` checks it against transformers' SDPA or eager
attention of each family, and that each feature changes the model. Mixtral also runs
in float32 with transformers' default grouped_mm experts (1e-5). The MoE families passing shows
their routing is per token: packing other samples beside a token, or splitting its sample over
ranks, does not change which experts it gets. Neither side adds the router auxiliary loss (the
models are built with ``output_router_logits=False``; ``True`` is refused, see below).

Refusals: :func:`hf_hdp.models.check_model_supported` on the configurations HDP cannot train
(non-causal attention, attention dropout, batch-dependent RoPE, router aux loss, non-attention token
mixers, multimodal, Llama 4's row-indexed attention temperature tuning).
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_hdp.models import SUPPORTED_FAMILIES, UnsupportedModelError, check_model_supported
from hf_hdp.planning import StepPlan, plan_naive
from tests.dist_utils import run_distributed
from tests.family_models import (
    DENSE_REFERENCE,
    FAMILIES,
    FEATURES,
    FLOAT32_GATES,
    FLOAT32_INTERNAL,
    MODELS,
    REQUIRED,
    VOCAB,
    build_family_model,
    family_config,
    load_family_model,
    model_type_of,
    save_family_model,
)
from tests.models import MIXED_LENGTHS, mixed_batch, reference_step
from tests.plan_helpers import random_plan

WORLD = 4
C = 16
LENGTHS = MIXED_LENGTHS
# a gradient matches when every element is within TOL * (the largest element of that reference gradient)
LOSS_RTOL, GRAD_TOL = 1e-12, 1e-9  # float64
GRAD_TOL_FLOAT32_INTERNAL = 1e-5  # parameters the model computes in float32 itself (see FLOAT32_INTERNAL)
LOSS_RTOL_FP32, GRAD_TOL_FP32 = 1e-6, 1e-5  # float32 cases

# case -> (model of family_models.MODELS, dtype): every family and feature case in float64, plus the MoE path
# users run in float32/bf16, whose default experts kernel (torch grouped_mm) has no float64
CASES = {name: (name, torch.float64) for name in MODELS}
CASES["mixtral-float32-grouped_mm"] = ("mixtral", torch.float32)


def _samples(seed: int = 0):
    return mixed_batch(seed)


def _plans():
    return [plan_naive(LENGTHS, WORLD, C), random_plan(LENGTHS, WORLD, C, random.Random(5))]


def _hdp_worker(rank, world_size, paths, cases, plan_jsons):
    from hf_hdp.collators import HDPCollator, count_loss_tokens
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import enable_hdp_attention, run_micro_batches

    torch.use_deterministic_algorithms(True)
    mesh = DynamicMesh()
    samples = dict(enumerate(_samples()))
    n_loss = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in samples.values())
    plans = [StepPlan.from_json(pj) for pj in plan_jsons]
    collator = HDPCollator(vocab_size=VOCAB)
    out = {}
    for case in cases:
        family, dtype = CASES[case]
        model = load_family_model(paths[family], family, dtype=dtype)
        enable_hdp_attention(model)
        per_plan = []
        for plan in plans:
            mesh.check_plan(plan.fingerprint(), 0)
            model.zero_grad(set_to_none=True)
            # packed afresh for every model: the metadata counts the model's calls of the "hdp" attention
            micro = [collator(mb, samples) for mb in plan.for_rank(rank)]
            loss = run_micro_batches(model, micro, n_loss, mesh, "reference", torch.device("cpu"))
            params = [p for p in model.parameters() if p.requires_grad]
            (total,) = mesh.reduce_gradients(params, extras=[loss])
            grads = {
                n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in model.named_parameters()
            }
            per_plan.append((total, grads if rank == 0 else {k: v.sum() for k, v in grads.items()}))
        out[case] = per_plan
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _selected_cases(request) -> list[str]:
    """The cases of the equivalence tests this session runs (so ``-k llama`` spawns for llama only)."""
    chosen = {
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_family_hdp_gradients_equal_single_device"
    }
    return [c for c in CASES if c in chosen] or list(CASES)


@pytest.fixture(scope="module")
def hdp_runs(request, tmp_path_factory):
    cases = _selected_cases(request)
    root = tmp_path_factory.mktemp("families")
    paths = {f: save_family_model(f, str(root / f)) for f in dict.fromkeys(CASES[c][0] for c in cases)}
    plans = _plans()
    for plan in plans:
        assert {1, 3, 4} <= {p.k for p in plan.pieces()}, plan.planner
    results = run_distributed(_hdp_worker, WORLD, paths, cases, [p.to_json() for p in plans], timeout=600)
    return paths, plans, results


@pytest.mark.parametrize("case", list(CASES))
def test_family_hdp_gradients_equal_single_device(case, hdp_runs):
    paths, plans, results = hdp_runs
    family, dtype = CASES[case]
    fp64 = dtype == torch.float64
    float32_internal = FLOAT32_INTERNAL.get(model_type_of(family))
    loss_rtol = LOSS_RTOL if fp64 else LOSS_RTOL_FP32
    gates_tol = FLOAT32_GATES.get(family, FLOAT32_GATES.get(model_type_of(family)))  # float32 router gates
    if gates_tol is not None:
        loss_rtol = max(loss_rtol, gates_tol)
    model = load_family_model(paths[family], family, dtype=dtype)
    check_model_supported(model, max(LENGTHS))  # the construction-time check accepts it
    ref_loss, ref_grads = reference_step(model, _samples())
    names = {n for n, _ in model.named_parameters()}
    assert set(ref_grads) == names, f"{family}: parameters without a reference gradient: {names - set(ref_grads)}"
    for i, plan in enumerate(plans):
        loss, grads = results[0][case][i]
        assert loss == pytest.approx(ref_loss, rel=loss_rtol), (case, plan.planner)
        assert set(grads) == names
        for name, g in ref_grads.items():
            fp32 = float32_internal is not None and float32_internal.search(name)
            tol = GRAD_TOL if fp64 and not fp32 else GRAD_TOL_FLOAT32_INTERNAL if fp64 else GRAD_TOL_FP32
            tol = max(tol, gates_tol or 0.0)
            torch.testing.assert_close(
                grads[name],
                g,
                rtol=tol,
                atol=tol * float(g.abs().max()),
                msg=lambda m: f"{case} {plan.planner} {name}: {m}",
            )
        for r in range(1, WORLD):  # every rank holds the same reduced gradient and loss
            assert results[r][case][i][0] == pytest.approx(loss, rel=1e-12)
            for name, s in results[r][case][i][1].items():
                torch.testing.assert_close(s, grads[name].sum(), rtol=1e-12, atol=1e-12)


def test_table_matches_the_tests():
    """Every family the table calls supported is verified here, and every family tested is listed."""
    assert set(REQUIRED) <= set(FAMILIES)
    from tests.test_linear_families import LINEAR_FAMILIES  # the hybrid Gated DeltaNet families' own equivalence test

    claimed = {k for k, v in SUPPORTED_FAMILIES.items() if v.status != "refused"}
    tested = set(FAMILIES) | set(LINEAR_FAMILIES)
    assert claimed == tested, claimed ^ tested
    assert {model_type for model_type, _, _ in FEATURES.values()} <= set(FAMILIES)
    assert any(v.status == "refused" for v in SUPPORTED_FAMILIES.values())


# ------------------------------------------------------------------ the feature cases' reference side

# model -> the feature switches to turn off (config overrides, or sinks at -inf), each of which must change it
_FEATURE_OFF = {
    "gpt_oss": {"window": dict(sliding_window=4096), "sinks": "sinks"},
    "llama4_text": {"chunk": dict(attention_chunk_size=4096)},
    "gemma3_text-window8": {"window": dict(sliding_window=4096)},
    "gemma2-softcap-window8": {"window": dict(sliding_window=4096), "softcap": dict(attn_logit_softcapping=None)},
    "mistral-window8": {"window": dict(sliding_window=4096)},
    "qwen2-window8": {"window": dict(sliding_window=4096)},
}


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.pow(2).sum().backward()  # a scalar every logit and every parameter reaches
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", [n for n, v in MODELS.items() if v[2] == DENSE_REFERENCE])
def test_dense_reference_matches_stock_attention(name, tmp_path):
    """The single-process side of the feature cases is right: it equals transformers' own attention of the family
    (SDPA where the family allows it, float64-exact; else eager, which is float64 for gpt-oss and Llama 4 and takes
    the softmax in float32 for Gemma 2), and every feature it implements changes the model at the test lengths."""
    assert set(_FEATURE_OFF) == {n for n, v in MODELS.items() if v[2] == DENSE_REFERENCE}
    path = save_family_model(name, str(tmp_path / name))
    ids = torch.randint(0, VOCAB, (1, max(LENGTHS)), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _logits_and_grads(load_family_model(path, name), ids)
    stock = "eager" if model_type_of(name) in ("gemma2", "gpt_oss") else "sdpa"  # the two refuse SDPA
    tol = 1e-6 if model_type_of(name) == "gemma2" else 1e-12
    logits, grads = _logits_and_grads(load_family_model(path, name, attn=stock), ids)
    assert _rel(ref_logits, logits) < tol
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=tol, atol=tol * float(g.abs().max()), msg=lambda m: f"{n}: {m}")
    for feature, off in _FEATURE_OFF[name].items():
        if off == "sinks":
            model = load_family_model(path, name)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith(".sinks"):
                        p.fill_(float("-inf"))
        else:
            extra = {"experts_implementation": "eager"} if model_type_of(name) == "gpt_oss" else {}
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float64, attn_implementation=DENSE_REFERENCE, **off, **extra
            )
        assert _rel(ref_logits, _logits_and_grads(model, ids)[0]) > 1e-2, f"{name}: {feature} changes nothing"


# ---------------------------------------------------------------------------------------- refusals


def _tiny(family, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(family, **overrides))


def _raw(model_type, **kwargs):
    """A config of a family not in family_models (for config-only checks)."""
    return AutoConfig.for_model(model_type, **kwargs)


_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

# (case id, builder, max_sequence_length, fragments the message must contain)
REFUSED = [
    (
        "gemma3-bidirectional",
        lambda: _tiny("gemma3_text", use_bidirectional_attention=True),
        60,
        ["use_bidirectional_attention", "causal"],
    ),
    (
        "gpt_oss-router-aux-loss",
        lambda: _tiny("gpt_oss", output_router_logits=True),
        60,
        ["GptOssForCausalLM", "output_router_logits=True", "auxiliary loss"],
    ),
    (
        "llama-attention-dropout",
        lambda: _tiny("llama", attention_dropout=0.1),
        60,
        ["LlamaForCausalLM", "attention dropout", "attention_dropout=0.1", "= 0.0"],
    ),
    (
        "mixtral-router-aux-loss",
        lambda: _tiny("mixtral", output_router_logits=True),
        60,
        ["MixtralForCausalLM", "output_router_logits=True", "auxiliary loss", "output_router_logits=False"],
    ),
    ("phi3-longrope-past-original", lambda: _tiny("phi3"), 2048, ["Phi3ForCausalLM", "'longrope'", "1024", "2048"]),
    (
        "llama-dynamic-rope",
        lambda: _tiny(
            "llama",
            max_position_embeddings=32,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
        ),
        60,
        ["'dynamic'", "32"],
    ),
    (
        "t5-encoder-decoder",
        lambda: _raw("t5", vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2),
        60,
        ["encoder-decoder", "Seq2SeqTrainer"],
    ),
    ("kimi_linear-linear-attention", lambda: _raw("kimi_linear", **_SMALL), 60, ["linear_attention", "kimi_linear"]),
    (
        "kimi_linear-conv",
        lambda: _raw("kimi_linear", **_SMALL),
        60,
        ["mix tokens outside the attention interface", "no adapter"],
    ),
    # the released Llama 4 config: NoPE layers (every 4th) with temperature tuning on
    (
        "llama4-temperature-tuning",
        lambda: _raw("llama4_text", **dict(_SMALL, num_hidden_layers=4)),
        60,
        [
            "attn_temperature_tuning=True",
            "layer 3",
            "row index",
            "position_ids",
            "attn_temperature_tuning=False",
            "floor_scale",
        ],
    ),
    (
        "llama4-temperature-tuning-model",
        lambda: _tiny("llama4_text", attn_temperature_tuning=True),
        60,
        ["Llama4ForCausalLM", "attn_temperature_tuning=True", "layer 1"],
    ),
    (
        "kimi_linear-why",
        lambda: _raw("kimi_linear", **_SMALL),
        60,
        ["recurrent state", "no adapter", "hf_hdp.attention.recurrent"],
    ),
    (
        "minimax-lightning",
        lambda: _raw("minimax", **_SMALL, num_local_experts=2, num_experts_per_tok=1),
        60,
        ["minimax family is not supported", "recurrent state"],
    ),
    ("gemma3-multimodal", lambda: _raw("gemma3"), 60, ["multimodal", "text_config", "Gemma3ForCausalLM"]),
    (
        "bloom-no-attention-interface",
        lambda: AutoModelForCausalLM.from_config(_raw("bloom", vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2)),
        60,
        ["BloomForCausalLM", "AttentionInterface"],
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_at_construction(case):
    """HDPTrainer.__init__ runs check_model_supported: the message names the model, the feature, the way out."""
    _, build, max_len, fragments = case
    with pytest.raises(UnsupportedModelError) as err:
        check_model_supported(build(), max_len)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"


def test_rope_limit_is_exact():
    """A batch-dependent RoPE stays static up to its original context: accepted exactly that far."""
    phi3 = _tiny("phi3")
    check_model_supported(phi3, 1024)
    with pytest.raises(UnsupportedModelError, match="longrope"):
        check_model_supported(phi3, 1025)


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("mistral-window8", ["layers 0, 1 slide over 8 tokens"]),
        ("qwen2-window8", ["layer 1 slides over 8 tokens"]),
        ("gemma3_text-window8", ["layer 0 slides over 8 tokens"]),
        ("gemma2-softcap-window8", ["layer 0 slides over 8 tokens", "soft-capping (attn_logit_softcapping=2.0)"]),
        ("gpt_oss", ["layer 0 slides over 8 tokens", "attention sinks", "layers 0, 1"]),
        ("llama4_text", ["layer 0 attends within chunks of 8 tokens", "attn_temperature_tuning=False"]),
    ],
)
def test_attention_features_are_accepted(name, fragments):
    """Sliding windows, chunks, soft-capping and sinks far shorter than the samples are accepted and reported."""
    summary = check_model_supported(build_family_model(name), 4096)
    text = str(summary)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    # the released configs of the families: Gemma 2's 50.0 cap and 4096 window, Mistral 7B v0.1's window
    assert check_model_supported(_tiny("gemma2", attn_logit_softcapping=50.0, sliding_window=4096), 8192)
    assert check_model_supported(_tiny("mistral", sliding_window=32), 4096).family == "verified"
    # Gemma 2 with attention soft-capping off (final soft-capping on)
    summary = check_model_supported(_tiny("gemma2"), 64)
    assert summary.family == "verified" and any("final logit" in n for n in summary.notes)


def test_unverified_family_is_allowed_with_a_warning(caplog):
    config = _raw("helium", **_SMALL)
    with caplog.at_level(logging.WARNING, logger="hf_hdp.models"):
        summary = check_model_supported(AutoModelForCausalLM.from_config(config), 60)
    assert summary.family == "unverified"
    assert "not verified" in caplog.text and "helium" in caplog.text


def test_window_a_layer_keeps_to_itself_is_honoured_at_the_forward():
    """Qwen2-MoE's sliding layers never pass ``sliding_window`` on; the "hdp" attention must read the layer's own
    window (from the config) and equal the dense reference on one packed row of two samples."""
    from hf_hdp.attention.metadata import HDPAttentionMetadata
    from hf_hdp.engine import enable_hdp_attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        _raw(
            "qwen2_moe",
            **_SMALL,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            output_router_logits=False,
        ),
        experts_implementation="eager",
    ).double()
    ids = torch.randint(0, VOCAB, (1, 40))
    model.config._attn_implementation = DENSE_REFERENCE
    with torch.no_grad():
        ref = torch.cat([model(input_ids=ids[:, :30]).logits, model(input_ids=ids[:, 30:]).logits], dim=1)
    enable_hdp_attention(model)
    meta = HDPAttentionMetadata(num_tokens=40, local_len=40, local_seqlens=[30, 10], rings=[]).bind(None, "reference")
    positions = torch.cat([torch.arange(30), torch.arange(10)])[None]
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, hdp_metadata=meta).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
