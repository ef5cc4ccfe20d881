"""What happens to a dataset's columns and a data collator, for every front door: honoured exactly, or refused
before any step runs.

- :func:`row_rules`: the user's data collator, checked (:func:`check_collator`) and run per sample
  (see :mod:`hf_hdp.collators.documents`), with the columns stock Trainer would give it.
- :func:`check_columns`: a dataset column that stock Trainer would pass to the model and HDP does
  not honour is refused, naming the column.
"""

from __future__ import annotations

import inspect

from ..collators.documents import HONOURED_COLUMNS, RowRules, collator_name


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
        passed = [
            c
            for c in dataset.column_names
            if str(getattr(features.get(c), "dtype", "")) not in ("string", "large_string")
        ]
    refused = [c for c in passed if c not in ours and not c.startswith("hdp_")]
    if refused:
        hint = (
            " (rename it to `labels`: HDP reads token labels from `labels`)"
            if set(refused) & {"label", "label_ids"}
            else ""
        )
        raise ValueError(
            f"{what} has the column(s) {refused}, which stock Trainer would pass to the model but HDPTrainer does not "
            f"use{hint}. HDP honours {list(HONOURED_COLUMNS)}. Remove the column(s) (ds.remove_columns({refused})), "
            "or turn them into labels/masks with a per-sample data_collator."
            + (
                ""
                if args.remove_unused_columns
                else " With remove_unused_columns=True, stock Trainer and HDP drop "
                "columns the model's forward does not take."
            )
        )
