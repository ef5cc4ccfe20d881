"""compute_metrics, preprocess_logits_for_metrics and predict() under HDP equal stock Trainer's.

The eval set mixes lengths (2 to 30 tokens) with ``tokens_per_rank=16`` on 2 gloo ranks, so the
long samples are split over both ranks (zigzag ring, or Ulysses heads); HDP gathers every sample's
per-token outputs back into rows in dataset order, padded with -100. The reference is stock
``transformers.Trainer`` on one process with ``per_device_eval_batch_size=1`` (no padding inside a
batch), on the same float64 model and data:

- run_clm's pattern: ``preprocess_logits_for_metrics = argmax``, accuracy of ``preds[:, :-1]`` against
  ``labels[:, 1:]`` (numpy, as ``evaluate``'s accuracy): the same ``eval_accuracy`` on 2 ranks;
- ``predict()``: the same padded ``[samples, longest, vocab]`` logits and ``[samples, longest]``
  labels (ring and Ulysses plans), and ``test_accuracy``;
- ``eval_do_concat_batches=False``, ``batch_eval_metrics=True``, ``include_for_metrics=["inputs"]``:
  the same lists, the same final metric, the same inputs;
- refused settings name the argument and the fix.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_hdp import HDPConfig, HDPTrainer
from tests.dist_utils import run_distributed
from tests.models import VOCAB, load_model, save_tiny_model

LENGTHS = [5, 23, 9, 30, 12, 3, 17, 7, 2, 26]  # 23, 30, 17 and 26 exceed C = 16: split over the 2 ranks
C = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def rows(tiny):
    """Samples whose labels are the model's own next-token argmax at about half the positions (so the accuracy is
    far from 0 and any misalignment changes it), random tokens elsewhere, the first quarter masked with -100."""
    model = load_model(tiny)
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        with torch.no_grad():
            best = model(input_ids=ids[None]).logits[0].argmax(-1)
        labels = torch.randint(0, VOCAB, (n,), generator=g)
        hit = torch.rand(n, generator=g) < 0.5
        labels[1:][hit[1:]] = best[:-1][hit[1:]]  # label t is the target of the token before it (unshifted)
        labels[: n // 4] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def argmax(logits, labels):
    return logits.argmax(-1)


def accuracy(eval_pred):
    """run_clm's compute_metrics, with numpy: predictions are the argmax, in the labels' shape; shift the labels.
    (With eval_do_concat_batches=False both are lists of per-batch arrays.)"""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if not isinstance(preds, list):
        preds, labels = [preds], [labels]
    hits = scored = 0
    for p, l in zip(preds, labels):
        p, l = np.asarray(p)[:, :-1], np.asarray(l)[:, 1:]
        mask = l != -100
        hits, scored = hits + int((p[mask] == l[mask]).sum()), scored + int(mask.sum())
    return {"accuracy": hits / scored}


class BatchAccuracy:
    """The same accuracy for ``batch_eval_metrics=True``: accumulated per batch, returned at the last one."""

    def __init__(self):
        self.hits = self.count = 0
        self.calls = 0

    def __call__(self, eval_pred, compute_result=False):
        assert torch.is_tensor(eval_pred.predictions) and torch.is_tensor(eval_pred.label_ids)
        preds, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
        scored = labels != -100
        self.hits += int((preds[scored] == labels[scored]).sum())
        self.count += int(scored.sum())
        self.calls += 1
        if compute_result:
            result = {"accuracy": self.hits / self.count}
            self.hits = self.count = 0
            return result
        return None


def _args(out, **kw):
    base = dict(output_dir=out, use_cpu=True, report_to=[], disable_tqdm=True, per_device_eval_batch_size=1)
    base.update(kw)
    return TrainingArguments(**base)


def _stock(model_path, rows, out, **kw):
    metric_fns = kw.pop("metric_fns", True)
    fns = dict(compute_metrics=kw.pop("compute_metrics", accuracy), preprocess_logits_for_metrics=argmax)
    return Trainer(
        load_model(model_path), _args(out, **kw), eval_dataset=Dataset.from_list(rows), **(fns if metric_fns else {})
    )


# ------------------------------------------------------------------ 2 ranks vs one stock process
def _worker(rank, world_size, model_path, rows, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    ds = Dataset.from_list(rows)
    args = _args(out, per_device_eval_batch_size=3)  # global eval batches of 6, 4 samples: 2 plans
    assert args.world_size == world_size
    trainer = HDPTrainer(
        load_model(model_path),
        args,
        eval_dataset=ds,
        compute_metrics=accuracy,
        preprocess_logits_for_metrics=argmax,
        hdp_config=HDPConfig(tokens_per_rank=C, planner="naive"),
    )
    metrics = trainer.evaluate()
    ring = trainer.predict(ds)
    sent = trainer.mesh.stats.bytes_sent
    # Ulysses pieces (head-parallel all-to-all), full logits: no metric function at all
    ulysses = HDPTrainer(
        load_model(model_path),
        args,
        hdp_config=HDPConfig(tokens_per_rank=C, planner="balanced", attention_split="ulysses"),
    )
    loader = ulysses.get_eval_dataloader(ds)
    splits = {}
    for s in range(len(loader)):
        for kind, n in loader.dataset.plan(0, s)[1].splits().items():
            splits[kind] = splits.get(kind, 0) + n
    full = ulysses.predict(ds)
    return metrics, ring, sent, full, splits


def test_metrics_and_predict_on_2_ranks_equal_stock_trainer(tiny, rows, tmp_path):
    results = run_distributed(_worker, 2, tiny, rows, str(tmp_path / "out"))

    stock = _stock(tiny, rows, str(tmp_path / "stock"))
    ref_metrics = stock.evaluate()
    ref_argmax = stock.predict(Dataset.from_list(rows))
    ref_full = _stock(tiny, rows, str(tmp_path / "stock"), metric_fns=False).predict(Dataset.from_list(rows))
    assert 0.3 < ref_metrics["eval_accuracy"] < 0.9  # a real signal, not 0 of a random model
    longest = max(LENGTHS)
    assert ref_full.predictions.shape == (len(rows), longest, VOCAB) and ref_full.label_ids.shape == (
        len(rows),
        longest,
    )

    for rank, (metrics, ring, sent, full, splits) in enumerate(results):
        assert sent > 0, rank  # the long samples ran as rings over both ranks
        assert splits.get("ulysses", 0) >= 4 and set(splits) <= {"local", "ulysses"}, splits
        assert metrics["eval_accuracy"] == ref_metrics["eval_accuracy"], rank  # every rank, as Trainer
        # predict with the argmax: the same per-sample rows, the same metric under the test_ prefix
        assert ring.predictions.shape == ref_argmax.predictions.shape == (len(rows), longest)
        np.testing.assert_array_equal(ring.predictions, ref_argmax.predictions)
        np.testing.assert_array_equal(ring.label_ids, ref_argmax.label_ids)
        assert ring.metrics["test_accuracy"] == ref_argmax.metrics["test_accuracy"] == ref_metrics["eval_accuracy"]
        # full logits of Ulysses plans: same shape, padding and values
        assert full.predictions.shape == ref_full.predictions.shape and full.predictions.dtype == np.float64
        pad = ref_full.predictions == -100
        assert (pad.sum(-1) % VOCAB == 0).all() and pad.any()  # -100 rows after each sample's end
        np.testing.assert_array_equal(full.predictions == -100, pad)
        np.testing.assert_allclose(full.predictions, ref_full.predictions, rtol=1e-9, atol=1e-10)
        np.testing.assert_array_equal(full.label_ids, ref_full.label_ids)
        assert set(full.metrics) >= {"test_loss", "test_runtime"} and "test_accuracy" not in full.metrics


# ------------------------------------------------------------------ the other metric arguments, one process
def _hdp(model_path, rows, out, **kw):
    fns = dict(compute_metrics=kw.pop("compute_metrics", accuracy), preprocess_logits_for_metrics=argmax)
    return HDPTrainer(
        load_model(model_path),
        _args(out, **kw),
        eval_dataset=Dataset.from_list(rows),
        hdp_config=HDPConfig(tokens_per_rank=32),
        **fns,
    )


def test_concat_batch_metrics_and_inputs_equal_stock_trainer(tiny, rows, tmp_path):
    out = str(tmp_path / "out")
    # eval_do_concat_batches=False: the list of per-batch arrays (a batch: one sample here, each its own length)
    ref = _stock(tiny, rows, out, eval_do_concat_batches=False).predict(Dataset.from_list(rows))
    got = _hdp(tiny, rows, out, eval_do_concat_batches=False).predict(Dataset.from_list(rows))
    assert isinstance(got.predictions, list) and len(got.predictions) == len(ref.predictions) == len(rows)
    for a, b, la, lb in zip(got.predictions, ref.predictions, got.label_ids, ref.label_ids):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert got.metrics["test_accuracy"] == ref.metrics["test_accuracy"]

    # batch_eval_metrics=True: compute_metrics per batch with torch tensors, compute_result at the last
    ref_fn, got_fn = BatchAccuracy(), BatchAccuracy()
    ref = _stock(tiny, rows, out, batch_eval_metrics=True, compute_metrics=ref_fn).evaluate()
    got = _hdp(tiny, rows, out, batch_eval_metrics=True, compute_metrics=got_fn).evaluate()
    assert got_fn.calls == ref_fn.calls == len(rows)
    assert got["eval_accuracy"] == ref["eval_accuracy"]

    # include_for_metrics=["inputs"]: the samples' input_ids, padded with -100
    seen = {}

    def keep_inputs(key):
        def fn(eval_pred):
            seen[key] = eval_pred.inputs
            return accuracy(eval_pred)

        return fn

    _stock(tiny, rows, out, include_for_metrics=["inputs"], compute_metrics=keep_inputs("stock")).evaluate()
    _hdp(tiny, rows, out, include_for_metrics=["inputs"], compute_metrics=keep_inputs("hdp")).evaluate()
    assert seen["hdp"].shape == (len(rows), max(LENGTHS))
    np.testing.assert_array_equal(seen["hdp"], seen["stock"])


def test_refused_metric_arguments_name_the_fix(tiny, rows, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"include_for_metrics=\[\.\.\., 'loss'\]\) is not supported.*Remove 'loss'"):
        _hdp(tiny, rows, out, include_for_metrics=["loss"])
    with pytest.raises(
        ValueError,
        match=r"include_for_metrics=\['inputs'\], batch_eval_metrics=True\).*"
        r"batch_eval_metrics=False",
    ):
        _hdp(tiny, rows, out, include_for_metrics=["inputs"], batch_eval_metrics=True)
    # prediction_loss_only: nothing to refuse (stock gathers no predictions then), and no predictions
    loss_only = _hdp(tiny, rows, out, include_for_metrics=["loss"], prediction_loss_only=True)
    result = loss_only.predict(Dataset.from_list(rows))
    assert result.predictions is None and result.label_ids is None and "test_accuracy" not in result.metrics
    # a preprocess_logits_for_metrics that does not keep one row per token of the packed micro-batch
    trainer = HDPTrainer(
        load_model(tiny),
        _args(out),
        eval_dataset=Dataset.from_list(rows),
        compute_metrics=accuracy,
        preprocess_logits_for_metrics=lambda logits, labels: logits.mean(),
        hdp_config=HDPConfig(tokens_per_rank=32),
    )
    with pytest.raises(ValueError, match=r"preprocess_logits_for_metrics must return .* shape \[1, \d+, \.\.\.\]"):
        trainer.evaluate()
