"""HDPTrainer's checkpoints: sharded, atomic, resumable at any world size and mode.

**What a checkpoint holds.** Replicated weights (no FSDP, or FSDP with ``state_dict_type="FULL_STATE_DICT"``,
or ``save_only_model=True``) are a transformers model folder (``model.safetensors``, split by size),
streamed one tensor at a time under FSDP (:func:`~hf_hdp.engine.export.save_streamed`). Sharded weights
(FSDP2 with ``SHARDED_STATE_DICT``, the default) and a sharded optimizer state (ZeRO-1/2, FSDP2) are one
``torch.distributed.checkpoint`` folder, ``hdp_sharded/``, each rank writing its own part
(:mod:`hf_hdp.engine.state`). An unsharded optimizer (ZeRO stage 0, one process) is Trainer's
``optimizer.pt``. Scheduler, scaler, RNG states, ``trainer_state.json`` and ``hdp_state.json`` as Trainer
and HDP always wrote them.

**Atomic.** Everything is written under ``tmp-checkpoint-N`` (which Trainer's ``get_last_checkpoint``,
``^checkpoint-(\\d+)$``, and its rotation, ``checkpoint-*``, do not see). Every rank reports whether its
writes succeeded (one bounded all-reduce), then the saving rank renames the folder to ``checkpoint-N``
and rotates; a crash or a full disk mid-save leaves the previous checkpoint the latest, and the next
save removes the stale temporary. A full disk is raised as
:class:`~hf_hdp.engine.state.CheckpointWriteError` naming the path and "no space left on device", on
every rank.

**Asynchronous** (``HDPConfig(async_checkpoint=True)``): the sharded part is written by DCP's
``async_save`` in a background thread while training continues; the next save, loading the best model
and the end of training wait for it and publish it.

Every collective here runs on the gloo group of :func:`~hf_hdp.engine.state.checkpoint_group`, bounded
by ``HDPConfig.p2p_timeout_s``, and its failures name the rank, the collective and the global step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import torch
import torch.distributed as dist
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from ..engine import export
from ..engine.export import save_streamed
from ..engine.fsdp import SHARDED, state_dict_type
from ..engine.state import (
    GROUPS,
    SHARDED_DIR,
    TIED,
    check_groups,
    checkpoint_group,
    load_into_optimizer,
    load_model_state,
    load_optimizer_state,
    model_entries,
    named_groups,
    optimizer_state_entries,
    param_names,
    read_metadata,
    save_sharded,
    write_error,
)
from ..engine.zero import unwrap_zero
from .checkpoint import STATE_FILE, hdp_state

logger = logging.getLogger(__name__)

STAGING = "tmp-checkpoint-"


def _optimizer(trainer):
    """The trainer's ZeRO optimizer, else the torch optimizer inside accelerate's wrapper(s)."""
    optimizer = getattr(trainer, "optimizer", None)
    zero = unwrap_zero(optimizer)
    if zero is not None:
        return zero
    while optimizer is not None and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's wrapper
    return optimizer


def sharded_optimizer(trainer) -> bool:
    """Whether the optimizer state is sharded over the ranks (ZeRO-1/2, or FSDP2)."""
    return unwrap_zero(getattr(trainer, "optimizer", None)) is not None or bool(trainer.hdp_fsdp_modules)


def sharded_weights(trainer) -> bool:
    return bool(trainer.hdp_fsdp_modules) and state_dict_type(trainer.args) == SHARDED


def _step_text(step) -> str:
    return f" at global step {step}" if step is not None else ""


def bounded_flag(trainer, group, flag: bool, what: str, step) -> bool:
    """Whether any rank passed ``flag=True``: one all-reduce on the checkpoint group (its timeout bounds it),
    which also waits for every rank (a barrier). A crashed or late rank raises naming this rank, ``what``
    and ``step``."""
    if group is None:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as err:
        translated = trainer.mesh.translate_error(err, what, "an all-reduce", step)
        if translated is None:
            raise RuntimeError(f"rank {trainer.mesh.rank}: the {what}{_step_text(step)} failed: {err}") from err
        raise translated from err
    return bool(tensor.item())


def _remove_stale(run_dir: str, keep: str | None = None) -> None:
    """Temporaries of saves that did not finish (a crash, a full disk)."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(STAGING) and path != keep and os.path.isdir(path):
            logger.warning("hf_hdp: removing %s, left by a checkpoint save that did not finish.", path)
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- saving
def sharded_state(trainer, with_weights: bool, with_optimizer: bool) -> dict:
    """This rank's part of the sharded checkpoint (flat DCP keys)."""
    model = trainer.model
    state: dict = {}
    names = param_names(model)
    if with_weights:
        entries, tied = model_entries(model)
        state.update(entries)
        state[TIED] = json.dumps(tied)
    if with_optimizer:
        optimizer = _optimizer(trainer)
        zero = unwrap_zero(optimizer)
        if zero is not None:
            owned = zero.owned_state(names)
        else:
            owned = {names[id(p)]: dict(values) for p, values in optimizer.state.items()}
        state.update(optimizer_state_entries(owned))
        state[GROUPS] = named_groups(optimizer.param_groups, names)
    return state


def write_model_folder(trainer, out_dir: str) -> None:
    """A transformers model folder from the (FSDP2-)sharded model: weights streamed, then the configuration,
    the tokenizer and the training arguments on the saving rank. Collective."""
    write = bool(trainer.args.should_save)
    save_streamed(trainer.model, out_dir, write, export.DEFAULT_SHARD_BYTES)
    if write:
        write_model_files(trainer, out_dir)


def write_model_files(trainer, out_dir: str) -> None:
    """``config.json``, the generation config, the tokenizer and ``training_args.bin`` (saving rank)."""
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    os.makedirs(out_dir, exist_ok=True)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(out_dir)
    torch.save(trainer.args, os.path.join(out_dir, "training_args.bin"))


def _write(trainer, staging: str, final: str, group, step) -> object:
    """Every file of the checkpoint into ``staging``; the collectives first, on every rank. Returns the future
    of an asynchronous sharded save, or None."""
    args = trainer.args
    weights, optimizer = sharded_weights(trainer), sharded_optimizer(trainer) and not args.save_only_model
    future = None
    if weights and not args.save_only_model:
        if args.should_save:
            write_model_files(trainer, staging)
    elif trainer.hdp_fsdp_modules:
        write_model_folder(trainer, staging)  # collective: one DTensor at a time
    else:
        trainer.save_model(staging, _internal_call=True)
    if (weights and not args.save_only_model) or optimizer:
        state = sharded_state(trainer, with_weights=weights and not args.save_only_model, with_optimizer=optimizer)
        if trainer.hdp_config.async_checkpoint:  # DCP's thread: a group of its own
            future = save_sharded(
                state,
                os.path.join(staging, SHARDED_DIR),
                checkpoint_group(trainer.hdp_config.p2p_timeout_s, "async"),
                async_save=True,
            )
        else:
            save_sharded(state, os.path.join(staging, SHARDED_DIR), group)
    _best_model_checkpoint(trainer, os.path.dirname(final))
    if not args.save_only_model:
        if optimizer:
            if args.should_save:
                with warnings.catch_warnings(record=True):
                    torch.save(trainer.lr_scheduler.state_dict(), os.path.join(staging, "scheduler.pt"))
        else:
            trainer._save_optimizer_and_scheduler(staging)  # Trainer's optimizer.pt (unsharded optimizer)
        trainer._save_scaler(staging)
        trainer._save_rng_state(staging)
    if args.should_save:
        for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
            name, cb_state = cb.__class__.__name__, cb.state()
            if isinstance(trainer.state.stateful_callbacks[name], list):
                trainer.state.stateful_callbacks[name].append(cb_state)
            else:
                trainer.state.stateful_callbacks[name] = cb_state
        trainer.state.save_to_json(os.path.join(staging, "trainer_state.json"))
        if getattr(trainer, "hdp_train_data", None) is not None:
            with open(os.path.join(staging, STATE_FILE), "w") as f:
                json.dump(hdp_state(trainer), f, indent=1)
    return future


def _best_model_checkpoint(trainer, run_dir: str) -> None:
    """Trainer's bookkeeping of the best checkpoint (its ``_save_checkpoint``), for final names."""
    best = trainer.state.best_global_step
    if trainer.args.save_strategy in ("steps", "epoch", "best") and best:
        path = os.path.join(run_dir, f"checkpoint-{best}")
        if best == trainer.state.global_step or os.path.exists(path):
            trainer.state.best_model_checkpoint = path


def save_checkpoint(trainer, trial) -> None:
    """Trainer's ``_save_checkpoint``, atomic and sharded (see the module docstring). Call on every rank."""
    finish_pending(trainer)
    step = trainer.state.global_step
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()  # a collective of Trainer's, as in its own _save_checkpoint
    run_dir = trainer._get_output_dir(trial=trial)
    final = os.path.join(run_dir, f"checkpoint-{step}")
    staging = os.path.join(run_dir, f"{STAGING}{step}")
    group = checkpoint_group(trainer.hdp_config.p2p_timeout_s)
    if trainer.args.should_save:
        _remove_stale(run_dir)
        os.makedirs(staging, exist_ok=True)
    bounded_flag(trainer, group, False, "checkpoint folder creation", step)
    error: BaseException | None = None
    future = None
    try:
        os.makedirs(staging, exist_ok=True)
        future = _write(trainer, staging, final, group, step)
    except Exception as err:  # noqa: BLE001 - reported to every rank below, raised on all of them
        error = err
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException
        if type(err).__name__ != "CheckpointException":
            raise
        error = err
    if bounded_flag(trainer, group, error is not None, "checkpoint save status exchange", step):
        _fail(trainer, error, staging, run_dir, step)
    if future is not None:
        trainer._hdp_pending_save = (future, staging, final, run_dir, step)
        return
    publish(trainer, staging, final, run_dir, group, step)


def _fail(trainer, error, staging: str, run_dir: str, step) -> None:
    latest = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # frees the space it took; never visible as a checkpoint
    bounded_flag(
        trainer, checkpoint_group(trainer.hdp_config.p2p_timeout_s), False, "failed checkpoint clean-up", step
    )  # every rank raises once the temporary is gone
    rank = trainer.args.process_index
    if error is None:
        raise RuntimeError(
            f"rank {rank}: another rank failed to write its part of the checkpoint {staging}{_step_text(step)} "
            f"(see its error). The checkpoint was not published: "
            f"{latest or 'no earlier checkpoint'} stays the latest checkpoint."
        )
    translated = write_error(error, staging, rank, step, latest)
    if translated is not None:
        raise translated from (error if isinstance(error, Exception) else None)
    if isinstance(error, Exception):
        raise error
    raise RuntimeError(f"rank {rank}: writing the checkpoint {staging}{_step_text(step)} failed: {error}")


def publish(trainer, staging: str, final: str, run_dir: str, group, step) -> None:
    """Rename ``staging`` to ``final`` (saving rank) once every rank has written its part, then rotate."""
    if trainer.args.should_save and os.path.isdir(staging):
        if os.path.isdir(final):  # the same step saved again (a resumed run): replace it
            old = staging + ".replaced"
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
    bounded_flag(trainer, group, False, "checkpoint publication", step)
    if trainer.args.push_to_hub:
        trainer._push_from_checkpoint(final)
    if trainer.args.should_save:
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=trainer.args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )


def finish_pending(trainer) -> None:
    """Wait for an asynchronous save still being written, then publish it (every rank)."""
    pending = getattr(trainer, "_hdp_pending_save", None)
    if pending is None:
        return
    trainer._hdp_pending_save = None
    future, staging, final, run_dir, step = pending
    group = checkpoint_group(trainer.hdp_config.p2p_timeout_s)
    error = None
    try:
        (future.upload_completion if hasattr(future, "upload_completion") else future).result()
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        error = err
    if bounded_flag(trainer, group, error is not None, "asynchronous checkpoint save status exchange", step):
        _fail(trainer, error, staging, run_dir, step)
    publish(trainer, staging, final, run_dir, group, step)


# ---------------------------------------------------------------- loading
def load_sharded_checkpoint(trainer, checkpoint: str, weights: bool, optimizer: bool = True) -> None:
    """Load a checkpoint's sharded part for this rank's role now: the weights (if ``weights``) into the model as
    it is (sharded or not), the optimizer state of what this rank updates. Call on every rank, after the
    optimizer is built. A crashed or late peer raises naming this rank, the load and the global step."""
    try:
        _load_sharded(trainer, checkpoint, weights, optimizer)
    except RuntimeError as err:
        translated = trainer.mesh.translate_error(
            err, f"checkpoint load from {checkpoint}", "a collective", trainer.state.global_step
        )
        if translated is None:
            raise
        raise translated from err


def _load_sharded(trainer, checkpoint: str, weights: bool, optimizer: bool) -> None:
    folder = os.path.join(checkpoint, SHARDED_DIR)
    group = checkpoint_group(trainer.hdp_config.p2p_timeout_s)
    metadata = read_metadata(folder)
    if weights:
        load_model_state(folder, trainer.model, group, metadata)
    optimizer = _optimizer(trainer) if optimizer else None
    if optimizer is None or GROUPS not in metadata.state_dict_metadata:
        return
    names = param_names(trainer.model)
    zero = unwrap_zero(optimizer)
    targets = (
        zero.owned_params(names)
        if zero is not None
        else {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    )
    state, groups = load_optimizer_state(folder, targets, group, metadata)
    check_groups(groups, optimizer.param_groups, names, folder)
    if zero is not None:
        zero.load_owned_state(state, groups, names)
    else:
        load_into_optimizer(optimizer, state, groups, names)


def load_scheduler(trainer, checkpoint: str) -> None:
    path = os.path.join(checkpoint, "scheduler.pt")
    if os.path.isfile(path):
        with warnings.catch_warnings(record=True):
            trainer.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))
