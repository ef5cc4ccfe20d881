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
- the dataset's columns and the data collator: :mod:`hf_hdp.data.columns` (shared with HDPAccelerator).
"""

from __future__ import annotations

import inspect

from transformers import Trainer

#: Trainer methods that make up HDP's step and evaluation; another Trainer's version would bypass HDP
STEP_METHODS = (
    "training_step",
    "compute_loss",
    "get_train_dataloader",
    "get_eval_dataloader",
    "evaluation_loop",
    "create_accelerator_and_postprocess",
    "create_optimizer",
    "log",
)
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
        order = ", ".join(
            [hdp_cls.__name__] + [b.__name__ for b in cls.__bases__ if b is not hdp_cls and not issubclass(b, hdp_cls)]
        )
        raise TypeError(
            f"{cls.__name__}({bases}): {owner.__name__}.{name} comes before HDPTrainer's in the method order, so "
            f"HDP's step would be bypassed (the loss would be {owner.__name__}'s over one micro-batch, and "
            f"evaluation would wait forever on ranks that hold no sample). Put HDPTrainer first: "
            f"class {cls.__name__}({order}): ..."
            + (
                " For TRL's SFTTrainer, use hf_hdp.integrations.trl.HDPSFTTrainer (pip install 'hf-hdp[trl]')."
                if owner.__name__ == "SFTTrainer"
                else ""
            )
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


def check_metrics_arguments(
    compute_metrics, preprocess_logits_for_metrics, prediction_loss_only: bool, args=None
) -> None:
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


def positional_arguments(pos: tuple) -> dict:
    """Trainer's positional arguments after ``args`` (``data_collator``, ``train_dataset``, ...) by name."""
    names = list(inspect.signature(Trainer.__init__).parameters)[3:]  # self, model, args
    if len(pos) > len(names):
        raise TypeError(f"HDPTrainer takes at most {len(names) + 2} positional arguments, got {len(pos) + 2}")
    return dict(zip(names, pos))
