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


def lengths_digest(lengths: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]


def hdp_state(trainer) -> dict:
    cfg = trainer.hdp_config
    return {
        "format": 1,
        "global_batch_size": trainer.global_batch_size,
        "seed": trainer.args.data_seed if trainer.args.data_seed is not None else trainer.args.seed,
        "num_samples": int(len(trainer._train_lengths)),
        "lengths_sha256": lengths_digest(trainer._train_lengths),
        "drop_last": bool(trainer.args.dataloader_drop_last),
        "planner": cfg.planner,
        "tokens_per_rank": cfg.tokens_per_rank,
        "world_size": trainer.mesh.world_size,
        "global_step": trainer.state.global_step,
        "hdp_config": cfg.to_dict(),
    }


class HDPCheckpointCallback(TrainerCallback):
    """Writes ``hdp_state.json`` into each checkpoint folder (main process)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(hdp_state(self.trainer), f, indent=1)


def check_resume(trainer, checkpoint: str) -> dict | None:
    """Compare ``checkpoint``'s HDP state with this run; raise :class:`ResumeMismatchError` if the
    remaining batches would differ. Returns the saved state (``None`` for a non-HDP checkpoint)."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.exists(path):
        logger.warning("%s has no %s: resuming without checking that the batches match.", checkpoint, STATE_FILE)
        return None
    with open(path) as f:
        saved = json.load(f)
    now = hdp_state(trainer)
    for key, why in (
        ("num_samples", "the dataset has a different number of samples"),
        ("lengths_sha256", "the dataset's samples differ (their lengths changed)"),
        ("seed", "the data seed differs"),
        ("global_batch_size", "the global batch size differs"),
        ("drop_last", "dataloader_drop_last differs"),
    ):
        if saved[key] != now[key]:
            raise ResumeMismatchError(
                f"cannot resume exactly from {checkpoint}: {why} ({key}: checkpoint {saved[key]!r}, now {now[key]!r}). "
                "The remaining steps would skip or repeat samples. Resume with the same dataset, seed and "
                "global_batch_size, or start a new run."
            )
    if saved["world_size"] != now["world_size"]:
        logger.info("elastic resume: checkpoint made on %d ranks, resuming on %d; batches are unchanged.",
                    saved["world_size"], now["world_size"])
    for key in ("planner", "tokens_per_rank"):
        if saved[key] != now[key]:
            logger.info("resuming with %s=%r (checkpoint used %r): placement changes, batches do not.",
                        key, now[key], saved[key])
    return saved
