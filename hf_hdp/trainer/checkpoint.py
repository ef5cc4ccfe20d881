"""HDP's part of a checkpoint: what decides which samples and plans the remaining steps see.

Trainer already saves the weights, optimizer, scheduler, RNG states and ``global_step``. HDP's
sampler and planner are pure functions of (dataset, seed, epoch, step, global batch size,
planner, tokens_per_rank, cost model), so resuming exactly needs those inputs, not an iterator
state. They are written to ``hdp_state.json`` in every checkpoint and checked on resume:

- anything that changes *which samples* form each global batch (dataset size or lengths, seed,
  global batch size) is refused, because the resumed run would skip or repeat samples;
- a different world size is allowed (elastic resume): HDP's batches do not depend on it, and its
  gradients equal a single device's, so the run continues as if nothing changed;
- a different planner or ``tokens_per_rank`` only changes placement and is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
from transformers import TrainerCallback

STATE_FILE = "hdp_state.json"
logger = logging.getLogger(__name__)


class ResumeMismatchError(ValueError):
    """The checkpoint was made with batches this run would not reproduce."""


STATE_FORMAT = 2
"""The newest ``hdp_state.json`` format this version reads."""

# Every key of hdp_state.json: its JSON type and the first format that has it. A file of an older
# format without a key loads it as None ("unknown"). A new key is added here, in one place.
STATE_KEYS: dict[str, tuple[type, int]] = {
    "format": (int, 1),
    "global_batch_size": (int, 1),
    "seed": (int, 1),
    "num_samples": (int, 1),
    "lengths_sha256": (str, 1),
    "content_sha256": (str, 2),
    "drop_last": (bool, 1),
    "planner": (str, 1),
    "tokens_per_rank": (int, 1),
    "world_size": (int, 1),
    "global_step": (int, 1),
    "hdp_config": (dict, 1),
}
# the integers' valid ranges (sizes and counts fit an int64; a seed, numpy's and torch's seeds)
_INT64 = 2**63 - 1
STATE_RANGES: dict[str, tuple[int, int]] = {
    "global_batch_size": (1, _INT64),
    "seed": (-(2**63), 2**64 - 1),
    "num_samples": (0, _INT64),
    "tokens_per_rank": (1, _INT64),
    "world_size": (1, 2**31 - 1),
    "global_step": (0, _INT64),
}
_JSON_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a JSON object",
    type(None): "null",
}


def lengths_digest(lengths: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]


def hdp_state(trainer) -> dict:
    """HDP's state of ``trainer`` for ``hdp_state.json``. ``content_sha256`` covers every row's token ids,
    labels and document boundaries, in dataset order (:attr:`~hf_hdp.data.checks.MeasuredDataset.digest`)."""
    cfg = trainer.hdp_config
    data = trainer.hdp_train_data
    return {
        "format": STATE_FORMAT,
        "global_batch_size": trainer.global_batch_size,
        "seed": trainer.args.data_seed if trainer.args.data_seed is not None else trainer.args.seed,
        "num_samples": int(len(data)),
        "lengths_sha256": lengths_digest(data.lengths),
        "content_sha256": data.digest,
        "drop_last": bool(trainer.args.dataloader_drop_last),
        "planner": cfg.planner,
        "tokens_per_rank": cfg.tokens_per_rank,
        "world_size": trainer.mesh.world_size,
        "global_step": trainer.state.global_step,
        "hdp_config": cfg.to_dict(),
    }


class HDPCheckpointCallback(TrainerCallback):
    """Waits for an asynchronous checkpoint save at the end of training (``trainer.hdp_finish_checkpoint``). The checkpoint itself, with
    ``hdp_state.json``, is HDPTrainer's ``_save_checkpoint`` (:mod:`hf_hdp.trainer.saving`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        finish = getattr(self.trainer, "hdp_finish_checkpoint", None)
        if finish is not None:
            finish()


class HDPStateFileError(ResumeMismatchError):
    """A checkpoint's ``hdp_state.json`` cannot be used: unreadable, not JSON, or not the shape hf_hdp writes."""


def _json_type(value) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _short(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return "an integer of thousands of digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _is(value, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # JSON true is no integer


def load_state(path: str) -> dict:
    """Read and validate an ``hdp_state.json``; raise :class:`HDPStateFileError` naming the file and the fault.

    Faults: unreadable, empty, not JSON (with the parse error; also an integer of thousands of digits or arrays
    nested thousands deep), not a JSON object, a ``format`` newer than :data:`STATE_FORMAT`, a missing key, a key
    of the wrong type (see :data:`STATE_KEYS`) or an integer outside its range (:data:`STATE_RANGES`).
    Keys newer than the file's format come back as ``None`` (a format 1 file has no ``content_sha256``).
    """

    def fail(problem: str) -> HDPStateFileError:
        return HDPStateFileError(
            f"{path}: {problem}. This file is the HDP state hf_hdp writes into each checkpoint; restore it, resume "
            "from another checkpoint, or delete it to resume without checking that the batches match."
        )

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise fail(f"cannot be read ({err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise fail(f"is not JSON: it is not UTF-8 text ({err})") from err
    if not text.strip():
        raise fail("is empty (the save was probably interrupted)")
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as err:
        raise fail(f"is not JSON: {err}") from err
    except (ValueError, RecursionError) as err:  # an integer of thousands of digits, arrays nested thousands deep
        raise fail(f"is not JSON hf_hdp can read ({type(err).__name__}: {str(err)[:120]})") from err
    if not isinstance(saved, dict):
        raise fail(f"is not a JSON object but {_json_type(saved)}")
    if "format" not in saved:
        raise fail("has no key 'format'")
    version = saved["format"]
    if not _is(version, int) or version < 1:
        raise fail(f"has format {_short(version)}, which is not a format number (1 to {STATE_FORMAT})")
    if version > STATE_FORMAT:
        raise fail(
            f"has format {version}, written by a newer hf_hdp (this one reads formats up to "
            f"{STATE_FORMAT}); upgrade hf_hdp"
        )
    for key, (kind, since) in STATE_KEYS.items():
        if key not in saved:
            if since > version:
                saved[key] = None  # unknown: older files do not record it
                continue
            raise fail(f"has no key {key!r} (a format {version} file must have it)")
        if not _is(saved[key], kind):
            raise fail(f"has {key}={_short(saved[key])}, {_json_type(saved[key])}; it must be {_JSON_NAMES[kind]}")
        if key in STATE_RANGES and saved[key] is not None:
            lo, hi = STATE_RANGES[key]
            if not lo <= saved[key] <= hi:
                raise fail(f"has {key}={_short(saved[key])}, outside its valid range {lo} to {hi}")
    return saved


def _resume_fix(key: str, saved) -> str:
    """What to pass to resume exactly, for a mismatch of ``key`` (the checkpoint's value ``saved``)."""
    if key == "global_batch_size":
        return f"Resume with HDPConfig(global_batch_size={saved!r}) (or --global_batch_size {saved!r}), or start a new run."
    if key == "seed":
        return f"Resume with TrainingArguments(data_seed={saved!r}) (the checkpoint's data order), or start a new run."
    if key == "drop_last":
        return f"Resume with TrainingArguments(dataloader_drop_last={saved!r}), or start a new run."
    return (
        "Resume with the checkpoint's dataset (the same rows, in the same order, tokenized the same way), or "
        "start a new run without resume_from_checkpoint."
    )


def check_resume(trainer, checkpoint: str) -> dict | None:
    """Compare ``checkpoint``'s HDP state with this run; raise :class:`ResumeMismatchError` if the
    remaining batches would differ (:class:`HDPStateFileError`, a subclass, if its ``hdp_state.json`` is
    broken: see :func:`load_state`). Returns the saved state (``None`` for a non-HDP checkpoint)."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.exists(path):
        logger.warning("%s has no %s: resuming without checking that the batches match.", checkpoint, STATE_FILE)
        return None
    saved = load_state(path)
    now = hdp_state(trainer)
    for key, why in (
        ("num_samples", "the dataset has a different number of samples"),
        ("lengths_sha256", "the dataset's samples differ (their lengths changed)"),
        ("content_sha256", "the dataset's content differs (token ids, labels or row order)"),
        ("seed", "the data seed differs"),
        ("global_batch_size", "the global batch size differs"),
        ("drop_last", "dataloader_drop_last differs"),
    ):
        if saved.get(key) is None and key == "content_sha256":  # format 1 checkpoints covered lengths only
            logger.warning(
                "%s predates content digests: resuming without checking the dataset's token content.", checkpoint
            )
            continue
        if saved[key] != now[key]:
            raise ResumeMismatchError(
                f"cannot resume exactly from {checkpoint}: {why} ({key}: checkpoint {saved[key]!r}, now {now[key]!r}). "
                f"The remaining steps would skip or repeat samples. {_resume_fix(key, saved[key])}"
            )
    if saved["world_size"] != now["world_size"]:
        logger.info(
            "elastic resume: checkpoint made on %d ranks, resuming on %d; batches are unchanged.",
            saved["world_size"],
            now["world_size"],
        )
    for key in ("planner", "tokens_per_rank"):
        if saved[key] != now[key]:
            logger.info(
                "resuming with %s=%r (checkpoint used %r): placement changes, batches do not.",
                key,
                now[key],
                saved[key],
            )
    return saved
