"""A hybrid Gated DeltaNet model (Qwen3.5) trained through HDP's real front doors: HDPTrainer under ZeRO stages 1 and
2 and FSDP2, and the HDPAccelerator custom loop, on 4 gloo ranks, with both split methods of the state-carrying
layers forced (``HDPConfig.state_split`` "heads" and "scan").

A tiny ``qwen3_5_text`` (one linear-attention layer, one full-attention layer; 12 value heads over 2 key heads, so
groups of 3 and 4 ranks split heads), saved with ``save_pretrained`` and loaded with ``from_pretrained`` in float64,
trains for two optimizer steps on a global batch whose 60-, 40- and 33-token samples are split over 4 and 3 ranks
(``tokens_per_rank=16``) while short ones are packed whole. ONE spawn of four ranks runs every configuration:

- HDPTrainer, AdamW with weight decay, a linear schedule and gradient clipping (active: the first gradient's norm is
  above ``max_grad_norm``), at ``zero_stage`` 1 and 2 and with ``fsdp="full_shard"`` (ZeRO-3 mode, lockstep plans),
  each for both split methods; gradient checkpointing (``TrainingArguments(gradient_checkpointing=True)``: each
  decoder layer, its Gated DeltaNet's P2P included, recomputed inside backward; every member recomputes the same
  layers in the same order) with torch's reentrant checkpoint at ZeRO-2 and the non-reentrant one in FSDP's
  ``shard_grad_op`` mode; LoRA on the Gated DeltaNet's ``in_proj_qkv``; ``trainer.evaluate()`` on the trained
  (sharded) model; ``trainer.save_model()``, loaded back with ``from_pretrained``;
- the custom loop of ``examples/custom_loop.py`` (SGD), at ZeRO 1 (scan) and 2 (heads);
- FSDP2's ``fully_shard`` of a Gated DeltaNet module itself.

The reference is one process without HDP: the same model with the recurrence computed token by token in float64
(:func:`tests.test_linear_families.dense_delta_net_forward`), each sample of a step run alone, unpacked
(:func:`tests.models.reference_step`), and Trainer's own optimizer and schedule (``Trainer.create_optimizer_and_
scheduler`` with the same arguments) after ``clip_grad_norm_``. Both sides compute the families' RMSNorms in float64
(:func:`tests.test_linear_families.exact_norms`; the stock ones round to float32, see that file), so the trained
weights agree to float64 accuracy.

Without processes: HDP's forward survives ``copy.deepcopy`` (the copy runs its own weights) and ``model.train()`` /
``model.eval()`` (which re-kernelize a model loaded with the ``kernels`` package installed); outside packed
micro-batches (a padded batch, generation) an HDP-enabled model computes what the stock model does.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.models import VOCAB, mixed_batch, reference_step
from tests.test_linear_families import _load, _save, exact_norms, use_dense_reference

WORLD, C, BATCH, STEPS = 4, 16, 5, 2
SPLITS = ("heads", "scan")
LR, SGD_LR, MAX_GRAD_NORM = 1e-2, 0.1, 1.0
TOL = dict(rtol=1e-10, atol=1e-12)

# name: (HDPTrainer run's keyword arguments); every run is checked against the one-process reference
TRAINER_RUNS = {
    **{f"zero1_{s}": dict(split=s, zero_stage=1) for s in SPLITS},
    **{f"zero2_{s}": dict(split=s, zero_stage=2) for s in SPLITS},
    **{f"fsdp_{s}": dict(split=s, fsdp="full_shard") for s in SPLITS},
    # recomputed layers: torch's reentrant checkpoint at ZeRO-2, the non-reentrant one (Trainer's default) under FSDP
    "checkpointing_zero2_heads": dict(split="heads", zero_stage=2, gradient_checkpointing={"use_reentrant": True}),
    "checkpointing_fsdp_scan": dict(split="scan", fsdp="shard_grad_op", gradient_checkpointing={}),
    "lora_zero1_scan": dict(split="scan", zero_stage=1, lora=True),  # LoRA on in_proj_qkv (and q_proj)
}
EVALUATED = ("zero1_heads", "fsdp_scan")
LOOP_RUNS = {"loop_zero1_scan": dict(split="scan", zero_stage=1), "loop_zero2_heads": dict(split="heads", zero_stage=2)}


def _rows() -> list[dict]:
    return [{"input_ids": s["input_ids"], "labels": s.get("labels", s["input_ids"])} for s in mixed_batch(0)]


def _eval_rows() -> list[dict]:
    return [{"input_ids": s["input_ids"]} for s in mixed_batch(1)]


def _training_args(out_dir: str, **kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        max_steps=STEPS,
        learning_rate=LR,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1,
        save_strategy="no",
        per_device_eval_batch_size=2,
        **kwargs,
    )


def _pinned(model):
    """Every instance-level forward of ``model`` (the float64 norms of :func:`exact_norms`, the dense reference's
    recurrence) moved onto a per-module subclass that ``kernels`` leaves alone. With the ``kernels`` package
    installed, transformers re-kernelizes the model on every ``model.train()``/``eval()`` that changes its mode, which
    drops the instance-level forwards of hub-kernel layers (Qwen3.5's RMSNorms, its Gated DeltaNet)."""
    for m in model.modules():
        own = m.__dict__.pop("forward", None)
        if own is not None:
            cls = type(m)
            m.__class__ = type(
                cls.__name__,
                (cls,),
                {
                    "forward": lambda self, *a, **kw: self._test_forward(*a, **kw),
                    "kernel_condition": staticmethod(lambda module: False),
                },
            )
            m._test_forward = own
    return model


def _load_hdp_model(path):
    """As a user loads it (``kernels`` on where installed), with float64 norms."""
    return _pinned(exact_norms(_load(path)))


def _lora(model):
    """LoRA on the Gated DeltaNet's ``in_proj_qkv`` and the attention's ``q_proj``, both factors random (so both
    get a gradient from the first step), the same on every process."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj_qkv", "q_proj"], init_lora_weights=False)
    )


def _train(path, out_dir, split, zero_stage=None, fsdp=None, gradient_checkpointing=None, evaluate=False, lora=False):
    from datasets import Dataset

    from hf_hdp import HDPConfig, HDPTrainer
    from hf_hdp.engine.fsdp import full_model_state

    args = _training_args(
        out_dir,
        **({"fsdp": fsdp} if fsdp else {}),
        **(
            {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": gradient_checkpointing}
            if gradient_checkpointing is not None
            else {}
        ),
    )
    model = _load_hdp_model(path)
    if lora:
        model = _lora(model)
    trainer = HDPTrainer(
        model,
        args,
        train_dataset=Dataset.from_list(_rows()),
        hdp_config=HDPConfig(
            tokens_per_rank=C,
            global_batch_size=BATCH,
            zero_stage=zero_stage,
            state_split=split,
            attention_backend="reference",
        ),
    )
    record = {"rows": [], "micro_batches": [], "bytes": [], "losses": []}
    step_fn = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        step = inputs["hdp_step"]
        record["rows"].append(list(step.rows))
        record["micro_batches"].append(len(step.micro_batches))
        before = trainer.mesh.stats.bytes_sent
        out = step_fn(model, inputs, num_items_in_batch)
        record["losses"].append(float(out))  # the step's loss over all ranks (float32)
        record["bytes"].append(trainer.mesh.stats.bytes_sent - before)
        return out

    trainer.training_step = recording_step
    trainer.train()
    record["grad_norms"] = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    record["fsdp_modules"] = len(trainer.hdp_fsdp_modules)
    record["checkpointing"] = any(getattr(m, "gradient_checkpointing", False) for m in trainer.hdp_model.modules())
    if evaluate:  # on the trained model, sharded under FSDP
        record["eval_loss"] = trainer.evaluate(Dataset.from_list(_eval_rows()))["eval_loss"]
    weights = full_model_state(trainer.model)  # FSDP: every rank gathers the whole weights
    trainer.save_model(os.path.join(out_dir, "final"))
    record["weights"] = weights if torch.distributed.get_rank() == 0 else {k: v.sum() for k, v in weights.items()}
    return record


def _loop(path, split, zero_stage):
    from datasets import Dataset

    from hf_hdp import HDPAccelerator, HDPConfig

    acc = HDPAccelerator(
        hdp_config=HDPConfig(
            tokens_per_rank=C,
            global_batch_size=BATCH,
            zero_stage=zero_stage,
            state_split=split,
            attention_backend="reference",
        )
    )
    model = _load_hdp_model(path)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    record = {"rows": [], "micro_batches": [], "losses": []}
    for batch in acc.hdp_steps(Dataset.from_list(_rows()), seed=1):
        record["rows"].append(list(batch["hdp_step"].rows))
        record["micro_batches"].append(len(batch["hdp_step"].micro_batches))
        record["losses"].append(acc.hdp_backward(model, batch))
        optimizer.step()
        optimizer.zero_grad()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    record["weights"] = weights if acc.process_index == 0 else {n: w.sum() for n, w in weights.items()}
    return record


def _worker(rank, world, path, base):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29599",
    )
    torch.use_deterministic_algorithms(True)
    out = {}
    for name, kwargs in TRAINER_RUNS.items():
        out[name] = _train(path, os.path.join(base, name), evaluate=name in EVALUATED, **kwargs)
    for name, kwargs in LOOP_RUNS.items():
        out[name] = _loop(path, **kwargs)
    out["fully_shard_layer"] = _fully_shard_layer(path, world)
    return out


def _fully_shard_layer(path, world):
    """FSDP2 on the Gated DeltaNet module itself (its own FSDP unit): its output before and after, and its class."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from hf_hdp.engine import enable_hdp_attention

    model = _load(path)
    enable_hdp_attention(model, "heads")
    layer = _delta_net(model)
    hidden = torch.randn(1, 9, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = layer(hidden, hdp_metadata=_local_meta((9,)))
        stock = type(layer)._hdp_base_class.forward(layer, hidden)
    fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
    with torch.no_grad():
        after = layer(hidden, hdp_metadata=_local_meta((9,)))
        plain = layer(hidden)
    return {
        "sharded": isinstance(layer, FSDPModule),
        "hdp": float((after - before).abs().max()),
        "own": float((plain - stock).abs().max()),
    }


# ------------------------------------------------------------------ the one-process reference
def _reference_model(path):
    return _pinned(exact_norms(use_dense_reference(_load(path))))


def _reference_trainer_run(path, steps_rows, out_dir, lora=False):
    """Trainer's optimizer and schedule (same arguments), gradients of one process running each sample alone."""
    from transformers import Trainer

    model = _reference_model(path)
    if lora:
        model = _lora(model)
    trainer = Trainer(model=model, args=_training_args(out_dir))
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    rows, norms, losses = _rows(), [], []
    for step_rows in steps_rows:
        loss, _ = reference_step(model, [rows[r] for r in step_rows])  # leaves the step's gradients in .grad
        params = [p for p in model.parameters() if p.requires_grad]
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)))
        losses.append(loss)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
    return model, norms, losses


def _reference_loop_run(path, steps_rows):
    model = _reference_model(path)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    rows, losses = _rows(), []
    for step_rows in steps_rows:
        loss, _ = reference_step(model, [rows[r] for r in step_rows])
        losses.append(loss)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return model, losses


def _eval_loss(model) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in _eval_rows():
            ids = torch.tensor([s["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hybrid_trainer")
    path = _save("qwen3_5_text", str(base / "model"))
    results = run_distributed(_worker, WORLD, path, str(base), timeout=900)
    return path, base, results


def _close(weights, reference, what):
    for name, w in reference.items():
        torch.testing.assert_close(weights[name], w, **TOL, msg=lambda m: f"{what} {name}: {m}")


def _same_on_every_rank(results, name):
    for r in range(1, WORLD):
        for k, s in results[r][name]["weights"].items():
            torch.testing.assert_close(
                s,
                results[0][name]["weights"][k].sum(),
                rtol=1e-12,
                atol=1e-12,
                msg=lambda m: f"{name} rank {r} {k}: {m}",
            )


@pytest.mark.parametrize("name", list(TRAINER_RUNS))
def test_hdp_trainer_trains_the_weights_of_one_process(name, runs):
    path, base, results = runs
    run = results[0][name]
    assert len(run["rows"]) == STEPS and all(r[name]["rows"] == run["rows"] for r in results)
    lora = TRAINER_RUNS[name].get("lora", False)
    model, norms, losses = _reference_trainer_run(path, run["rows"], str(base / "ref" / name), lora)
    assert norms[0] > MAX_GRAD_NORM or lora  # clipping really acted (the adapters' gradient alone is smaller)
    assert run["grad_norms"] == pytest.approx(norms, rel=1e-10)
    assert run["losses"] == pytest.approx(losses, rel=1e-6)  # Trainer's float32 loss tensor
    reference = {n: p.detach() for n, p in model.named_parameters()}
    _close(run["weights"], reference, name)
    _same_on_every_rank(results, name)
    # the split samples crossed ranks (60 tokens over 4, 40 and 33 over 3): every rank sent P2P bytes in some step
    assert all(sum(r[name]["bytes"]) > 0 for r in results), [r[name]["bytes"] for r in results]
    counts = list(zip(*[r[name]["micro_batches"] for r in results]))
    if TRAINER_RUNS[name].get("fsdp") == "full_shard":
        assert all(len(set(c)) == 1 for c in counts), counts  # lockstep slots
        assert run["fsdp_modules"] > 1
    assert run["checkpointing"] == ("gradient_checkpointing" in TRAINER_RUNS[name])
    if name in EVALUATED:
        for r in results:
            assert r[name]["eval_loss"] == pytest.approx(_eval_loss(model), rel=1e-10)
    if lora:  # the adapters trained (the frozen weights stayed: they equal the reference's, untouched); saved alone
        assert any("lora_" in k for k in reference)
        assert (base / name / "final" / "adapter_model.safetensors").exists()
        return
    # save_model after training: a normal folder, loaded back with from_pretrained, with the trained weights
    saved = _load(str(base / name / "final"))
    _close({n: p.detach() for n, p in saved.named_parameters()}, reference, f"{name} saved")
    with open(base / name / "final" / "config.json") as f:
        assert '"hdp"' not in f.read()  # the "hdp" attention is this run's, not the checkpoint's


def test_split_methods_sent_different_bytes(runs):
    """The forced split methods really ran: the same steps moved different P2P bytes."""
    _, _, results = runs
    for mode in ("zero1", "zero2", "fsdp"):
        heads = sum(sum(r[f"{mode}_heads"]["bytes"]) for r in results)
        scan = sum(sum(r[f"{mode}_scan"]["bytes"]) for r in results)
        assert heads > 0 and scan > 0 and heads != scan, (mode, heads, scan)


@pytest.mark.parametrize("name", list(LOOP_RUNS))
def test_hdp_accelerator_custom_loop_trains_the_weights_of_one_process(name, runs):
    path, _, results = runs
    run = results[0][name]
    model, losses = _reference_loop_run(path, run["rows"])
    assert run["losses"] == pytest.approx(losses, rel=1e-10)
    for r in results:
        assert r[name]["losses"] == pytest.approx(run["losses"], rel=1e-12)
    _close(run["weights"], {n: p.detach() for n, p in model.named_parameters()}, name)
    _same_on_every_rank(results, name)


# ------------------------------------------------------------------ no processes
def _delta_net(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))


def _local_meta(lengths):
    from hf_hdp.attention.metadata import HDPAttentionMetadata

    n = sum(lengths)
    return HDPAttentionMetadata(num_tokens=n, local_len=n, local_seqlens=tuple(lengths), rings=())


def test_the_adapter_survives_deepcopy(tmp_path):
    """A deep copy of an HDP-enabled model (a reference model, an EMA copy) runs its own weights in both paths."""
    from hf_hdp.engine import enable_hdp_attention

    model = _load(_save("qwen3_5_text", str(tmp_path / "m")))
    enable_hdp_attention(model, "scan")
    clone = copy.deepcopy(model)
    layer, twin = _delta_net(model), _delta_net(clone)
    assert twin._hdp_adapter is not None and twin._hdp_split == "scan"
    with torch.no_grad():
        twin.out_proj.weight.mul_(2)
    hidden = torch.randn(1, 9, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for kwargs in ({}, {"hdp_metadata": _local_meta((9,))}):  # the module's own forward, and HDP's
            ours, theirs = layer(hidden, **kwargs), twin(hidden, **kwargs)
            torch.testing.assert_close(theirs, 2 * ours, rtol=1e-12, atol=1e-12)  # out_proj is linear, no bias


def test_the_adapter_survives_train_and_eval(tmp_path):
    """``model.train()``/``model.eval()`` re-kernelize a model loaded with ``kernels`` on (transformers' default where
    the package is installed), which drops instance-level forwards of hub-kernel layers: HDP's forward stays, so a
    packed row of two samples still restarts the state between them (the stock forward, run per sample)."""
    from hf_hdp.engine import enable_hdp_attention

    model = _load(_save("qwen3_5_text", str(tmp_path / "m")), dtype=torch.float32)
    enable_hdp_attention(model, "auto")
    for mode in (True, False, True):
        model.train(mode)
    layer = _delta_net(model)
    hidden = torch.randn(1, 21, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = layer(hidden, hdp_metadata=_local_meta((12, 9)))
        alone = torch.cat([layer(hidden[:, :12]), layer(hidden[:, 12:])], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_padded_batches_and_generation_run_the_modules_own_forward(tmp_path):
    """Outside HDP's packed micro-batches (no ``hdp_metadata``: a padded batch, generation with a cache) an HDP-enabled
    model is the stock model: the logits of a right-padded batch on its real tokens, and greedy generation, equal the
    untouched model's."""
    from hf_hdp.engine import enable_hdp_attention

    path = _save("qwen3_5_text", str(tmp_path / "m"))
    stock, model = _load(path), _load(path)
    enable_hdp_attention(model, "auto")
    model.train()
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = stock(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-10, atol=1e-10)
    prompt = ids[:1, :5]
    assert torch.equal(
        model.generate(prompt, max_new_tokens=6, do_sample=False),
        stock.generate(prompt, max_new_tokens=6, do_sample=False),
    )


def test_the_adapter_survives_fully_shard_of_the_layer(runs):
    """FSDP2's ``fully_shard`` on the Gated DeltaNet module itself (its own FSDP unit, hooks around ``__call__``, a
    subclass of its class): HDP's forward, and the module's own without metadata, give the same outputs as before."""
    _, _, results = runs
    for r in results:
        assert r["fully_shard_layer"] == {"sharded": True, "hdp": 0.0, "own": 0.0}
