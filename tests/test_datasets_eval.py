"""datasets integration and HDP evaluation.

- the length column: computed with ``datasets.map`` (batched, ``num_proc``), cached on disk, reused;
- a map-style dataset is read row by row, only the rows a rank's pieces name (never a token column);
- a streaming ``IterableDataset`` is refused with a message whose recipe works;
- ``trainer.evaluate()`` on 4 gloo ranks (samples split over 3 and 4 ranks) equals the per-token mean
  loss of one process running every sample alone with SDPA (float64);
- a global batch without a single label token skips the optimizer step: no NaN, a warning naming
  the step, weights and AdamW state unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer
from hf_hdp.collators import HDPDataError
from hf_hdp.data.loader import GlobalBatchSampler, HDPStepDataset
from hf_hdp.planning import plan_naive
from tests.dist_utils import run_distributed
from tests.models import VOCAB, load_model, reference_step, save_tiny_model
from tests.test_equivalence import WORLD, C, _samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m") / "llama"))


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _rows(n: int, seed: int = 0, max_len: int = 30) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _i in range(n):
        length = int(torch.randint(2, max_len, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3 :]})
    return rows


# ------------------------------------------------------------------ the length column
def _cache_files(folder):
    return {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith("cache-")}


def test_length_column_is_computed_with_num_proc_and_cached(tiny, tmp_path):
    rows = _rows(40)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    folder = str(tmp_path / "ds")
    cfg = HDPConfig(tokens_per_rank=64, global_batch_size=4, length_num_proc=2)
    assert _cache_files(folder) == {}

    first = HDPTrainer(load_model(tiny), _args(tmp_path), train_dataset=load_from_disk(folder), hdp_config=cfg)
    ds = first.train_dataset
    assert ds["hdp_length"][:] == [len(r["input_ids"]) for r in rows]
    assert ds["hdp_loss_tokens"][:] == [len(r["input_ids"]) - max(len(r["input_ids"]) // 3, 1) for r in rows]
    written = _cache_files(folder)
    assert len(written) == 2, written  # one cache file per map process: num_proc=2 really ran
    assert {os.path.join(folder, f) for f in written} == {c["filename"] for c in ds.cache_files}

    # a second trainer on the same data reads the cached columns: no new file, none rewritten
    second = HDPTrainer(load_model(tiny), _args(tmp_path), train_dataset=load_from_disk(folder), hdp_config=cfg)
    assert _cache_files(folder) == written
    assert second.train_dataset.cache_files == ds.cache_files
    assert (second.hdp_train_data.lengths == first.hdp_train_data.lengths).all()
    # a dataset that already has HDP's columns is measured again (they may be stale: see test_inputs.py)
    third = HDPTrainer(load_model(tiny), _args(tmp_path), train_dataset=ds, hdp_config=cfg)
    assert (third.hdp_train_data.lengths == first.hdp_train_data.lengths).all()


# ------------------------------------------------------------------ only the needed rows
class RecordingRows:
    """A map-style dataset view that records every key it is indexed with."""

    def __init__(self, dataset):
        self.dataset, self.keys = dataset, []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.dataset[key]


def test_each_rank_loads_only_the_rows_of_its_pieces(tmp_path):
    Dataset.from_list(_rows(64, max_len=60)).save_to_disk(str(tmp_path / "ds"))
    ds = load_from_disk(str(tmp_path / "ds"))
    assert ds.cache_files  # arrow on disk, memory-mapped: rows are read on demand
    from hf_hdp.collators import HDPCollator
    from hf_hdp.data.checks import measure_dataset

    ds, lengths, loss_tokens = measure_dataset(ds)
    sampler = GlobalBatchSampler(len(lengths), 16, seed=0)
    loaded = []
    for rank in range(WORLD):
        steps = HDPStepDataset(ds, lengths, loss_tokens, sampler, plan_naive, WORLD, rank, C, HDPCollator(VOCAB))
        steps.dataset = RecordingRows(steps.dataset)
        item = steps[(0, 1)]
        (key,) = steps.dataset.keys  # one read per step and rank: a list of rows
        mine = sorted({item.rows[p.sample] for mb in item.plan.for_rank(rank) for p in mb.pieces})
        assert isinstance(key, list) and sorted(key) == mine
        loaded.append(set(key))
    batch = set(sampler.batch_rows(0, 1))
    assert set().union(*loaded) == batch  # together the ranks load the batch, each sample once per member
    assert sum(map(len, loaded)) == sum(len(p.group) for p in item.plan.pieces())  # of its group, no more
    assert all(len(rows) < len(batch) for rows in loaded)
    assert {p.k for p in item.plan.pieces()} >= {1, 2}


def test_trainer_never_reads_a_token_column(tiny, tmp_path, monkeypatch):
    Dataset.from_list(_rows(40)).save_to_disk(str(tmp_path / "ds"))
    ds = load_from_disk(str(tmp_path / "ds"))
    keys = []
    original = Dataset.__getitem__
    monkeypatch.setattr(Dataset, "__getitem__", lambda self, key: (keys.append(key), original(self, key))[1])
    trainer = HDPTrainer(
        load_model(tiny, dtype=torch.float32),
        _args(tmp_path, max_steps=2),
        train_dataset=ds,
        hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=4),
    )
    trainer.train()
    columns = [k for k in keys if isinstance(k, str)]
    assert "hdp_length" in columns and "hdp_loss_tokens" in columns  # planning reads the per-row columns...
    assert not {"input_ids", "labels"} & set(columns) and not any(isinstance(k, slice) for k in keys), keys
    row_reads = [k for k in keys if isinstance(k, list)]
    assert len(row_reads) == 2 and all(len(k) == 4 for k in row_reads)  # ...tokens come in per step, 4 rows each


# ------------------------------------------------------------------ streaming
def test_streaming_dataset_is_refused_with_a_recipe_that_works(tiny, tmp_path):
    stream = Dataset.from_list(_rows(8)).to_iterable_dataset()
    cfg = HDPConfig(tokens_per_rank=64, global_batch_size=4)
    with pytest.raises(
        TypeError,
        match=r"(?s)map-style datasets.Dataset as train_dataset, got IterableDataset.*"
        r"streaming=False.*from_generator",
    ):
        HDPTrainer(load_model(tiny), _args(tmp_path), train_dataset=stream, hdp_config=cfg)
    with pytest.raises(TypeError, match=r"eval_dataset, got IterableDataset"):
        HDPTrainer(load_model(tiny), _args(tmp_path), eval_dataset=stream, hdp_config=cfg)

    def gen(ds):  # the message's recipe
        yield from ds

    converted = Dataset.from_generator(
        functools.partial(gen, stream), features=stream.features, cache_dir=str(tmp_path / "cache")
    )
    trainer = HDPTrainer(
        load_model(tiny, dtype=torch.float32), _args(tmp_path), train_dataset=converted, hdp_config=cfg
    )
    assert trainer.train().global_step == 1


# ------------------------------------------------------------------ evaluation
def _eval_worker(rank, world_size, model_path, out_dir):
    # the gloo group exists already; accelerate (inside TrainingArguments) joins it as MULTI_CPU
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    args = TrainingArguments(
        output_dir=out_dir, use_cpu=True, report_to=[], per_device_eval_batch_size=2, disable_tqdm=True
    )
    assert args.world_size == world_size
    samples = _samples()
    evals = {"all": Dataset.from_list(samples), "long": Dataset.from_list([samples[i] for i in (0, 3, 8)])}
    trainer = HDPTrainer(
        load_model(model_path), args, eval_dataset=evals, hdp_config=HDPConfig(tokens_per_rank=C, planner="naive")
    )
    metrics = trainer.evaluate()
    grads = [n for n, p in trainer.model.named_parameters() if p.grad is not None]
    return metrics, trainer.mesh.stats.bytes_sent, grads


def test_evaluate_on_4_ranks_equals_single_process(tiny, tmp_path):
    samples = _samples()
    results = run_distributed(_eval_worker, WORLD, tiny, str(tmp_path / "out"))
    ref_all = reference_step(load_model(tiny), samples)[0]  # per-token mean over the whole set
    ref_long = reference_step(load_model(tiny), [samples[i] for i in (0, 3, 8)])[0]
    for rank, (metrics, _sent, grads) in enumerate(results):
        assert metrics["eval_all_loss"] == pytest.approx(ref_all, rel=1e-12), rank
        assert metrics["eval_long_loss"] == pytest.approx(ref_long, rel=1e-12), rank
        assert grads == []  # forward only
        assert metrics["eval_all_samples_per_second"] > 0
    assert all(sent > 0 for _, sent, _ in results)  # long samples ran as rings (k = 3, 4) on every rank

    # one process, the same set: the same loss, also for a set passed to evaluate() directly
    trainer = HDPTrainer(
        load_model(tiny),
        _args(tmp_path),
        eval_dataset=Dataset.from_list(samples),
        hdp_config=HDPConfig(tokens_per_rank=64),
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ref_all, rel=1e-12)
    assert trainer.evaluate(Dataset.from_list(samples[:4]), metric_key_prefix="test")["test_loss"] == pytest.approx(
        reference_step(load_model(tiny), samples[:4])[0], rel=1e-12
    )


def test_evaluation_refuses_what_it_cannot_compute(tiny, tmp_path):
    no_labels = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100] * 3}, {"input_ids": [4]}])
    with pytest.raises(HDPDataError, match=r"eval_dataset has no label token"):
        HDPTrainer(load_model(tiny), _args(tmp_path), eval_dataset=no_labels, hdp_config=HDPConfig(tokens_per_rank=8))
    # compute_metrics / preprocess_logits_for_metrics are honoured (tests/test_eval_metrics.py); with
    # prediction_loss_only=True stock Trainer calls neither, and neither does HDP: the loss only, no predictions
    calls = []
    trainer = HDPTrainer(
        load_model(tiny),
        _args(tmp_path, prediction_loss_only=True),
        eval_dataset=Dataset.from_list(_rows(4)),
        compute_metrics=lambda p: calls.append(p) or {},
        hdp_config=HDPConfig(tokens_per_rank=64),
    )
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    result = trainer.predict(Dataset.from_list(_rows(2)))
    assert result.predictions is None and math.isfinite(result.metrics["test_loss"]) and calls == []


# ------------------------------------------------------------------ a global batch with no label token
def test_global_batch_without_labels_skips_the_optimizer_step(tiny, tmp_path, caplog):
    n, gbs = 8, 4
    empty = set(GlobalBatchSampler(n, gbs, seed=0).batch_rows(0, 1))  # the second step's rows
    rows = _rows(n)
    for r in empty:
        rows[r]["labels"] = [-100] * len(rows[r]["input_ids"])

    snapshots = []

    def snapshot(trainer):
        opt = trainer.optimizer
        state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
        weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        snapshots.append((weights, state))

    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snapshot(trainer)

    args = _args(
        tmp_path,
        max_steps=3,
        optim="adamw_torch",
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
    )
    trainer = HDPTrainer(
        load_model(tiny, dtype=torch.float32),
        args,
        train_dataset=Dataset.from_list(rows),
        hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=gbs),
    )
    trainer.add_callback(Snap())
    with caplog.at_level(logging.WARNING, logger="hf_hdp.trainer.trainer"):
        out = trainer.train()

    warnings = [r.getMessage() for r in caplog.records if "no label token" in r.getMessage()]
    assert (
        len(warnings) == 1 and warnings[0].startswith("global step 2 ") and "optimizer step was skipped" in warnings[0]
    )
    (w1, s1), (w2, s2), (w3, s3) = snapshots
    assert s1 and all(int(s["step"]) == 1 for s in s1.values())  # step 1 trained: AdamW has momentum now
    for k in w1:  # step 2 changed nothing: no momentum drift, no weight decay
        assert torch.equal(w2[k], w1[k]), k
    for pid, s in s1.items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(s2[pid][key]), torch.as_tensor(v)), key
    assert any(not torch.equal(w3[k], w2[k]) for k in w2)  # and step 3 trained again
    assert all(int(s["step"]) == 2 for s in s3.values())
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in logs][1] == 0.0 and logs[1]["hdp/skipped_steps"] == 1
    assert all(math.isfinite(v) for e in trainer.state.log_history for v in e.values() if isinstance(v, float))
    assert math.isfinite(out.training_loss)

    # the guard, not only the missing gradients, skips the step: whatever the optimizer, its own
    # step() never runs for the empty batch
    class CountingAdamW(torch.optim.AdamW):
        calls = 0

        def step(self, closure=None):
            CountingAdamW.calls += 1
            return super().step(closure)

    trainer = HDPTrainer(
        load_model(tiny, dtype=torch.float32),
        args,
        train_dataset=Dataset.from_list(rows),
        optimizer_cls_and_kwargs=(CountingAdamW, {"lr": 1e-2}),
        hdp_config=HDPConfig(tokens_per_rank=64, global_batch_size=gbs),
    )
    trainer.train()
    assert CountingAdamW.calls == 2 and trainer.state.global_step == 3
