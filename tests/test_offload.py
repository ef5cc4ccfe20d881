"""Selective activation offloading (``HDPConfig.offload_ratio``, :mod:`hf_hdp.engine.offload`) on CPU, float64.

- gradients with offload_ratio 0.5 and 1.0 are bit for bit those without, with and without gradient
  checkpointing (non-reentrant and reentrant), and under bf16 autocast;
- the bytes moved to the host, and back, equal exactly the sizes of the tensors the rule selects,
  counted by an independent saved-tensor pass (with checkpointing: layers x tokens x hidden x 8);
- parameters are never copied, nor autocast's cast copies of weights;
- "auto" offloads floor(r * layers) layers with r = the cost model's hidden fraction, which the test
  computes by hand (a ring piece counts 1/k of its sequence's attention);
- HDPTrainer on 2 gloo ranks with a sample split over both: the same weights with offloading as
  without, every micro-batch offloads, ``hdp/offloaded_bytes`` is logged;
- refusals of bad ratios.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_hdp.collators import HDPCollator, count_loss_tokens
from hf_hdp.distributed.mesh import DynamicMesh
from hf_hdp.engine import enable_hdp_attention, forward_micro_batch, run_micro_batches
from hf_hdp.engine import offload as offload_module
from hf_hdp.engine.offload import MIN_OFFLOAD_BYTES, ActivationOffloader, micro_batch_attention_time
from hf_hdp.planning import CostModel, plan_naive
from tests.dist_utils import run_distributed
from tests.models import TINY_CONFIG, VOCAB

CPU = torch.device("cpu")
LENGTHS = [50, 6, 8, 10, 12]
C = 50  # two micro-batches on one rank: {50} and {6, 8, 10, 12}


def _model(dtype=torch.float64, layers: int = 3):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_CONFIG, "num_hidden_layers": layers})).to(dtype)
    model.train()
    enable_hdp_attention(model)
    return model


def _samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]} if i % 2 else {"input_ids": ids})
    return out


def _micro_batches(world: int = 1, rank: int = 0, tokens_per_rank: int = C):
    samples = _samples()
    plan = plan_naive([len(s["input_ids"]) for s in samples], world, tokens_per_rank)
    collator = HDPCollator(vocab_size=VOCAB)
    return [collator(mb, dict(enumerate(samples))) for mb in plan.for_rank(rank)], plan


N_LOSS = sum(count_loss_tokens(s["input_ids"], s.get("labels")) for s in _samples())


def _step(model, offload=None, backend="reference", context=None):
    """Loss and gradients of this rank's micro-batches (fresh ones each time)."""
    micro, _ = _micro_batches()
    model.zero_grad(set_to_none=True)
    kw = {} if context is None else {"context": context}
    loss = run_micro_batches(model, micro, N_LOSS, DynamicMesh(), backend, CPU, offload=offload, **kw)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def _selected(model, layers, backend="reference"):
    """``(bytes, tensors)`` the rule selects, counted independently: every tensor autograd saves while one of
    the first ``layers`` decoder layers runs (an int, or one per micro-batch), of at least MIN_OFFLOAD_BYTES,
    not a parameter nor a view of one, each distinct unchanged tensor once (strong references keep ids unique)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside: list[int] = []
    kept: dict = {}

    def pack(t):
        if (
            inside
            and type(t) is torch.Tensor
            and t.numel() * t.element_size() >= MIN_OFFLOAD_BYTES
            and t.untyped_storage().data_ptr() not in params
        ):
            kept[(id(t), t._version)] = t
        return t

    micro, _ = _micro_batches()
    per_batch = layers if isinstance(layers, list) else [layers] * len(micro)
    total = count = 0
    for batch, n in zip(micro, per_batch):
        handles = []
        for layer in model.model.layers[:n]:
            handles.append(layer.register_forward_pre_hook(lambda m, a: inside.append(1)))
            handles.append(layer.register_forward_hook(lambda m, a, o: inside.clear()))  # returns None: output kept
        kept.clear()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = forward_micro_batch(model, batch, N_LOSS, DynamicMesh(), backend, CPU)
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        total += sum(t.numel() * t.element_size() for t in kept.values())
        count += len(kept)
    model.zero_grad(set_to_none=True)
    return total, count


def _checkpointing(model, reentrant: bool | None):
    if reentrant is None:
        model.activation_checkpointing_disable()
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize("reentrant", [None, False, True], ids=["no-checkpointing", "checkpointing", "reentrant"])
def test_gradients_are_unchanged_and_the_bytes_are_exactly_the_selected_tensors(reentrant):
    model = _model()
    _checkpointing(model, reentrant)
    ref_loss, ref = _step(model)
    tokens = sum(LENGTHS)
    moved = {}
    for ratio, layers in ((0.5, 2), (1.0, 3)):  # ceil(0.5 * 3) = 2 layers
        off = ActivationOffloader(ratio)
        loss, grads = _step(model, off)
        assert loss == ref_loss
        for name, g in ref.items():
            assert torch.equal(grads[name], g), (ratio, name)
        want_bytes, want_tensors = _selected(model, layers)
        assert off.stats.bytes_to_host == want_bytes > 0
        assert off.stats.bytes_from_host == want_bytes  # every tensor came back, once
        assert off.stats.tensors == want_tensors
        assert (off.stats.micro_batches, off.stats.layers, off.last_layers) == (2, 2 * layers, layers)
        if reentrant is not None:  # a recomputed layer saves its input only: [1, T, 64] float64
            assert want_bytes == layers * tokens * 64 * 8 and want_tensors == 2 * layers
        moved[ratio] = want_bytes
    assert moved[0.5] < moved[1.0]


def test_parameters_and_weight_casts_are_never_copied(monkeypatch):
    seen, copied = [], []
    pack, to_host = offload_module._Session.pack, offload_module._Session._to_host
    monkeypatch.setattr(offload_module._Session, "pack", lambda self, t: (seen.append(t), pack(self, t))[1])
    monkeypatch.setattr(
        offload_module._Session, "_to_host", lambda self, t, layer: (copied.append(t), to_host(self, t, layer))[1]
    )
    # float64: the linear layers save their weights, which stay
    model = _model()
    _step(model, ActivationOffloader(1.0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert any(isinstance(t, torch.nn.Parameter) for t in seen)
    assert copied and not any(
        isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in params for t in copied
    )
    # float32 under bf16 autocast: the linear layers save autocast's bf16 copies of the weights, which stay too
    seen.clear(), copied.clear()
    model = _model(torch.float32)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    ref_loss, ref = _step(model, backend="cpu_flash", context=autocast)
    loss, grads = _step(model, ActivationOffloader(1.0), backend="cpu_flash", context=autocast)
    assert loss == ref_loss and all(torch.equal(grads[k], g) for k, g in ref.items())
    shapes = {tuple(p.shape) for p in model.parameters()}
    casts = [t for t in seen if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes and type(t) is torch.Tensor]
    assert casts  # the hook saw them ...
    assert copied and not any(t.dtype == torch.bfloat16 and tuple(t.shape) in shapes for t in copied)  # ... kept them


def test_auto_offloads_the_layers_whose_copy_hides_behind_the_attention():
    model = _model()
    micro, _ = _micro_batches()
    metas = [m["hdp_metadata"] for m in micro]
    assert [m.local_seqlens for m in metas] == [(50,), (6, 8, 10, 12)]
    a, saved = 1e-9, 1000.0  # seconds per token pair per layer; bytes one layer saves per token
    for bandwidth in (0.0, 5e10, 1e11, 1e12):
        cost = CostModel(
            a=a,
            b=0.0,
            c=0.0,
            num_layers=3,
            host_bandwidth=bandwidth,
            layer_saved_bytes_per_token=saved,
            layer_input_bytes_per_token=saved / 8,
        )
        off = ActivationOffloader("auto", cost_model=lambda: cost)
        layers = []
        for lengths in ((50,), (6, 8, 10, 12)):
            # r = forward attention (a third of forward + backward) x bandwidth / all layers' saved bytes, at most 1
            forward_attention = 3 * a * sum(s * s for s in lengths) / 3
            r = min(1.0, forward_attention * bandwidth / (sum(lengths) * 3 * saved))
            layers.append(math.floor(r * 3 + 1e-9))
        got = [off.layers_to_offload(m, 3) for m in metas]
        assert got == layers, (bandwidth, got, layers)
        assert layers == {0.0: [0, 0], 5e10: [2, 0], 1e11: [3, 0], 1e12: [3, 3]}[bandwidth]  # r = 0.83, 0.16 at 5e10
        # checkpointing: only each layer's input (here 1/8 of the saved bytes) has to hide
        assert off.micro_batch_ratio(metas[1], checkpointing=True) == pytest.approx(
            min(1.0, 8 * off.micro_batch_ratio(metas[1]))
        )
    # the long sample's micro-batch offloads its first 2 layers, the short samples' none; exactly those tensors move
    cost = CostModel(a=a, b=0.0, c=0.0, num_layers=3, host_bandwidth=5e10, layer_saved_bytes_per_token=saved)
    off = ActivationOffloader("auto", cost_model=cost)
    ref_loss, ref = _step(model)
    loss, grads = _step(model, off)
    assert loss == ref_loss and all(torch.equal(grads[k], g) for k, g in ref.items())
    want, _ = _selected(model, [2, 0])
    assert off.stats.bytes_to_host == off.stats.bytes_from_host == want > 0
    assert (off.stats.micro_batches, off.stats.layers, off.last_layers) == (1, 2, 0)


def test_a_ring_piece_counts_its_share_of_the_attention():
    # 2 ranks, C = 32: the 50-token sample is split over both, beside a local 6-token one
    micro, plan = _micro_batches(world=2, rank=0, tokens_per_rank=32)
    cost = CostModel(a=1e-9, b=0.0, c=0.0, num_layers=3, host_bandwidth=1e10, layer_saved_bytes_per_token=100.0)
    for batch, mb in zip(micro, plan.for_rank(0)):
        meta = batch["hdp_metadata"]
        hand = sum(3 * 1e-9 * p.length**2 / len(p.group) for p in mb.pieces)
        assert micro_batch_attention_time(cost, meta) == pytest.approx(hand, rel=1e-12)
        assert cost.micro_batch_attention_time(mb) == pytest.approx(hand, rel=1e-12)
    assert any(batch["hdp_metadata"].rings for batch in micro)


def test_offload_ratios_are_refused_with_the_fix():
    for bad in (1.5, -0.1, "half", True, None):
        with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
            ActivationOffloader(bad)
    with pytest.raises(ValueError, match="needs a cost model"):
        ActivationOffloader("auto")
    with pytest.raises(ValueError, match="min_bytes must be a non-negative integer"):
        ActivationOffloader(0.5, min_bytes=-1)
    from hf_hdp import HDPConfig

    assert ActivationOffloader.from_config(HDPConfig()) is None  # 0: off
    assert ActivationOffloader.from_config(HDPConfig(offload_ratio=0.25)).ratio == 0.25


# ------------------------------------------------------------------ HDPTrainer on 2 gloo ranks
STEPS = 2
RUNS = {  # name: (offload_ratio, gradient checkpointing)
    "none": (0.0, False),
    "half": (0.5, False),
    "auto": ("auto", False),
    "ckpt_all": (1.0, True),
}


def _rows() -> list[dict]:
    """40-token samples take both ranks (C = 24); the 3-token ones run on one."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(6):
        n = 40 if i % 3 == 0 else 3
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids})
    return rows


def _trainer_worker(rank, world, model_path, out_dir):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from tests.models import load_model

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    out = {}
    for name, (ratio, ckpt) in RUNS.items():
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, name),
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            seed=0,
            max_steps=STEPS,
            learning_rate=0.05,
            optim="sgd",
            logging_steps=1,
            save_strategy="no",
            gradient_checkpointing=ckpt,
        )
        trainer = HDPTrainer(
            load_model(model_path),
            args,
            train_dataset=Dataset.from_list(_rows()),
            hdp_config=HDPConfig(planner="naive", tokens_per_rank=24, global_batch_size=3, offload_ratio=ratio),
        )
        trainer.train()
        stats = trainer.hdp_offload.stats if trainer.hdp_offload is not None else None
        out[name] = {
            "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "stats": None if stats is None else stats.copy(),
            "logged": [e["hdp/offloaded_bytes"] for e in trainer.state.log_history if "hdp/offloaded_bytes" in e],
            "micro_batches": trainer.hdp_stats.totals["micro_batches"],
            "split": trainer.hdp_stats.totals["group_sizes"].get(2, 0),
        }
    return out


def test_two_ranks_with_a_split_sample_train_the_same_weights_with_offloading(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_CONFIG))
    model.save_pretrained(str(tmp_path / "model"))
    results = run_distributed(_trainer_worker, 2, str(tmp_path / "model"), str(tmp_path), timeout=240)
    for rank, out in enumerate(results):
        assert out["none"]["split"] > 0  # a 40-token sample ran on both ranks
        # (recomputing a layer in float64 runs the same operations: checkpointing alone changes no bit either)
        for name, ref in (("half", "none"), ("auto", "none"), ("ckpt_all", "none")):
            for key, value in out[ref]["weights"].items():
                assert torch.equal(out[name]["weights"][key], value), (rank, name, key)
        for name, layers in (("half", 1), ("ckpt_all", 2)):  # ceil(0.5 * 2) = 1 of the 2 layers
            stats = out[name]["stats"]
            assert stats.bytes_to_host == stats.bytes_from_host > 0, (rank, name)
            assert stats.micro_batches == out[name]["micro_batches"]  # every micro-batch offloads
            assert stats.layers == layers * stats.micro_batches
            assert sum(out[name]["logged"]) == stats.bytes_to_host and len(out[name]["logged"]) == STEPS
        assert out["none"]["stats"] is None and out["none"]["logged"] == []


def test_a_fixed_offload_ratio_adds_the_copy_time_compute_does_not_hide_to_the_estimates():
    import dataclasses

    from hf_hdp.planning import CostModel, plan_naive
    from hf_hdp.planning.cost.memory import offloaded_layers

    base = CostModel.default()  # LLaMA-7B on H100, 50 GB/s to the host
    for lengths in ([8192], [300] * 20, [200000]):
        plan = plan_naive(lengths, 32, 8192)
        mb = plan.micro_batches[0]
        plain = base.micro_batch_breakdown(mb)[0]
        for ratio in (0.25, 1.0):
            cost = dataclasses.replace(base, offload_ratio=ratio)
            layers = offloaded_layers(ratio, base.num_layers)
            exposed = base.offload_exposed_time(mb.num_tokens, base.micro_batch_attention_time(mb), layers)
            assert cost.micro_batch_breakdown(mb)[0] == pytest.approx(plain + exposed, rel=1e-12)
    short = plan_naive([300] * 20, 32, 8192).micro_batches[0]  # little attention to hide a copy behind
    assert (
        dataclasses.replace(base, offload_ratio=1.0).micro_batch_breakdown(short)[0]
        > base.micro_batch_breakdown(short)[0]
    )
