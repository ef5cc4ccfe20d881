"""Capacity from memory: ``memory_breakdown``, ``tokens_per_rank_for_memory``, ``HDPConfig(tokens_per_rank="auto")``
and ``hf-hdp plan --memory``.

- every component of the breakdown against a hand computation for a small ModelSpec (ZeRO 0/1/2,
  FSDP shard_grad_op / full_shard, checkpointing, offloading, the chunked loss, the reserve);
- C grows with memory, checkpointing, ZeRO-1, FSDP full_shard, offloading and the chunked loss, and
  is exactly the largest C whose estimate fits; ZeRO-2's peak equals ZeRO-1's (HDP reduces once per
  step, after the last backward);
- refusals name the model states' size and what would shrink them;
- HDPConfig parses "auto" and numbers from the command line (HfArgumentParser), and refuses bad values;
- HDPTrainer resolves "auto" into an int on a copy of the config, before measuring the data,
  as ``tokens_per_rank_for_memory`` computes it for the model; on the CPU without a budget it refuses;
- ``hf-hdp plan --memory`` prints the C that ``tokens_per_rank_for_memory`` gives and plans with it.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from hf_hdp import HDPConfig
from hf_hdp.cli import main
from hf_hdp.planning.cost import (
    MODEL_PRESETS,
    MemoryBreakdown,
    ModelSpec,
    memory_breakdown,
    tokens_per_rank_for_memory,
)

# 8 layers, hidden 64, 4 heads of 16 (GQA: 2 KV heads), MLP 128, vocabulary 1000, bf16 activations
SPEC = ModelSpec(
    "tiny", hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=1000
)
# by hand: q 64·64 + k,v 2·64·32 + o 64·64 + MLP 3·64·128 = 36,864; + 2 norms of 64 = 36,992 per layer
LAYER = 36_992
P = 8 * LAYER + 2 * 1000 * 64 + 64  # layers, embedding and head (untied), final norm = 424,000
# one layer's saved activations per token: 2 bytes x (4h + 2·q + 2·kv + 4i) + 4 bytes x heads
ACT = 2 * (4 * 64 + 2 * 64 + 2 * 32 + 4 * 128) + 4 * 4  # 1,936
INPUT = 2 * 64  # a checkpointed layer keeps its input
HEAD = 2 * (64 + 1000) + 2 * 4 * 1000  # final-norm input, logits, their float32 copy and log-softmax: 10,128


def test_breakdown_components_equal_a_hand_computation():
    assert SPEC.num_params == P == 424_000
    T = 100
    kw = dict(weight_bytes=4, grad_bytes=4, optimizer_bytes=8, checkpointing=False)
    b = memory_breakdown(SPEC, T, world_size=4, zero_stage=0, **kw)
    assert (b.weights, b.gradients, b.optimizer) == (4 * P, 4 * P, 8 * P)
    assert b.activations == T * 8 * ACT and b.logits == T * HEAD
    assert b.total == b.weights + b.gradients + b.optimizer + b.activations + b.logits and b.reserve == 0
    # ZeRO-1 shards the optimizer states; ZeRO-2's gradients are whole at the peak (reduced after the last backward)
    z1 = memory_breakdown(SPEC, T, world_size=4, zero_stage=1, **kw)
    assert (z1.weights, z1.gradients, z1.optimizer) == (4 * P, 4 * P, 8 * P / 4)
    assert memory_breakdown(SPEC, T, world_size=4, zero_stage=2, **kw) == z1
    # FSDP shard_grad_op: the whole weights beside the rank's shard, whole gradients, sharded optimizer states
    sgo = memory_breakdown(SPEC, T, world_size=4, fsdp="shard_grad_op", **kw)
    assert (sgo.weights, sgo.gradients, sgo.optimizer) == (4 * P * 1.25, 4 * P, 8 * P / 4)
    # FSDP full_shard: shards plus the root unit (embeddings, final norm, head) and two layers, gathered
    root = 2 * 1000 * 64 + 64
    fs = memory_breakdown(SPEC, T, world_size=4, fsdp="full_shard", **kw)
    assert fs.weights == 4 * (P / 4 + root + 2 * LAYER) and fs.gradients == fs.weights
    assert fs.optimizer == 8 * P / 4 and fs.activations == b.activations
    # checkpointing: each layer's input, plus one layer's working set
    ck = memory_breakdown(SPEC, T, checkpointing=True)
    assert ck.activations == T * (8 * INPUT + ACT)
    # offloading the first ceil(r·8) layers: the kept layers, or at least the two restored in backward
    for r, kept in ((0.25, 6), (0.3, 5), (0.5, 4), (0.75, 2), (1.0, 2), (0.1, 7)):
        assert memory_breakdown(SPEC, T, offload_ratio=r, **kw).activations == T * kept * ACT, r
        assert memory_breakdown(SPEC, T, offload_ratio=r, checkpointing=True).activations == T * (kept * INPUT + ACT)
    # the chunked loss: every token's final hidden state and log-sum-exp, one chunk's logits, and with
    # 16-bit weights a float32 accumulator of the head's gradient
    chunked = memory_breakdown(SPEC, T, loss_chunk_tokens=16, **kw)
    assert chunked.logits == T * (2 * 64 + 4) + 16 * (2 * 1000 + 8 * 1000)
    bf16 = memory_breakdown(SPEC, T, loss_chunk_tokens=16, weight_bytes=2)
    assert bf16.logits == chunked.logits + 4 * 1000 * 64
    assert memory_breakdown(SPEC, 10, loss_chunk_tokens=16, **kw).logits == 10 * (2 * 64 + 4) + 10 * 10_000
    # exact parameter counts (a PEFT model trains few) and the reserve
    peft = memory_breakdown(SPEC, T, params=1000, trainable_params=10, world_size=2, zero_stage=1, reserve=7.0, **kw)
    assert (peft.weights, peft.gradients, peft.optimizer, peft.reserve) == (4000, 40, 40, 7.0)
    assert peft.total == 4000 + 40 + 40 + peft.activations + peft.logits + 7
    assert set(peft.to_dict()) == {
        "tokens",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "reserve",
        "states",
        "total",
    }
    assert "total" in peft.describe() and isinstance(peft, MemoryBreakdown)


def test_breakdown_is_monotonic_and_refuses_bad_inputs():
    totals = [memory_breakdown(SPEC, t).total for t in (0, 1, 100, 10_000, 10_001)]
    assert totals == sorted(totals) and len(set(totals)) == 5
    acts = [
        memory_breakdown(SPEC, 100, offload_ratio=r, checkpointing=False).activations
        for r in (0, 0.125, 0.25, 0.5, 0.75)
    ]
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 5
    for kw, match in (
        (dict(fsdp="zero3"), "fsdp must be None"),
        (dict(fsdp="full_shard", zero_stage=1, world_size=4), "FSDP shards the optimizer states"),
        (dict(zero_stage=3), "zero_stage must be 0, 1 or 2"),
        (dict(world_size=0), "world_size must be a positive integer"),
        (dict(offload_ratio=1.5), r"offload_ratio must be a number in \[0, 1\]"),
        (dict(offload_ratio="auto"), r"offload_ratio must be a number in \[0, 1\]"),
        (dict(loss_chunk_tokens=0), "loss_chunk_tokens must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=match):
            memory_breakdown(SPEC, 10, **kw)


def test_tokens_per_rank_for_memory_is_the_largest_c_that_fits():
    m = MODEL_PRESETS["llama-7b"]
    base = dict(world_size=64, weight_bytes=4, grad_bytes=4, optimizer_bytes=8, loss_chunk_tokens=4096)
    for settings in (
        dict(zero_stage=1),
        dict(zero_stage=1, checkpointing=False),
        dict(fsdp="full_shard"),
        dict(zero_stage=1, offload_ratio=0.5, checkpointing=False),
    ):
        kw = {**base, **settings}
        c = tokens_per_rank_for_memory(m, 80e9, reserve_fraction=0.1, **kw)
        kw.setdefault("zero_stage", 0)
        assert memory_breakdown(m, c, **kw).total <= 72e9 < memory_breakdown(m, c + 1, **kw).total, settings
    c = lambda **kw: tokens_per_rank_for_memory(m, kw.pop("memory", 80e9), **{**base, **kw})
    # more memory, checkpointing, ZeRO-1, FSDP, offloading and the chunked loss each give a larger C
    assert c(memory=64e9) < c() < c(memory=141e9)
    assert c(checkpointing=False) < c()
    assert c(memory=141e9, zero_stage=0) < c(memory=141e9, zero_stage=1) == c(memory=141e9, zero_stage=2)
    assert c(zero_stage=1) < c(fsdp="full_shard")
    no_ckpt = lambda r: c(checkpointing=False, offload_ratio=r)
    assert no_ckpt(0.0) < no_ckpt(0.5) < no_ckpt(1.0)
    assert c(loss_chunk_tokens=None) < c()
    # None resolves as HDPConfig does: ZeRO-1 on several ranks, nothing to shard on one
    assert c(zero_stage=None) == c(zero_stage=1)
    assert tokens_per_rank_for_memory(m, 141e9, world_size=1, zero_stage=2) == tokens_per_rank_for_memory(
        m, 141e9, world_size=1, zero_stage=0
    )
    # the older form: zero1_ranks = ZeRO-1 over that many ranks
    assert tokens_per_rank_for_memory(m, 80e9, zero1_ranks=64) == tokens_per_rank_for_memory(
        m, 80e9, world_size=64, zero_stage=1
    )
    with pytest.raises(ValueError, match="not both"):
        tokens_per_rank_for_memory(m, 80e9, zero1_ranks=8, world_size=8)


def test_a_budget_too_small_names_the_states_and_what_would_shrink_them():
    m = MODEL_PRESETS["llama-7b"]
    states = memory_breakdown(m, 0, world_size=8, zero_stage=0, checkpointing=False).states
    # the states fit, one token's activations and logits do not
    with pytest.raises(ValueError) as err:
        tokens_per_rank_for_memory(m, (states + 1e3) / 0.9, world_size=8, zero_stage=0, checkpointing=False)
    text = str(err.value)
    assert f"model states need {states / 1e9:.2f} GB" in text
    for hint in ("zero_stage=1", "fsdp='full_shard'", "gradient checkpointing", "offload_ratio", "loss_chunk_tokens"):
        assert hint in text, hint
    # the states alone do not fit: only sharding or a larger device helps
    with pytest.raises(ValueError) as err:
        tokens_per_rank_for_memory(MODEL_PRESETS["llama-70b"], 80e9, world_size=8, zero_stage=1)
    text = str(err.value)
    big = MODEL_PRESETS["llama-70b"].num_params * (2 + 4 + 12 / 8)  # bf16 weights, fp32 gradients, Adam over 8
    assert f"model states need {big / 1e9:.2f} GB" in text and "leaving no room for activations" in text
    assert "fsdp='full_shard'" in text and "checkpointing" not in text and "zero_stage=1" not in text


# ------------------------------------------------------------------ HDPConfig


def test_config_parses_auto_and_numbers_from_the_command_line():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((TrainingArguments, HDPConfig))
    _, cfg = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--tokens_per_rank", "auto", "--memory_budget_gb", "24"]
    )
    assert (cfg.tokens_per_rank, cfg.memory_budget_gb, cfg.offload_ratio) == ("auto", 24.0, 0.0)
    _, cfg = parser.parse_args_into_dataclasses(["--output_dir", "x", "--tokens_per_rank", "4096"])
    assert cfg.tokens_per_rank == 4096 and type(cfg.tokens_per_rank) is int and cfg.memory_budget_gb is None
    _, cfg = parser.parse_args_into_dataclasses(["--output_dir", "x", "--offload_ratio", "auto"])
    assert (cfg.tokens_per_rank, cfg.offload_ratio) == (8192, "auto")
    _, cfg = parser.parse_args_into_dataclasses(["--output_dir", "x", "--offload-ratio", "0.5"])
    assert cfg.offload_ratio == 0.5 and type(cfg.offload_ratio) is float
    # Python callers pass ints and floats as before
    assert HDPConfig(tokens_per_rank=1024, offload_ratio=1).offload_ratio == 1.0
    assert HDPConfig(tokens_per_rank="auto", memory_budget_gb=80).memory_budget_gb == 80.0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tokens_per_rank="many"), r"tokens_per_rank must be an integer .* or 'auto'"),
        (dict(tokens_per_rank=8192.0), "tokens_per_rank must be an integer or 'auto'"),
        (dict(tokens_per_rank="0"), "tokens_per_rank must be at least 1"),
        (dict(tokens_per_rank=True), "tokens_per_rank must be an integer"),
        (dict(offload_ratio=1.5), r"offload_ratio must be a number in \[0, 1\]"),
        (dict(offload_ratio=-0.1), r"offload_ratio must be a number in \[0, 1\]"),
        (dict(offload_ratio="half"), r"offload_ratio must be a number in \[0, 1\] .* or 'auto'"),
        (dict(offload_ratio="AUTO"), "offload_ratio must be a number"),
        (dict(offload_ratio=float("nan")), "offload_ratio must be a number"),
        (dict(offload_ratio=True), "offload_ratio must be a number"),
        (dict(tokens_per_rank="auto", memory_budget_gb=0), "memory_budget_gb must be a positive number"),
        (dict(tokens_per_rank="auto", memory_budget_gb="lots"), "memory_budget_gb must be a positive number"),
        (dict(tokens_per_rank=4096, memory_budget_gb=24), "used only to size tokens_per_rank='auto'"),
    ],
)
def test_config_refuses_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        HDPConfig(**kw)


# ------------------------------------------------------------------ HDPTrainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.models import save_tiny_model

    return save_tiny_model("llama", str(tmp_path_factory.mktemp("capacity") / "llama"))


def _trainer(tiny, tmp_path, cfg, **args):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPTrainer
    from tests.models import load_model

    targs = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, max_steps=1, save_strategy="no", **args
    )
    rows = [{"input_ids": list(range(1, n + 1))} for n in (30, 7, 12)]
    return HDPTrainer(load_model(tiny), targs, train_dataset=Dataset.from_list(rows), hdp_config=cfg)


def test_trainer_resolves_auto_from_the_budget_on_a_copy(tiny, tmp_path, caplog):
    from hf_hdp.trainer.checkpoint import hdp_state

    cfg = HDPConfig(tokens_per_rank="auto", memory_budget_gb=0.02, global_batch_size=3)
    with caplog.at_level(logging.INFO, logger="hf_hdp.trainer.capacity"):
        trainer = _trainer(tiny, tmp_path, cfg, gradient_checkpointing=True, optim="sgd")
    model = trainer.hdp_model
    n = sum(p.numel() for p in model.parameters())
    spec = ModelSpec.from_config(model.config, bytes_per_value=8)  # float64, no autocast
    want = tokens_per_rank_for_memory(
        spec,
        0.02e9,
        world_size=1,
        zero_stage=0,
        checkpointing=True,
        loss_chunk_tokens=cfg.loss_chunk_tokens,
        weight_bytes=8,
        grad_bytes=8,
        optimizer_bytes=0,
        params=n,
        trainable_params=n,
        reserve_fraction=0.1,
    )
    c = trainer.hdp_config.tokens_per_rank
    assert c == want and type(c) is int and 30 < c < 100_000
    assert cfg.tokens_per_rank == "auto" and cfg.memory_budget_gb == 0.02  # the user's object is untouched
    assert trainer.hdp_config is not cfg and trainer.hdp_config.memory_budget_gb is None
    b = trainer.hdp_capacity.breakdown
    assert b.tokens == c and b.total <= 0.02e9 and b.reserve == pytest.approx(0.002e9)
    assert b.weights == 8 * n and b.optimizer == 0  # SGD without momentum keeps no state
    assert trainer.hdp_capacity.settings["checkpointing"] is True
    assert f"C = {c:,} tokens" in caplog.text and "weights" in caplog.text
    assert type(hdp_state(trainer)["tokens_per_rank"]) is int
    assert trainer.train().global_step == 1


def test_trainer_refuses_auto_on_cpu_without_a_budget(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"memory_budget_gb=.*or an integer tokens_per_rank"):
        _trainer(tiny, tmp_path, HDPConfig(tokens_per_rank="auto"))
    with pytest.raises(ValueError, match=r"model states need .* GB"):  # 1 KB holds not even the weights
        _trainer(tiny, tmp_path, HDPConfig(tokens_per_rank="auto", memory_budget_gb=1e-6))


def test_optimizer_state_bytes_follow_the_optimizer():
    from hf_hdp.trainer.capacity import optimizer_state_bytes

    assert optimizer_state_bytes("adamw_torch", 4) == 8 and optimizer_state_bytes("adamw_torch_fused", 2) == 4
    assert optimizer_state_bytes("sgd", 4) == 0 and optimizer_state_bytes("sgd", 4, "momentum=0.9") == 4
    assert optimizer_state_bytes("adamw_8bit", 4) == 2 and optimizer_state_bytes("lion_32bit", 4) == 4
    assert optimizer_state_bytes("adafactor", 4) == 0 and optimizer_state_bytes("something_new", 4) == 8


# ------------------------------------------------------------------ hf-hdp plan --memory


@pytest.fixture
def lengths(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("\n".join(str(n) for n in (90, 700, 1500, 3000, 9000, 16000)))
    return str(path)


def _plan(capsys, lengths, *argv):
    rc = main(["plan", "--lengths", lengths, "--world-size", "8", "--global-batch-samples", "16", *argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


CHUNK = HDPConfig().loss_chunk_tokens  # the CLI's default, as HDPConfig's


def _printed_c(out: str) -> int:
    match = re.search(r"^memory: C = ([\d,]+) tokens per rank", out, re.M)
    assert match, out
    return int(match.group(1).replace(",", ""))


def test_cli_prints_the_c_the_memory_allows_and_plans_with_it(capsys, lengths):
    args = ("--memory", "80GB", "--precision", "bf16")  # bf16 weights and AdamW states: 2, 2, 4 bytes
    out = _plan(capsys, lengths, *args, "--zero-stage", "1", "--checkpointing")
    c = _printed_c(out)
    want = tokens_per_rank_for_memory(
        MODEL_PRESETS["llama-7b"],
        80e9,
        world_size=8,
        zero_stage=1,
        checkpointing=True,
        loss_chunk_tokens=CHUNK,
        weight_bytes=2,
        grad_bytes=2,
        optimizer_bytes=4,
    )
    assert c == want
    assert f"8 ranks x {c:,} tokens (C)" in out  # the plan uses it
    for part in ("weights", "gradients", "optimizer", "activations", "logits", "reserve 8.00 GB", "total"):
        assert part in out
    # more memory, checkpointing, a higher ZeRO stage, FSDP and offloading each give a larger C
    more = ("--memory", "141GB", "--precision", "bf16")
    assert _printed_c(_plan(capsys, lengths, *more, "--zero-stage", "1", "--checkpointing")) > c
    assert _printed_c(_plan(capsys, lengths, *args, "--zero-stage", "1")) < c
    assert _printed_c(_plan(capsys, lengths, *args, "--zero-stage", "0", "--checkpointing")) < c
    assert _printed_c(_plan(capsys, lengths, *args, "--zero-stage", "2", "--checkpointing")) == c  # the same peak
    assert _printed_c(_plan(capsys, lengths, *args, "--fsdp", "full_shard", "--checkpointing")) > c
    offload = ("--zero-stage", "1", "--checkpointing", "--offload-ratio", "0.5")
    assert _printed_c(_plan(capsys, lengths, *args, *offload)) > c
    # with --tokens-per-rank the plan uses it, and the breakdown at it is printed too
    out = _plan(capsys, lengths, "--memory", "80GiB", "--tokens-per-rank", "64K", "--json")
    data = json.loads(out)
    assert list(data) == ["static", "naive", "balanced", "memory", "inputs"]
    assert data["inputs"]["tokens_per_rank_from"] == "--tokens-per-rank" and data["inputs"]["tokens_per_rank"] == 65536
    mem = data["memory"]
    assert mem["memory_bytes"] == 80 * 2**30 and mem["at_tokens_per_rank"]["tokens"] == 65536
    assert mem["tokens_per_rank"] == tokens_per_rank_for_memory(  # bf16 autocast: float32 weights and states
        MODEL_PRESETS["llama-7b"],
        80 * 2**30,
        world_size=8,
        zero_stage=1,
        checkpointing=False,
        loss_chunk_tokens=CHUNK,
        weight_bytes=4,
        grad_bytes=4,
        optimizer_bytes=8,
    )
    assert mem["breakdown"]["total"] <= 80 * 2**30 < mem["at_tokens_per_rank"]["total"]


@pytest.mark.parametrize(
    "argv,text",
    [
        (["--checkpointing"], "--checkpointing applies only with --memory"),
        (["--zero-stage", "2", "--offload-ratio", "0.5"], "--zero-stage, --offload-ratio apply only with --memory"),
        (["--memory", "80GB", "--fsdp", "full_shard", "--zero-stage", "1"], "drop --zero-stage"),
        (["--memory", "2GB", "--model", "llama-70b"], "model states need"),
    ],
)
def test_cli_memory_options_refuse_what_they_cannot_use(capsys, argv, text):
    assert main(["plan", *argv]) == 2
    assert text in capsys.readouterr().err
    assert main(["plan", "--memory", "80"]) == 2  # a size without a unit
    assert "with a unit" in capsys.readouterr().err
