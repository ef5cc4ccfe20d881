"""Sharded checkpoints: each rank writes and reads only its own part of the weights and optimizer state.

A checkpoint's sharded part is one ``torch.distributed.checkpoint`` (DCP) folder, :data:`SHARDED_DIR`,
with flat keys:

- ``model.<name>``: the weights of a sharded (FSDP2) model, each rank's DTensor shards (only when the
  weights are sharded and ``state_dict_type`` is ``SHARDED_STATE_DICT``; replicated weights go to
  ``model.safetensors`` as in any transformers checkpoint);
- ``optim.state.<parameter name>.<state key>``: the optimizer state, keyed by the parameter's name in
  ``model.named_parameters()`` (torch.distributed.checkpoint.state_dict's optimizer format), never by its
  index. Under ZeRO-1/2 each rank provides the plain tensors of the parameters it owns (unique keys:
  every rank writes its own); under FSDP2 each rank provides its DTensor shards;
- ``optim.param_groups``: the groups' settings with their parameters' names, as a JSON string;
- ``meta.tied``: names of weights that are the same tensor as an earlier one (tied embeddings), as JSON.

Loading asks DCP for what this rank needs under the *current* world size and mode: a ZeRO rank the
whole tensors of the parameters it owns now (:func:`~hf_hdp.engine.zero.partition` at this world
size), an FSDP2 rank its DTensor shards. DCP reads the overlapping parts of the saved chunks, so a
checkpoint reshards across world sizes and between ZeRO and FSDP. No rank builds the whole optimizer
state, nor under FSDP the whole model; :data:`IO_STATS` counts the state bytes a rank held.

Every collective runs on a gloo group made once with ``HDPConfig.p2p_timeout_s`` as its timeout
(:func:`checkpoint_group`), so a rank that died mid-save makes the others fail within the bound.
Write failures of a full disk (``ENOSPC``, or torch's ``unexpected pos`` when a write stops part-way)
become :class:`CheckpointWriteError`, naming the path and ``no space left on device``.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .fsdp import local_tensor

logger = logging.getLogger(__name__)

SHARDED_DIR = "hdp_sharded"
MODEL = "model."
OPTIM = "optim.state."
GROUPS = "optim.param_groups"
TIED = "meta.tied"

IO_STATS: dict[str, int] = {
    "save_optimizer_bytes": 0,
    "load_optimizer_bytes": 0,
    "save_model_bytes": 0,
    "load_model_bytes": 0,
}
"""Bytes of state tensors this rank held in the state dict of its last sharded save and load (local shards of
DTensors): what the memory tests compare with the whole optimizer state."""

_GROUPS: dict[tuple, object] = {}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a file size limit); nothing was published."""


def checkpoint_group(timeout_s: float | None, purpose: str = "save"):
    """A gloo group over all ranks whose collectives give up after ``timeout_s`` (``HDPConfig.p2p_timeout_s``;
    ``None``: 30 minutes, torch's default), made once per process group, timeout and ``purpose`` (an
    asynchronous save's background thread gets a group of its own: two threads must never share one).
    Collective the first time: call on every rank. ``None`` without a process group or on one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    key = (id(dist.group.WORLD), timeout_s, purpose)
    if key not in _GROUPS:
        timeout = datetime.timedelta(seconds=timeout_s if timeout_s else 1800)
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    return _GROUPS[key]


def param_names(model) -> dict[int, str]:
    """``id(parameter) -> name`` (``model.named_parameters()``: a tied parameter under its first name)."""
    return {id(p): name for name, p in model.named_parameters()}


def _local_bytes(value) -> int:
    if not torch.is_tensor(value):
        return 0
    value = local_tensor(value)  # a DTensor: this rank's shard
    return value.numel() * value.element_size()


def _json_value(value):
    if torch.is_tensor(value):
        return value.item()
    raise TypeError(f"an optimizer group setting of type {type(value).__name__} cannot be saved: {value!r}")


def named_groups(param_groups: list[dict], names: dict[int, str]) -> str:
    """The groups' settings with their parameters' names, as JSON."""
    groups = []
    for group in param_groups:
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append({**settings, "params": [names[id(p)] for p in group["params"]]})
    return json.dumps(groups, default=_json_value)


def check_groups(saved: list[dict], param_groups: list[dict], names: dict[int, str], path: str) -> None:
    """Refuse a saved optimizer state made for other trainable parameters or another grouping."""
    now = [[names[id(p)] for p in g["params"]] for g in param_groups]
    then = [list(g["params"]) for g in saved]
    if [set(g) for g in now] != [set(g) for g in then]:
        missing = sorted({n for g in now for n in g} - {n for g in then for n in g})[:5]
        raise ValueError(
            f"{path}: the optimizer state was saved for other trainable parameters or parameter groups (groups of "
            f"sizes {[len(g) for g in then]}, this optimizer {[len(g) for g in now]}"
            + (f"; not in the checkpoint: {missing}" if missing else "")
            + "): another model, PEFT configuration or weight-decay grouping. Resume with the checkpoint's setup."
        )


def group_settings_from(saved: dict, current: dict) -> dict:
    """A saved group's settings, with tuples where the optimizer uses tuples (JSON has only lists)."""
    out = {}
    for k, v in saved.items():
        if k == "params":
            continue
        out[k] = tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
    return out


def optimizer_state_entries(state: dict[str, dict]) -> dict:
    """``{parameter name: {key: value}}`` as flat DCP keys ``optim.state.<name>.<key>``."""
    return {f"{OPTIM}{name}.{key}": value for name, values in state.items() for key, value in values.items()}


def model_entries(model) -> tuple[dict, dict]:
    """The model's state dict as DCP keys (DTensor shards stay shards), without the second name of a tied
    weight; and ``{alias: first name}`` of those."""
    entries, seen, tied = {}, {}, {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            tied[name] = seen[id(value)]
            continue
        seen[id(value)] = name
        entries[MODEL + name] = value.detach()
    return entries, tied


# ---------------------------------------------------------------- writing
def _cause(err: BaseException) -> str | None:
    """'no space left on device' (or the file-size limit) if ``err`` is, or wraps, a failed write; else None."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException):
        for failure in err.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            cause = _cause(inner) if isinstance(inner, BaseException) else None
            if cause:
                return cause
        return None
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "no space left on device"
    if isinstance(err, OSError) and err.errno == errno.EFBIG:
        return "no space left on device: the file size limit was reached (File too large; see ulimit -f)"
    text = str(err)
    if isinstance(err, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text):
        return "no space left on device (the write stopped part-way)"
    if "No space left on device" in text:
        return "no space left on device"
    inner = err.__cause__ or err.__context__
    return _cause(inner) if isinstance(inner, BaseException) and inner is not err else None


def write_error(err: BaseException, path: str, rank: int, step: int | None, latest: str | None):
    """The :class:`CheckpointWriteError` for a write that failed for lack of space, else ``None``."""
    cause = _cause(err)
    if cause is None:
        return None
    detail = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
    where = f" at global step {step}" if step is not None else ""
    kept = f"{latest} stays the latest checkpoint" if latest else "no earlier checkpoint exists"
    return CheckpointWriteError(
        errno.ENOSPC,
        f"rank {rank}: cannot write the checkpoint {path}{where}: {cause} ({detail}). The checkpoint was not "
        f"published: {kept}. Free space on that file system (or set output_dir to one with room) and resume.",
    )


def save_sharded(state: dict, path: str, group, async_save: bool = False):
    """Write ``state`` (flat DCP keys) into ``path``: each rank its own entries. Collective over ``group``.
    Returns the future of an asynchronous save, else None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    IO_STATS["save_optimizer_bytes"] = sum(_local_bytes(v) for k, v in state.items() if k.startswith(OPTIM))
    IO_STATS["save_model_bytes"] = sum(_local_bytes(v) for k, v in state.items() if k.startswith(MODEL))
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1)
    no_dist = group is None
    if async_save:
        return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=no_dist)
    dcp.save(state, storage_writer=writer, process_group=group, no_dist=no_dist)
    return None


# ---------------------------------------------------------------- reading
def read_metadata(path: str):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def has_sharded(checkpoint: str, prefix: str = "") -> bool:
    """Whether ``checkpoint`` holds a sharded part (with keys starting ``prefix``)."""
    folder = os.path.join(checkpoint, SHARDED_DIR)
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        return False
    return not prefix or any(k.startswith(prefix) for k in read_metadata(folder).state_dict_metadata)


def _target(md, like: torch.Tensor | None):
    """An empty tensor to load a saved entry into: ``like``'s shards when it is a DTensor of the saved shape,
    else a plain tensor on ``like``'s device (the CPU for 0-dim values such as Adam's ``step``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not isinstance(md, TensorStorageMetadata):
        return None  # an object: DCP unpickles it in place of the placeholder
    dtype, size = md.properties.dtype, tuple(md.size)
    if isinstance(like, DTensor) and tuple(like.shape) == size:
        from torch.distributed.tensor import empty

        return empty(size, dtype=dtype, device_mesh=like.device_mesh, placements=like.placements)
    device = like.device if like is not None and len(size) else torch.device("cpu")
    return torch.empty(size, dtype=dtype, device=device)


def load_sharded(path: str, state: dict, group) -> dict:
    """Fill ``state`` (flat DCP keys: tensors loaded in place, other values replaced) from ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    dcp.load(state, storage_reader=FileSystemReader(path), process_group=group, no_dist=group is None)
    return state


def load_optimizer_state(path: str, targets: dict[str, torch.Tensor], group, metadata=None) -> tuple[dict, list]:
    """This rank's optimizer state under its current role: ``{name: {key: value}}`` for the parameters in
    ``targets`` (``{name: parameter}``: what this rank updates; a DTensor parameter gets its shards), and the
    saved groups. Collective over ``group``."""
    metadata = metadata or read_metadata(path)
    if GROUPS not in metadata.state_dict_metadata:
        raise ValueError(f"{path} holds no optimizer state ({GROUPS} missing): it was saved with save_only_model.")
    by_param: dict[str, list[str]] = {}
    for key in metadata.state_dict_metadata:
        if key.startswith(OPTIM):
            name, _, _ = key[len(OPTIM) :].rpartition(".")
            by_param.setdefault(name, []).append(key)
    state: dict = {GROUPS: ""}
    for name, param in targets.items():
        for key in by_param.get(name, []):
            state[key] = _target(metadata.state_dict_metadata[key], param)
    load_sharded(path, state, group)
    IO_STATS["load_optimizer_bytes"] = sum(_local_bytes(v) for k, v in state.items() if k.startswith(OPTIM))
    out: dict[str, dict] = {}
    for key, value in state.items():
        if key.startswith(OPTIM):
            name, _, item = key[len(OPTIM) :].rpartition(".")
            out.setdefault(name, {})[item] = value
    return out, json.loads(state[GROUPS])


def load_model_state(path: str, model, group, metadata=None) -> None:
    """Load a sharded checkpoint's weights into ``model`` in place: DTensor parameters get their shards,
    plain ones the whole tensor. Collective over ``group``. Refuses a checkpoint that lacks a weight."""
    metadata = metadata or read_metadata(path)
    entries, _ = model_entries(model)
    missing = [k[len(MODEL) :] for k in entries if k not in metadata.state_dict_metadata]
    if missing:
        raise ValueError(
            f"{path} has no weights for {missing[:5]} ({len(missing)} of {len(entries)}): it was "
            "saved from another model. Resume with the model the checkpoint was made from."
        )
    IO_STATS["load_model_bytes"] = sum(_local_bytes(v) for v in entries.values())
    with torch.no_grad():
        load_sharded(path, entries, group)


def load_into_optimizer(optimizer, state: dict[str, dict], saved_groups: list[dict], names: dict[int, str]) -> None:
    """Load ``{name: {key: value}}`` into a plain torch optimizer (FSDP2's, over DTensor parameters, or one
    over every parameter), with the saved groups' settings."""
    index, torch_state, groups = 0, {}, []
    for group, saved in zip(optimizer.param_groups, saved_groups):
        ids = []
        for p in group["params"]:
            if names[id(p)] in state:
                torch_state[index] = state[names[id(p)]]
            ids.append(index)
            index += 1
        groups.append({**group_settings_from(saved, group), "params": ids})
    optimizer.load_state_dict({"state": torch_state, "param_groups": groups})


def has_whole_weights(checkpoint: str) -> bool:
    """Whether ``checkpoint`` holds whole weights as transformers writes them (safetensors or ``.bin``)."""
    return any(
        os.path.isfile(os.path.join(checkpoint, name))
        for name in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )


def load_whole_weights(model, checkpoint: str) -> None:
    """Load ``checkpoint``'s safetensors weights into ``model`` one tensor at a time: a DTensor parameter keeps
    only its shard (no communication: every rank reads the file). Refuses a checkpoint that lacks a weight."""
    from safetensors import safe_open
    from torch.distributed.tensor import distribute_tensor

    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            where = {k: os.path.join(checkpoint, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        with safe_open(os.path.join(checkpoint, "model.safetensors"), "pt") as f:
            where = {k: os.path.join(checkpoint, "model.safetensors") for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    else:
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors (or its index) to load the weights from")
    entries, _ = model_entries(model)
    missing = [k[len(MODEL) :] for k in entries if k[len(MODEL) :] not in where]
    if missing:
        raise ValueError(f"{checkpoint} has no weights for {missing[:5]} ({len(missing)} of {len(entries)})")
    with torch.no_grad():
        for key, value in entries.items():
            with safe_open(where[key[len(MODEL) :]], "pt") as f:
                full = f.get_tensor(key[len(MODEL) :])
            if isinstance(value, DTensor):
                local = distribute_tensor(
                    full.to(value.device, value.dtype), value.device_mesh, value.placements, src_data_rank=None
                ).to_local()
                value.to_local().copy_(local)
            else:
                value.copy_(full)
