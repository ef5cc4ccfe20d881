"""HDPTrainingArguments: ``TrainingArguments`` that also carry every :class:`~hf_hdp.config.HDPConfig` setting.

A stock ``HfArgumentParser`` script (transformers' ``run_clm.py`` and the like) gets HDP's flags by
swapping one class::

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, HDPTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()   # --tokens_per_rank 8192 ...
    trainer = HDPTrainer(model=model, args=training_args, ...)   # reads training_args.hdp_config

The HDP fields are HDPConfig's own dataclass fields (names, types, defaults and help), copied when
this module is imported, so the two never drift apart; HDPConfig's ``__post_init__`` validates them
when the arguments are built (after ``TrainingArguments.__post_init__``), with HDPConfig's messages.
They are plain fields: ``to_dict`` / ``to_json_string``, ``HfArgumentParser.parse_dict`` and
pickling (``training_args.bin`` in checkpoints) carry them like any other argument.
"""

from __future__ import annotations

import dataclasses
import logging
import typing

from transformers import TrainingArguments

from .config import HDPConfig

__all__ = ["HDPTrainingArguments", "HDP_FIELDS", "hdp_config_from_args", "warn_if_uniform_lengths"]

#: The names of HDPConfig's fields, in its order: the HDP part of :class:`HDPTrainingArguments`.
HDP_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(HDPConfig))


def _copied_field(f: dataclasses.Field) -> dataclasses.Field:
    kwargs = {"metadata": dict(f.metadata), "init": f.init, "repr": f.repr, "compare": f.compare}
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = f.default_factory
    else:  # every TrainingArguments field has a default, so fields added after them need one too
        raise TypeError(f"HDPConfig.{f.name} has no default; HDPTrainingArguments cannot carry it")
    return dataclasses.field(**kwargs)


def _with_hdp_fields(cls):
    """Add HDPConfig's fields (resolved types, defaults, help) to ``cls``, then make it a dataclass."""
    hints = typing.get_type_hints(HDPConfig)  # HDPConfig's annotations are strings (postponed evaluation)
    taken = {f.name for f in dataclasses.fields(TrainingArguments)} | set(dir(TrainingArguments))
    clash = [name for name in HDP_FIELDS if name in taken]
    if clash:
        raise TypeError(f"HDPConfig fields {clash} clash with TrainingArguments attributes of the same name")
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for f in dataclasses.fields(HDPConfig):
        annotations[f.name] = hints[f.name]
        setattr(cls, f.name, _copied_field(f))
    cls.__annotations__ = annotations
    return dataclasses.dataclass(cls)


@_with_hdp_fields
class HDPTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus every :class:`~hf_hdp.config.HDPConfig` field (same names, defaults and help).

    ``.hdp_config`` is the validated HDPConfig they describe. Invalid HDP values are refused when
    the arguments are built, with HDPConfig's own message; values HDPConfig normalises (the
    command line's text ``"8192"`` for ``tokens_per_rank``, ``"0.5"`` for ``offload_ratio``) are
    stored normalised.
    """

    def __post_init__(self):
        super().__post_init__()
        config = self.hdp_config  # HDPConfig.__post_init__: its checks and messages
        for name in HDP_FIELDS:
            setattr(self, name, getattr(config, name))

    @property
    def hdp_config(self) -> HDPConfig:
        """A new, validated :class:`HDPConfig` built from this object's HDP fields."""
        return HDPConfig(**{name: getattr(self, name) for name in HDP_FIELDS})


def hdp_config_from_args(args, hdp_config: HDPConfig | None = None) -> HDPConfig:
    """The HDPConfig an HDPTrainer runs with, given its ``args`` and ``hdp_config`` arguments.

    - ``hdp_config`` only, or plain ``TrainingArguments``: ``hdp_config`` (or the defaults, ``HDPConfig()``);
    - :class:`HDPTrainingArguments` and no ``hdp_config``: ``args.hdp_config``;
    - both: ``hdp_config``, if it equals ``args.hdp_config``; otherwise a ``ValueError`` naming every
      setting on which they differ (HDP must not pick one silently).
    """
    from_args = args.hdp_config if isinstance(getattr(args, "hdp_config", None), HDPConfig) else None
    if hdp_config is None:
        return from_args if from_args is not None else HDPConfig()
    if from_args is not None:
        given, carried = hdp_config.to_dict(), from_args.to_dict()
        differ = [name for name in HDP_FIELDS if given.get(name) != carried.get(name)]
        if differ:
            detail = ", ".join(
                f"{name}: hdp_config={given.get(name)!r} vs args={carried.get(name)!r}" for name in differ
            )
            raise ValueError(
                f"HDPTrainer got hdp_config=HDPConfig(...) and args={type(args).__name__}(...), which carries HDP "
                f"settings too, and they differ ({detail}). Pass the HDP settings one way: set them on the "
                "arguments (e.g. --tokens_per_rank on the command line) and drop hdp_config=, or pass "
                "hdp_config=args.hdp_config after changing them there."
            )
    return hdp_config


def warn_if_uniform_lengths(lengths, logger: logging.Logger | None = None, what: str = "train_dataset") -> bool:
    """Warn (and return True) when every sample of a dataset has the same number of tokens.

    ``lengths``: tokens per sample (documents, for rows HDP splits into documents). Fixed-size
    blocks (e.g. ``run_clm.py``'s ``group_texts``, which concatenates the corpus and cuts it into
    ``block_size`` pieces) give HDP nothing to balance: every rank gets equal work under plain data
    parallelism already, and each long document has been cut instead of kept whole for HDP to
    split over ranks. Fewer than two samples are never uniform.
    """
    import numpy as np

    lengths = np.asarray(lengths).reshape(-1)
    if lengths.size < 2 or lengths.min() != lengths.max():
        return False
    (logger or logging.getLogger(__name__)).warning(
        "hf_hdp: all %d samples of %s have the same length (%d tokens), as from packing or group_texts blocks: "
        "HDP balances uneven sequence lengths and has nothing to gain here, and documents longer than a block "
        "were cut instead of being split over ranks whole. Keep documents whole, one per sample (no "
        "concatenation into blocks: with examples/run_clm.py pass --keep_documents instead of relying on "
        "--block_size), and let tokens_per_rank bound the memory and split the long ones.",
        int(lengths.size),
        what,
        int(lengths[0]),
    )
    return True
