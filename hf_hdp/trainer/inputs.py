"""What HDPTrainer does with each Trainer input: honour it exactly, or refuse it at construction.

Stock ``Trainer`` takes many inputs that HDP's step would bypass: a data collator, a loss function,
metrics, dataset columns, methods of another Trainer in a subclass. HDP never ignores one silently.
This module holds those decisions, so that the trainer itself stays a thin list of override points:

- :func:`check_step_methods`: a class that puts another Trainer's step before HDPTrainer's in its MRO
  (``class T(SFTTrainer, HDPTrainer)``) would train with that Trainer's loss and hang in evaluation;
  refused, naming the order that works. A subclass of HDPTrainer may override ``compute_loss`` (it
  is called per micro-batch) but not ``prediction_step``, which HDP's evaluation never calls.
- :func:`check_metrics_arguments`: ``compute_metrics`` / ``preprocess_logits_for_metrics`` are honoured
  (HDP's evaluation reassembles per-sample predictions, :mod:`hf_hdp.trainer.evaluation`); refused at
  construction: ``include_for_metrics`` with ``"loss"``, and ``"inputs"`` with ``batch_eval_metrics``.
- :func:`row_rules`: the user's data collator, checked (:func:`check_collator`) and run per sample
  (see :mod:`hf_hdp.data.documents`), with the columns stock Trainer would give it.
- :func:`check_columns`: a dataset column that stock Trainer would pass to the model and HDP does
  not honour is refused, naming the column.
"""

from __future__ import annotations

import inspect

from transformers import Trainer

from ..data.documents import HONOURED_COLUMNS, RowRules, collator_name

#: Trainer methods that make up HDP's step and evaluation; another Trainer's version would bypass HDP
STEP_METHODS = ("training_step", "compute_loss", "get_train_dataloader", "get_eval_dataloader", "evaluation_loop",
                "create_accelerator_and_postprocess", "create_optimizer", "log")
#: Trainer methods HDP never calls, so an override would be silently ignored
UNUSED_METHODS = ("prediction_step",)


def _owner(cls, name: str):
    return next(c for c in cls.__mro__ if name in vars(c))


def check_step_methods(cls, hdp_cls) -> None:
    """Refuse a trainer class whose MRO puts another Trainer's step methods before HDPTrainer's."""
    for name in STEP_METHODS:
        owner = _owner(cls, name)
        if owner is Trainer or issubclass(owner, hdp_cls) or not issubclass(owner, Trainer):
            continue
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        order = ", ".join([hdp_cls.__name__] + [b.__name__ for b in cls.__bases__ if b is not hdp_cls
                                                 and not issubclass(b, hdp_cls)])
        raise TypeError(
            f"{cls.__name__}({bases}): {owner.__name__}.{name} comes before HDPTrainer's in the method order, so "
            f"HDP's step would be bypassed (the loss would be {owner.__name__}'s over one micro-batch, and "
            f"evaluation would wait forever on ranks that hold no sample). Put HDPTrainer first: "
            f"class {cls.__name__}({order}): ..."
            + (" For TRL's SFTTrainer, use hf_hdp.integrations.trl.HDPSFTTrainer (pip install 'hf-hdp[trl]')."
               if owner.__name__ == "SFTTrainer" else "")
        )
    for name in UNUSED_METHODS:
        owner = _owner(cls, name)
        if owner is not Trainer and issubclass(owner, Trainer):
            raise TypeError(
                f"{cls.__name__} overrides {owner.__name__}.{name}, which HDPTrainer never calls: HDP evaluates packed "
                "micro-batches split over ranks in its own loop (hf_hdp.trainer.evaluation), so the override would "
                "be ignored. Override compute_loss instead (HDP calls it for every micro-batch, in training and "
                "evaluation), or use the stock Trainer."
            )


def check_metrics_arguments(compute_metrics, preprocess_logits_for_metrics, prediction_loss_only: bool,
                            args=None) -> None:
    """Refuse the metric settings HDP cannot honour exactly, when the trainer is built.

    ``compute_metrics`` and ``preprocess_logits_for_metrics`` are honoured: HDP's evaluation gathers
    per-sample predictions (see :mod:`hf_hdp.trainer.evaluation`), as are ``eval_do_concat_batches``,
    ``batch_eval_metrics`` and ``include_for_metrics=["inputs"]``. Refused (``args``, the
    ``TrainingArguments``, when given): ``include_for_metrics`` with ``"loss"``, and ``"inputs"`` together
    with ``batch_eval_metrics=True``. Nothing is refused under ``prediction_loss_only=True``, where
    stock Trainer gathers no predictions and calls neither function.
    """
    if prediction_loss_only or args is None:
        return
    include = list(getattr(args, "include_for_metrics", None) or [])
    if "loss" in include:
        raise ValueError(
            "TrainingArguments(include_for_metrics=[..., 'loss']) is not supported by HDPTrainer: stock Trainer hands "
            "compute_metrics each eval batch's mean loss repeated for every sample of the batch, which depends on how "
            "its batches are padded and composed; HDP packs and splits samples over ranks. Remove 'loss' from "
            "include_for_metrics (eval_loss is the eval set's per-token mean as usual), or compute a per-sample loss "
            "from the predictions (preprocess_logits_for_metrics can return each token's log-probability of its "
            "label: logits.log_softmax(-1) gathered at labels[:, 1:])."
        )
    if "inputs" in include and getattr(args, "batch_eval_metrics", False):
        raise ValueError(
            "TrainingArguments(include_for_metrics=['inputs'], batch_eval_metrics=True) is not supported by "
            "HDPTrainer: stock Trainer then hands compute_metrics each process's raw, ungathered input batch, and an "
            "HDP batch is a packed plan step with no such rows. Set batch_eval_metrics=False (compute_metrics then "
            "gets every sample's input_ids rows in EvalPrediction.inputs), or drop 'inputs' from include_for_metrics."
        )


def check_collator(collator) -> None:
    """Refuse data collators whose meaning HDP cannot keep, before any row is read."""
    name = collator_name(collator)
    if getattr(collator, "mlm", False) is True:
        raise ValueError(
            f"data_collator={name}(mlm=True) masks and replaces tokens for masked language modelling; HDP trains "
            "causal language models. Use DataCollatorForLanguageModeling(tokenizer, mlm=False), or no collator."
        )
    if type(collator).__name__ == "DataCollatorWithFlattening":
        if getattr(collator, "separator_id", -100) != -100:
            raise ValueError(
                f"data_collator=DataCollatorWithFlattening(separator_id={collator.separator_id}) would train each "
                "sample's last token to predict the separator; HDP places every sample as its own sequence and gives "
                "the last token no target. Use separator_id=-100 (the default), or add the separator to the samples."
            )
        if getattr(collator, "position_ids_start", 0) != 0:
            raise ValueError(
                f"data_collator=DataCollatorWithFlattening(position_ids_start={collator.position_ids_start}): HDP "
                "numbers every sample's positions from 0. Use position_ids_start=0 (the default)."
            )


def signature_columns(model, label_names) -> list[str]:
    """The columns stock Trainer keeps under ``remove_unused_columns=True``: the model's forward arguments and labels."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    columns = list(inspect.signature(base.forward).parameters)
    return columns + ["label", "label_ids"] + list(label_names or [])


def row_rules(collator, model, args) -> RowRules:
    """How rows become documents for this trainer: the user's collator (``None``: none was given)."""
    if collator is None:
        return RowRules()
    check_collator(collator)
    columns = tuple(signature_columns(model, args.label_names)) if args.remove_unused_columns else None
    return RowRules(collator=collator, collator_columns=columns)


def check_columns(dataset, rules: RowRules, model, args, length_column: str, what: str) -> None:
    """Refuse columns that stock Trainer would hand to the model and HDP would not honour."""
    if rules.collator is not None:
        return  # the collator gets what stock Trainer gives it; its output is checked per sample
    ours = set(HONOURED_COLUMNS) | {length_column}
    if args.remove_unused_columns:
        passed = [c for c in dataset.column_names if c in signature_columns(model, args.label_names)]
    else:  # stock's default collator passes every column but strings to the model
        features = getattr(dataset, "features", None) or {}
        passed = [c for c in dataset.column_names if str(getattr(features.get(c), "dtype", "")) not in ("string", "large_string")]
    refused = [c for c in passed if c not in ours and not c.startswith("hdp_")]
    if refused:
        hint = " (rename it to `labels`: HDP reads token labels from `labels`)" if set(refused) & {"label", "label_ids"} else ""
        raise ValueError(
            f"{what} has the column(s) {refused}, which stock Trainer would pass to the model but HDPTrainer does not "
            f"use{hint}. HDP honours {list(HONOURED_COLUMNS)}. Remove the column(s) (ds.remove_columns({refused})), "
            "or turn them into labels/masks with a per-sample data_collator."
            + ("" if args.remove_unused_columns else " With remove_unused_columns=True, stock Trainer and HDP drop "
               "columns the model's forward does not take.")
        )
