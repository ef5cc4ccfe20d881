"""HDP evaluation: the eval set's token-level loss, equal to what one device computes, and per-sample predictions.

``trainer.evaluate()`` keeps Trainer's own ``evaluate`` (multiple eval sets, speed metrics, logging,
``on_evaluate`` callbacks, memory metrics); HDPTrainer replaces only the two pieces under it:

- ``get_eval_dataloader`` -> :func:`eval_dataloader`: the eval set planned in global batches with
  the training machinery (length column, :class:`GlobalBatchSampler` *without shuffling*, the same
  planner and ``tokens_per_rank``), one item per global batch holding only this rank's micro-batches;
- ``evaluation_loop`` -> :func:`hdp_evaluation_loop`: forward only, under ``torch.no_grad``, through
  the ``"hdp"`` attention (ring P2P for split samples, in slot order as in training), summing this
  rank's token losses and label tokens; one bounded sum of ``[loss sum, label tokens]`` over the mesh at the end.

``eval_loss`` is that sum over the count: the per-token mean over the whole eval set, which is
what one process running every sample alone gets, whatever the placement or world size. (Stock
Trainer averages per-batch means instead, which weighs tokens of short batches more.)

The global eval batch is ``per_device_eval_batch_size x world_size`` samples, Trainer's own eval
batch. Any value gives the loss; it only sets how many samples one plan places at once.

**Predictions** (``compute_metrics``, ``preprocess_logits_for_metrics``, ``trainer.predict``). When
the loop is asked for predictions (``evaluate()`` with a ``compute_metrics``, or ``predict()``, unless
``prediction_loss_only``), :class:`PredictionGatherer` turns the packed, split micro-batches back
into what stock Trainer's loop hands the user, sample by sample:

1. Each micro-batch's forward keeps its full ``logits`` ``[1, T, V]`` (the chunked LM head is off
   for it, ``HDPConfig.loss_chunk_tokens`` does not apply), and ``preprocess_logits_for_metrics(logits,
   labels)`` runs on them at once, so ``argmax`` keeps only ``[1, T]``. ``labels`` there are the
   **unshifted** labels of the micro-batch's tokens, ``[1, T]`` aligned with ``logits`` row for row:
   row ``t`` holds the label of the same token of the same sample as in the ``[batch, length]``
   labels stock Trainer passes, i.e. ``labels[t]`` of the sample, not HDP's shifted target
   ``labels[t + 1]``. The function sees a packed micro-batch, not stock Trainer's padded batch: one
   that works per token (``argmax``, ``softmax``, gathering the label's log-probability) gives each
   sample exactly its stock values; one that mixes positions along the sequence would not. It must
   return a tensor, or a tuple/list of tensors, each ``[1, T, ...]``. The predictions are the model's
   ``logits`` only (``ignore_keys`` and other model outputs do not apply).
2. Every token's rows go to the host with their place: the sample (dataset row) and the position
   in it. A sample split over ranks contributes one piece per member and token range of its
   :meth:`~hf_hdp.planning.Piece.token_ranges` (ring zigzag chunks, Ulysses and hybrid shards alike);
   a row of several documents (a pre-packed row) contributes its documents at their offsets in it.
3. After each global batch, ONE bounded gather over the mesh (:meth:`DynamicMesh.gather_bytes`, every
   rank receives) gives every rank all pieces of the batch, which it reassembles in dataset order:
   ``[samples of the batch, longest sample of the batch, ...]``, every sample's row holding its own
   tokens from position 0, and ``-100`` after its last token (Trainer's ``padding_index``, in
   predictions and labels alike). Every token must be filled exactly once, or it raises.
4. With ``eval_do_concat_batches=True`` (the default) the batches are concatenated as stock
   Trainer's ``nested_concat`` does: ``[samples of the eval set, longest sample of the eval set, ...]``,
   each row padded with ``-100`` past its own end. So a sample's row holds the same values as stock
   Trainer's row for it; what can differ is only padding *inside* stock Trainer's batches: where its
   data collator pads a shorter sample of a batch, stock rows hold the model's outputs on those pad
   tokens (labels there are ``-100`` with a collator that masks padding), HDP's hold ``-100``. With
   ``per_device_eval_batch_size=1`` (no padding within a batch) the arrays are equal. With
   ``eval_do_concat_batches=False`` the result is the list of the global batches' arrays (each padded
   to its own longest sample): stock Trainer's list on ``world_size`` processes, whose gathered
   step is the same ``per_device_eval_batch_size x world_size`` consecutive samples.
5. ``compute_metrics(EvalPrediction(predictions, label_ids, inputs=..., losses=None))`` runs on every
   rank, as in Trainer; its metrics are prefixed ``{prefix}_`` and merged with ``{prefix}_loss``.
   ``label_ids`` are the sample's unshifted labels (its ``input_ids`` where the eval set has no
   ``labels`` column: HDP evaluates every token then). ``include_for_metrics=["inputs"]`` adds the
   samples' ``input_ids`` rows, padded the same way. ``batch_eval_metrics=True`` calls
   ``compute_metrics(EvalPrediction(...), compute_result=is_last_batch)`` once per global batch with
   that batch's torch tensors, as Trainer does per gathered step; its last return is the metrics.
   Refused when the trainer is built (:func:`~hf_hdp.trainer.inputs.check_metrics_arguments`):
   ``include_for_metrics=["loss"]`` (stock hands each sample its batch's mean loss, which depends on
   how stock composes batches) and ``"inputs"`` with ``batch_eval_metrics`` (stock hands the raw,
   ungathered input batch).

What a sample's row means: its tokens as HDP evaluates them (and as ``eval_loss`` counts them), i.e.
after the data collator (run per sample) and after leading and trailing padding (``attention_mask``
zeros) are removed. For rows without padding this is the row stock Trainer runs; a row padded on
the left in the dataset starts at its first real token here, not at its padding. Where the user
opted into ``HDPConfig.long_sample_policy``, the eval set is the one it left: ``"drop"``: the kept
rows only, in order (row ``i`` of the arrays is the ``i``-th kept row); ``"truncate"``: a cut row
holds its first ``world_size x tokens_per_rank`` tokens, then ``-100``.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from transformers.trainer_utils import (
    EvalLoopOutput,
    EvalPrediction,
    PredictionOutput,
    denumpify_detensorize,
    speed_metrics,
)

from ..collators.collator import packed_ranges
from ..collators.documents import IGNORE_INDEX, row_documents
from ..data.checks import SOURCE_ROW_COLUMN
from ..data.loader import GlobalBatchSampler, HDPDataLoader, HDPStep, HDPStepDataset
from ..engine.step import forward_micro_batch

#: Trainer's ``padding_index`` for predictions, labels and inputs alike
PADDING_INDEX = -100


def eval_dataloader(trainer, measured) -> HDPDataLoader:
    """The eval set as HDP steps: unshuffled global batches of ``eval_batch_size x world`` samples."""
    sampler = GlobalBatchSampler(
        len(measured),
        trainer.args.per_device_eval_batch_size * trainer.mesh.world_size,
        shuffle=False,
        drop_last=False,
    )
    return trainer.hdp_step_loader(measured, sampler)


@contextlib.contextmanager
def _eval_context(trainer):
    with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
        yield


@contextlib.contextmanager
def _full_logits(trainer):
    """The trainer's config with ``loss_chunk_tokens=None`` for the loop (a copy; the user's object is untouched)."""
    config = trainer.hdp_config
    if config.loss_chunk_tokens is None:
        yield
        return
    trainer.hdp_config = copy.copy(config)
    trainer.hdp_config.loss_chunk_tokens = None
    try:
        yield
    finally:
        trainer.hdp_config = config


# ------------------------------------------------------------------ predictions
def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16 (Trainer's nested_numpify does the same)
        t = t.float()
    return t.numpy()


def _padded(arrays: list[np.ndarray], length: int) -> np.ndarray:
    """Concatenate ``[n_i, L_i, ...]`` arrays along dim 0, padding dim 1 to ``length`` with ``-100``."""
    first = arrays[0]
    out = np.full((sum(a.shape[0] for a in arrays), length) + first.shape[2:], PADDING_INDEX, dtype=first.dtype)
    n = 0
    for a in arrays:
        out[n : n + a.shape[0], : a.shape[1]] = a
        n += a.shape[0]
    return out


@dataclass
class _Batch:
    """One global batch, reassembled in dataset order: every output ``[samples, longest, ...]``."""

    predictions: tuple[np.ndarray, ...]
    labels: np.ndarray
    inputs: np.ndarray | None


class PredictionGatherer:
    """Per-sample predictions of an HDP eval loop (see the module docstring, "Predictions")."""

    def __init__(self, trainer, steps: HDPStepDataset, with_inputs: bool):
        self.trainer = trainer
        self.steps = steps
        self.rank = trainer.mesh.rank
        self.with_inputs = with_inputs
        self.preprocess = trainer.preprocess_logits_for_metrics
        self.single: bool | None = None  # the predictions are one tensor (not a tuple)
        self._records: list = []
        self._documents: dict = {}

    # ----------------------------------------------------------- one step, this rank
    def begin_step(self, step: HDPStep) -> None:
        """Load this rank's documents of ``step`` again: their unshifted labels (the packed batch holds shifted ones)."""
        steps, rows = self.steps, step.rows
        docs = steps.documents(rows)
        needed = sorted({p.sample for mb in step.plan.for_rank(self.rank) for p in mb.pieces})
        needed_rows = sorted({docs[s][0] for s in needed})
        loaded = steps.dataset[[rows[i] for i in needed_rows]] if needed_rows else {}
        columns = [c for c in loaded if c != SOURCE_ROW_COLUMN]
        row_docs = {
            i: row_documents({c: loaded[c][n] for c in columns}, rows[i], steps.rules)
            for n, i in enumerate(needed_rows)
        }
        self._documents = {}
        for s in needed:
            i, d = docs[s]
            first = int(steps.doc_offsets[rows[i]])
            offset = int(steps.doc_lengths[first : first + d].sum())  # the document's start in its row
            self._documents[s] = (i, offset, row_docs[i][d])
        self._records = []

    def micro_batch(self, mb, batch: dict, logits: torch.Tensor | None) -> None:
        """Keep the (preprocessed) per-token outputs of one micro-batch, with where each token belongs."""
        if not mb.pieces:
            return  # a placeholder micro-batch (lockstep plans): no token of any sample
        if logits is None:
            raise RuntimeError(
                "HDP evaluation needs the model's logits for predictions, but the forward returned none (a compute_loss "
                "override that returns outputs without `logits`?). compute_loss(..., return_outputs=True) must return "
                "the model's outputs with their logits."
            )
        layout = packed_ranges(mb)
        positions = torch.cat([torch.arange(a, b) for _, a, b in layout])
        if positions.numel() != batch["input_ids"].shape[1] or not torch.equal(
            positions, batch["position_ids"][0].cpu()
        ):
            raise RuntimeError(
                "HDP evaluation: the packed micro-batch's token layout is not the collator's "
                "(hf_hdp.collators.collator); cannot place its predictions."
            )
        labels, inputs = [], []
        for s, a, b in layout:
            _, _, doc = self._documents[s]
            labels.extend((doc.labels if doc.labels is not None else doc.input_ids)[a:b])
            inputs.extend(doc.input_ids[a:b])
        labels_t = torch.tensor(labels, dtype=torch.long, device=logits.device).unsqueeze(0)
        out = self.preprocess(logits, labels_t) if self.preprocess is not None else logits
        outputs = self._as_tuple(out, logits.shape[1])
        arrays = tuple(_numpy(o[0]) for o in outputs)
        cursor = 0
        for s, a, b in layout:
            i, offset, _ = self._documents[s]
            n = b - a
            self._records.append(
                (
                    i,
                    offset + a,
                    tuple(x[cursor : cursor + n] for x in arrays),
                    np.asarray(labels[cursor : cursor + n], dtype=np.int64),
                    np.asarray(inputs[cursor : cursor + n], dtype=np.int64) if self.with_inputs else None,
                )
            )
            cursor += n

    def _as_tuple(self, out, num_tokens: int) -> tuple[torch.Tensor, ...]:
        single = isinstance(out, torch.Tensor)
        outputs = (out,) if single else tuple(out) if isinstance(out, (tuple, list)) else None
        if (
            outputs is None
            or not outputs
            or any(
                not isinstance(o, torch.Tensor) or o.dim() < 2 or tuple(o.shape[:2]) != (1, num_tokens) for o in outputs
            )
        ):
            got = type(out).__name__ if outputs is None else [tuple(getattr(o, "shape", ())) for o in outputs]
            raise ValueError(
                f"preprocess_logits_for_metrics must return a tensor (or a tuple of tensors) with one row per token of "
                f"the logits it is given, shape [1, {num_tokens}, ...] for this packed micro-batch; got {got}. HDP "
                "packs samples into micro-batches of shape [1, tokens], so it applies the function per token: "
                "return per-token values (e.g. logits.argmax(-1)) and reduce them in compute_metrics."
            )
        if self.single is None:
            self.single = single
        return outputs

    # ----------------------------------------------------------- all ranks
    def end_step(self, step: HDPStep) -> _Batch:
        """ONE bounded gather of the step's pieces over the mesh; every rank reassembles the whole batch."""
        mesh = self.trainer.mesh
        parts = mesh.gather_bytes(
            pickle.dumps((self.single, self._records), protocol=pickle.HIGHEST_PROTOCOL),
            True,
            "evaluation predictions",
            step.global_step,
        )
        parts = [pickle.loads(part) for part in parts]
        records = [r for _, recs in parts for r in recs]
        # whether the outputs are one tensor: known on ranks that ran a micro-batch, so on every rank from here
        self.single = next((single for single, _ in parts if single is not None), self.single)
        self._records = []
        lengths = [int(self.steps.lengths[r]) for r in step.rows]
        longest = max(lengths)
        if not records:
            raise RuntimeError(f"HDP evaluation: no rank returned predictions for the eval rows {step.rows[:8]}")
        first = records[0][2]
        predictions = tuple(np.full((len(lengths), longest) + x.shape[1:], PADDING_INDEX, dtype=x.dtype) for x in first)
        labels = np.full((len(lengths), longest), PADDING_INDEX, dtype=np.int64)
        inputs = np.full((len(lengths), longest), PADDING_INDEX, dtype=np.int64) if self.with_inputs else None
        filled = np.zeros(len(lengths), dtype=np.int64)
        for i, start, preds, lab, ids in records:
            end = start + lab.shape[0]
            for out, x in zip(predictions, preds):
                out[i, start:end] = x
            labels[i, start:end] = lab
            if inputs is not None:
                inputs[i, start:end] = ids
            filled[i] += end - start
        if not np.array_equal(filled, np.asarray(lengths)):
            bad = int(np.flatnonzero(filled != np.asarray(lengths))[0])
            raise RuntimeError(
                f"HDP evaluation gathered {int(filled[bad])} predicted tokens of eval row {step.rows[bad]}, which has "
                f"{lengths[bad]}; the ranks did not evaluate the same plan."
            )
        return _Batch(predictions, labels, inputs)

    def structure(self, predictions: tuple):
        return predictions[0] if self.single else predictions


def _concat(batches: list[_Batch], single: bool, do_concat: bool):
    """Trainer's ``EvalLoopContainer.get_arrays``: one padded array per output, or the list of batches."""
    if not batches:
        return None, None, None
    if not do_concat:
        preds = [b.predictions[0] if single else b.predictions for b in batches]
        inputs = [b.inputs for b in batches] if batches[0].inputs is not None else None
        return preds, [b.labels for b in batches], inputs
    longest = max(b.labels.shape[1] for b in batches)
    preds = tuple(_padded([b.predictions[j] for b in batches], longest) for j in range(len(batches[0].predictions)))
    inputs = _padded([b.inputs for b in batches], longest) if batches[0].inputs is not None else None
    return preds[0] if single else preds, _padded([b.labels for b in batches], longest), inputs


def _torch(x, device):
    if isinstance(x, tuple):
        return tuple(_torch(t, device) for t in x)
    return torch.from_numpy(x).to(device)


# ------------------------------------------------------------------ the loop
def hdp_evaluation_loop(
    trainer,
    dataloader: HDPDataLoader,
    metric_key_prefix: str = "eval",
    prediction_loss_only: bool | None = None,
    description: str = "Evaluation",
) -> EvalLoopOutput:
    """Forward every micro-batch of this rank, then ONE all-reduce; returns ``{prefix}_loss``, and the
    per-sample predictions and ``compute_metrics``' metrics unless ``prediction_loss_only``
    (``None``: ``TrainingArguments.prediction_loss_only``, as in Trainer).

    The loss of a micro-batch comes from ``trainer.compute_loss`` with ``num_items_in_batch=1``,
    i.e. the sum of its token losses, so a ``compute_loss`` override is honoured (with predictions it
    is called with ``return_outputs=True``, as Trainer's ``prediction_step`` does).
    """
    args, mesh = trainer.args, trainer.mesh
    if prediction_loss_only is None:
        prediction_loss_only = args.prediction_loss_only
    predicting = description == "Prediction"
    gatherer = None
    if not prediction_loss_only:
        gatherer = PredictionGatherer(trainer, dataloader.dataset, "inputs" in (args.include_for_metrics or []))
    model = trainer.model
    model.eval()
    if hasattr(trainer.optimizer, "eval") and callable(trainer.optimizer.eval):
        trainer.optimizer.eval()  # schedule-free optimizers evaluate at their averaged weights
    trainer.callback_handler.eval_dataloader = dataloader
    loss_sum = torch.zeros((), dtype=torch.float64, device=args.device)
    label_tokens = torch.zeros((), dtype=torch.float64, device=args.device)
    planned_tokens = 0
    batches: list[_Batch] = []
    metrics = None
    num_steps = len(dataloader)
    with torch.no_grad(), _full_logits(trainer) if gatherer is not None else contextlib.nullcontext():
        for index, inputs in enumerate(dataloader):
            step = inputs["hdp_step"]
            if trainer.hdp_config.check_plan_hash:
                mesh.check_plan(step.fingerprint, trainer.state.global_step)
            planned_tokens += step.num_loss_tokens
            if gatherer is not None:
                gatherer.begin_step(step)
            for mb, batch in zip(step.plan.for_rank(mesh.rank), step.micro_batches):
                outputs = {}

                def loss_fn(m, b, num_items_in_batch, outputs=outputs):
                    if gatherer is None:
                        return trainer.compute_loss(m, b, num_items_in_batch=num_items_in_batch)
                    loss, outputs["out"] = trainer.compute_loss(
                        m, b, return_outputs=True, num_items_in_batch=num_items_in_batch
                    )
                    return loss

                loss, batch = forward_micro_batch(
                    model,
                    batch,
                    1,
                    mesh,
                    trainer.hdp_config.attention_backend,
                    args.device,
                    loss_fn=loss_fn,
                    context=lambda: _eval_context(trainer),
                )
                loss_sum += loss.detach().double()
                label_tokens += (batch["labels"] != IGNORE_INDEX).sum()
                if gatherer is not None:
                    out = outputs.get("out")
                    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
                    gatherer.micro_batch(mb, batch, logits)
            if gatherer is not None:
                gathered = gatherer.end_step(step)
                if args.batch_eval_metrics and trainer.compute_metrics is not None:
                    metrics = trainer.compute_metrics(
                        EvalPrediction(
                            predictions=_torch(gatherer.structure(gathered.predictions), args.device),
                            label_ids=_torch(gathered.labels, args.device),
                            inputs=None,
                            losses=None,
                        ),
                        compute_result=index == num_steps - 1,
                    )
                if not args.batch_eval_metrics or predicting:
                    batches.append(gathered)
            trainer.control = trainer.callback_handler.on_prediction_step(args, trainer.state, trainer.control)
    total_loss, count = mesh.sum_scalars(
        [float(loss_sum), float(label_tokens)], "evaluation loss sum", trainer.state.global_step
    )
    count = int(round(count))
    if count != planned_tokens:
        raise RuntimeError(
            f"HDP evaluation counted {count} label tokens over all ranks but the eval set's length columns "
            f"promise {planned_tokens}; the ranks did not evaluate the same samples."
        )
    predictions = label_ids = inputs = None
    if gatherer is not None:
        predictions, label_ids, inputs = _concat(batches, bool(gatherer.single), args.eval_do_concat_batches)
    if trainer.compute_metrics is not None and predictions is not None and not args.batch_eval_metrics:
        metrics = trainer.compute_metrics(
            EvalPrediction(predictions=predictions, label_ids=label_ids, inputs=inputs, losses=None)
        )
    metrics = denumpify_detensorize(metrics) if metrics is not None else {}
    metrics[f"{metric_key_prefix}_loss"] = total_loss / count
    for key in list(metrics):
        if not key.startswith(f"{metric_key_prefix}_"):
            metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
    return EvalLoopOutput(
        predictions=predictions,
        label_ids=label_ids,
        metrics=metrics,
        num_samples=dataloader.dataset.sampler.num_samples,
    )


def hdp_predict(trainer, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
    """Trainer's ``predict`` on HDP's loop: the test set planned like an eval set, per-sample predictions
    (see the module docstring), ``compute_metrics`` if given, speed metrics and the ``on_predict`` callbacks."""
    trainer._memory_tracker.start()
    loader = eval_dataloader(trainer, trainer._measure_eval_dataset(test_dataset))
    start_time = time.time()
    output = trainer.evaluation_loop(
        loader, description="Prediction", ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
    )
    total_batch_size = trainer.args.eval_batch_size * trainer.args.world_size
    output.metrics.update(
        speed_metrics(
            metric_key_prefix,
            start_time,
            num_samples=output.num_samples,
            num_steps=-(-output.num_samples // total_batch_size),
        )
    )
    trainer.control = trainer.callback_handler.on_predict(trainer.args, trainer.state, trainer.control, output.metrics)
    trainer._memory_tracker.stop_and_update_metrics(output.metrics)
    return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=output.metrics)
