"""Sharded checkpoints (:mod:`hf_hdp.trainer.saving`, :mod:`hf_hdp.engine.state`) on gloo CPU ranks.

One chain of real runs (tests/test_zero.py's tiny Llama, float64, AdamW, 12 samples, global batch 3, 4 steps):
ZeRO-1 at 4 ranks saves at step 1 -> FSDP ``full_shard`` at 2 ranks resumes and saves at step 3 -> ZeRO-2 at 3
ranks resumes; FSDP (sharded weights) at 4 ranks -> ZeRO-2 at 2 and ``shard_grad_op`` at 3; and today's
full-state format (``optimizer.pt``, written for an unsharded optimizer) -> FSDP at 2 and ZeRO-1 at 3. Every resumed
run ends with the uninterrupted run's weights. Each rank's optimizer-state bytes during save and load are a
part of the whole, never the whole. ``consolidate`` turns the FSDP checkpoint into a folder that
``from_pretrained`` loads with the trained weights; ``save_model`` under FSDP writes one (split by size).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.models import save_tiny_model
from tests.test_zero import C_FOR_WORLD, STEPS, _close, _train

C = {**C_FOR_WORLD, 3: 16}


def _worker(rank, world, model, base, runs):
    import hf_hdp.engine.export
    import tests.test_zero
    from hf_hdp.engine.state import IO_STATS

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    tests.test_zero.C_FOR_WORLD.update(C)
    hf_hdp.engine.export.DEFAULT_SHARD_BYTES = 40_000  # a few files for the tiny model
    out = {}
    for name, kwargs in runs.items():
        kwargs = dict(kwargs)
        save_model = kwargs.pop("save_model", False)
        if kwargs.get("resume"):
            kwargs["resume"] = os.path.join(base, kwargs["resume"])
        for key in IO_STATS:
            IO_STATS[key] = 0
        record = _train(model, os.path.join(base, f"w{world}", name), world, **kwargs)
        record["io"] = dict(IO_STATS)
        out[name] = record
        if save_model:
            out[name]["save_model"] = _save_model(model, os.path.join(base, f"w{world}", name), world, kwargs)
    return out


def _save_model(model, out_dir, world, kwargs):
    """save_model() of a trainer resumed from the run's last checkpoint (no step left: it only loads)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from tests.models import load_model
    from tests.test_zero import GLOBAL_BATCH, _rows

    args = TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        max_steps=STEPS,
        learning_rate=1e-2,
        weight_decay=0.1,
        save_strategy="no",
        fsdp=kwargs["fsdp"],
    )
    trainer = HDPTrainer(
        load_model(model),
        args,
        train_dataset=Dataset.from_list(_rows()),
        hdp_config=HDPConfig(planner="naive", tokens_per_rank=C[world], global_batch_size=GLOBAL_BATCH),
    )
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model(os.path.join(out_dir, "final"))
    return sorted(os.listdir(os.path.join(out_dir, "final")))


# (a resumed run keeps its checkpoint's save_steps: Trainer reads them from trainer_state.json)
RUNS_4 = {
    "zero0": dict(zero_stage=0, save_steps=2),  # an unsharded optimizer: optimizer.pt, today's full-state format
    "zero1": dict(zero_stage=1, save_steps=1),
    "fsdp": dict(fsdp="full_shard", save_steps=2, save_model=True),
}
RUNS_2 = {
    "zero1_to_fsdp": dict(fsdp="full_shard", save_steps=1, resume="w4/zero1/checkpoint-1"),
    "fsdp_to_zero2": dict(zero_stage=2, resume="w4/fsdp/checkpoint-2"),
    "legacy_to_fsdp": dict(fsdp="full_shard", resume="w4/zero0/checkpoint-2"),
}
RUNS_3 = {
    "fsdp_to_zero2": dict(zero_stage=2, resume="w2/zero1_to_fsdp/checkpoint-3"),  # the chain's third run
    "fsdp_to_grad_op": dict(fsdp="shard_grad_op", resume="w4/fsdp/checkpoint-2"),
    "legacy_to_zero1": dict(zero_stage=1, resume="w4/zero0/checkpoint-2"),
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded_ckpt")
    model = save_tiny_model("llama", str(base / "model"))
    runs = {}
    for world, spec in ((4, RUNS_4), (2, RUNS_2), (3, RUNS_3)):
        runs[world] = run_distributed(_worker, world, model, str(base), spec, timeout=900)
    return {"base": base, "model": model, **runs}


def _optimizer_bytes(record) -> int:
    """AdamW's state of every trained parameter: two float64 moments (and a float32 step each)."""
    return 2 * 8 * record["param_numel"]


def test_checkpoints_are_sharded_and_published_complete(chain):
    base = chain["base"]
    zero = base / "w4" / "zero1" / "checkpoint-2"
    fsdp = base / "w4" / "fsdp" / "checkpoint-2"
    assert (zero / "model.safetensors").exists() and not (zero / "optimizer.pt").exists()
    assert (zero / "hdp_sharded" / ".metadata").exists() and (zero / "hdp_state.json").exists()
    assert sorted(p.name for p in (zero / "hdp_sharded").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert not (fsdp / "model.safetensors").exists() and (fsdp / "config.json").exists()
    assert not any(p.name.startswith("tmp-checkpoint") for p in (base / "w4" / "zero1").iterdir())


def test_resume_reshards_across_world_sizes_and_modes_to_the_uninterrupted_weights(chain):
    reference = chain[4][0]["zero1"]["weights"]
    _close(chain[4][0]["fsdp"]["weights"], reference, "4 ranks FSDP vs ZeRO-1")
    _close(chain[4][0]["zero0"]["weights"], reference, "4 ranks ZeRO-0 vs ZeRO-1")
    for world in (2, 3):
        for r in range(world):
            for name, record in chain[world][r].items():
                start = {(2, "zero1_to_fsdp"): 1, (3, "fsdp_to_zero2"): 3}.get((world, name), 2)
                assert len(record["micro_batches"]) == STEPS - start, (world, name)
                _close(record["weights"], reference, f"{world} ranks, rank {r}, {name}")


def test_no_rank_holds_the_whole_optimizer_state_at_save_or_load(chain):
    whole = _optimizer_bytes(chain[4][0]["zero1"])
    for world in (4, 2, 3):
        for name in chain[world][0]:
            io = [chain[world][r][name]["io"] for r in range(world)]
            for key in ("save_optimizer_bytes", "load_optimizer_bytes"):
                counts = [i[key] for i in io]
                if not any(counts):
                    continue  # this run did not save (or did not load)
                assert all(0 < c <= 0.8 * whole for c in counts), (world, name, key, counts, whole)
                assert whole <= sum(counts) <= whole + 64 * world * 4 * 8, (world, name, key, counts, whole)
            if "fsdp" in name.split("_to_")[-1] or name == "fsdp":  # FSDP: the weights are shards too
                model_bytes = [i["save_model_bytes"] or i["load_model_bytes"] for i in io]
                assert not any(model_bytes) or all(0 < c <= 0.8 * whole / 2 for c in model_bytes), (name, model_bytes)


def test_consolidate_gives_a_transformers_folder_with_the_trained_weights(chain, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_hdp.cli import main

    checkpoint = chain["base"] / "w4" / "fsdp" / "checkpoint-4"
    out = tmp_path / "consolidated"
    assert main(["consolidate", str(checkpoint), str(out), "--optimizer", "--max-shard-size", "40KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    _close(model.state_dict(), chain[4][0]["fsdp"]["weights"], "consolidated")
    optim = torch.load(out / "optimizer.pt", weights_only=False)
    n_params = len(list(model.parameters()))
    assert sorted(optim["state"]) == list(range(n_params)) and optim["param_groups"][0]["lr"] >= 0
    assert main(["consolidate", str(chain["base"] / "model"), str(tmp_path / "x")]) == 2  # not a sharded checkpoint


def test_save_model_under_fsdp_writes_a_folder_split_by_size(chain):
    from transformers import AutoModelForCausalLM

    files = chain[4][0]["fsdp"]["save_model"]
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    model = AutoModelForCausalLM.from_pretrained(chain["base"] / "w4" / "fsdp" / "final", dtype=torch.float64)
    _close(model.state_dict(), chain[4][0]["fsdp"]["weights"], "save_model")
