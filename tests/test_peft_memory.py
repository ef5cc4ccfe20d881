"""PEFT (LoRA), gradient checkpointing and bf16 autocast under HDP.

One 4-rank gloo job runs one global batch (short samples and samples split over 3 and 4 ranks) with:
the full model (reference for the rest), gradient checkpointing (non-reentrant and reentrant: the
ring's forward, P2P included, is recomputed inside backward), LoRA adapters from peft, LoRA with
checkpointing, and a float32 model under bf16 autocast. The single-process reference runs every
sample alone with SDPA, in float64. Then HDPTrainer runs end to end on one process with LoRA, with
``gradient_checkpointing=True`` and with ``bf16=True``.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.planning import StepPlan
from tests.dist_utils import run_distributed
from tests.models import load_model, reference_step, save_tiny_model
from tests.plan_helpers import random_plan
from tests.test_equivalence import LENGTHS, WORLD, C, _samples

peft = pytest.importorskip("peft")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _lora(model, seed: int = 0):
    """LoRA on the attention projections (they feed the ring) and the MLP's down projection.

    ``init_lora_weights=False`` draws B at random too, so both A and B get non-zero gradients.
    """
    torch.manual_seed(seed)  # the same adapters on every rank and in the reference
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _worker(rank, world_size, model_path, plan_jsons):
    from hf_hdp.collators import HDPCollator, count_loss_tokens
    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine import enable_hdp_attention, run_micro_batches
    from tests.models import VOCAB

    torch.use_deterministic_algorithms(True)
    mesh = DynamicMesh()
    samples = dict(enumerate(_samples()))
    n_loss = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in samples.values())
    collator = HDPCollator(vocab_size=VOCAB)

    def run(model, plan, context=contextlib.nullcontext):
        enable_hdp_attention(model)
        model.train()  # checkpointing only recomputes in training mode
        micro = [collator(mb, samples) for mb in plan.for_rank(rank)]
        sent = mesh.stats.bytes_sent
        loss = run_micro_batches(model, micro, n_loss, mesh, "reference", torch.device("cpu"), context=context)
        params = [p for p in model.parameters() if p.requires_grad]
        (total,) = mesh.reduce_gradients(params, extras=[loss])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        calls = sum(m["hdp_metadata"].attention_calls for m in micro)
        return {
            "loss": total,
            "grads": grads,
            "sent": mesh.stats.bytes_sent - sent,
            "calls": calls,
            "frozen_grads": frozen_grads,
            "micro": len(micro),
        }

    out = []
    for pj in plan_jsons:
        plan = StepPlan.from_json(pj)
        mesh.check_plan(plan.fingerprint(), 0)
        res = {"plain": run(load_model(model_path), plan)}
        for name, kwargs in (("gc", {"use_reentrant": False}), ("gc_reentrant", {"use_reentrant": True})):
            model = load_model(model_path)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            res[name] = run(model, plan)
        res["lora"] = run(_lora(load_model(model_path)), plan)
        model = _lora(load_model(model_path))
        model.gradient_checkpointing_enable()
        res["lora_gc"] = run(model, plan)
        res["fp32"] = run(load_model(model_path, dtype=torch.float32), plan)
        res["bf16"] = run(
            load_model(model_path, dtype=torch.float32),
            plan,
            context=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        )
        for r in res.values():  # rank 0 returns the gradients; the others a checksum per tensor
            if rank:
                r["grads"] = {k: v.sum() for k, v in r["grads"].items()}
        out.append(res)
    return out


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("peft") / "llama"))


@pytest.fixture(scope="module")
def hdp_runs(model_path):
    # one placement that has it all: groups of 1 to 4 ranks, a micro-batch holding three ring segments
    # (three groups), ranks running different numbers of micro-batches
    plans = [random_plan(LENGTHS, WORLD, C, random.Random(9))]
    assert {p.k for p in plans[0].pieces()} == {1, 2, 3, 4}
    assert max(len({p.group for p in mb.pieces if p.distributed}) for mb in plans[0].micro_batches) >= 3
    assert len({len(plans[0].for_rank(r)) for r in range(WORLD)}) > 1
    results = run_distributed(_worker, WORLD, model_path, [p.to_json() for p in plans])
    return plans, results


def _assert_grads_equal(got, want, rtol=1e-9, atol=1e-12, what=""):
    assert set(got) == set(want), what
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def test_lora_adapter_gradients_equal_single_process(model_path, hdp_runs):
    plans, results = hdp_runs
    ref_loss, ref_grads = reference_step(_lora(load_model(model_path)), _samples())
    assert ref_grads and all("lora_" in n for n in ref_grads)  # only the adapters train
    assert all(g.abs().max() > 0 for g in ref_grads.values())  # A and B both get gradients
    for i, plan in enumerate(plans):
        lora = results[0][i]["lora"]
        assert lora["loss"] == pytest.approx(ref_loss, rel=1e-12)
        _assert_grads_equal(lora["grads"], ref_grads, what=f"lora/{plan.planner}")
        for r in range(WORLD):  # frozen base weights never got a gradient, on any rank
            assert results[r][i]["lora"]["frozen_grads"] == []
            for name, s in results[r][i]["lora"]["grads"].items():
                torch.testing.assert_close(s.sum(), lora["grads"][name].sum(), rtol=1e-12, atol=1e-12)


def test_gradient_checkpointing_recomputes_the_rings_with_equal_gradients(model_path, hdp_runs):
    plans, results = hdp_runs
    ref_loss, ref_grads = reference_step(load_model(model_path), _samples())
    for i, plan in enumerate(plans):
        plain = results[0][i]["plain"]
        _assert_grads_equal(plain["grads"], ref_grads, what=f"plain/{plan.planner}")
        for variant in ("gc", "gc_reentrant"):
            for r in range(WORLD):
                run, base = results[r][i][variant], results[r][i]["plain"]
                assert run["loss"] == pytest.approx(base["loss"], rel=1e-13)
                _assert_grads_equal(run["grads"], base["grads"], rtol=1e-12, atol=1e-13, what=f"{variant} rank {r}")
                if base["micro"]:
                    # every layer's attention ran again inside backward (2 layers: 2 calls become 4)...
                    assert run["calls"] == 2 * base["calls"], (variant, r)
                # ...and so did the ring's forward P2P on every rank of a split sample
                assert (run["sent"] > base["sent"]) == (base["sent"] > 0), (variant, r)
            assert any(results[r][i][variant]["sent"] > 0 for r in range(WORLD))
        # LoRA with checkpointing: the adapters' gradients as without it
        lora, lora_gc = results[0][i]["lora"], results[0][i]["lora_gc"]
        _assert_grads_equal(lora_gc["grads"], lora["grads"], rtol=1e-12, atol=1e-13, what="lora_gc")
        assert lora_gc["sent"] > lora["sent"]


def test_bf16_autocast_loss_is_close_to_float32(hdp_runs):
    plans, results = hdp_runs
    for i, _plan in enumerate(plans):
        fp32, bf16 = results[0][i]["fp32"], results[0][i]["bf16"]
        assert torch.isfinite(torch.tensor(bf16["loss"]))
        assert bf16["loss"] != fp32["loss"]  # autocast really ran the matmuls in bf16
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
        for name, g in fp32["grads"].items():  # gradients stay float32 and close in direction
            gb = bf16["grads"][name]
            assert gb.dtype == torch.float32 and torch.isfinite(gb).all(), name
            cos = torch.nn.functional.cosine_similarity(gb.flatten().double(), g.flatten().double(), dim=0)
            assert cos > 0.97, (name, float(cos))


# ------------------------------------------------------------------ HDPTrainer, one process
def _rows():
    return Dataset.from_list(_samples())


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        lr_scheduler_type="constant",
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_with_lora_changes_only_the_adapters(model_path, tmp_path):
    model = _lora(load_model(model_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HDPTrainer(
        model,
        _args(tmp_path, learning_rate=1e-2, optim="adamw_torch", weight_decay=0.1),
        train_dataset=_rows(),
        hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=5),
    )
    assert trainer.hdp_model is model.get_base_model()  # the LM inside the wrapper, not its inner decoder
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    after = dict(model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    adapters = {n for n, p in after.items() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert changed == adapters  # every adapter moved, no base weight did


def test_trainer_gradient_checkpointing_gives_the_same_weights(model_path, tmp_path):
    def train(gc: bool):
        model = load_model(model_path)
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
        trainer = HDPTrainer(
            model,
            _args(tmp_path, learning_rate=0.5, optim="sgd", gradient_checkpointing=gc),
            train_dataset=_rows(),
            hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=5),
        )
        trainer.train()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, len(calls), model

    plain, plain_calls, _ = train(False)
    gc, gc_calls, model = train(True)
    assert model.is_gradient_checkpointing
    assert gc_calls == 2 * plain_calls  # each layer's forward ran again in backward
    for k, w in plain.items():
        torch.testing.assert_close(gc[k], w, rtol=1e-12, atol=1e-14, msg=lambda m: f"{k}: {m}")


def test_trainer_bf16_autocast_on_cpu(model_path, tmp_path):
    def train(bf16: bool):
        model = load_model(model_path, dtype=torch.float32)
        dtypes = set()
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        trainer = HDPTrainer(
            model,
            _args(tmp_path, learning_rate=1e-3, bf16=bf16),
            train_dataset=_rows(),
            eval_dataset=_rows(),
            hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=5),
        )
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return losses, trainer.evaluate()["eval_loss"], dtypes, model

    fp32_losses, fp32_eval, fp32_dtypes, _ = train(False)
    bf16_losses, bf16_eval, bf16_dtypes, model = train(True)
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}  # autocast ran, train and eval
    assert model.dtype == torch.float32  # master weights stay float32
    assert len(bf16_losses) == 2 and all(torch.isfinite(torch.tensor(bf16_losses)))
    assert bf16_losses == pytest.approx(fp32_losses, rel=2e-2)
    assert bf16_eval == pytest.approx(fp32_eval, rel=2e-2)
