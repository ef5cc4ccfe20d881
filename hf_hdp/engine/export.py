"""Transformers model folders written one piece at a time: from a sharded (FSDP2) model, and from a sharded checkpoint.

:func:`save_streamed` writes a live model's weights as ``from_pretrained`` reads them (safetensors,
split by size into ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, or one
``model.safetensors``): every rank gathers one DTensor at a time (a collective), and only the writing
rank keeps it, until the current file is full; so the writing rank holds at most one file's worth
(``max_shard_bytes``) of whole weights, the others one tensor. A second name of the same tensor (tied
embeddings) is left out, as ``save_pretrained`` does; ``from_pretrained`` ties it again.

:func:`consolidate` does the same from a sharded checkpoint (:mod:`hf_hdp.engine.state`) on one process
without a process group, reading one file's worth of tensors at a time; ``hf-hdp consolidate`` runs it
(:func:`main`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from torch.distributed.tensor import DTensor

from .state import GROUPS, MODEL, OPTIM, SHARDED_DIR, TIED, model_entries, read_metadata

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30
"""Default size bound of one safetensors file (and so of what the writing rank holds at once): 2 GiB."""


def parse_size(size) -> int:
    """Bytes of ``size``: an int, or a string such as ``"500MB"`` / ``"2GB"`` / ``"1GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    text = str(size).strip().upper()
    for unit, factor in (
        ("GIB", 2**30),
        ("MIB", 2**20),
        ("KIB", 2**10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
        ("B", 1),
    ):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise ValueError(f"max_shard_size={size!r} is not a size: pass bytes (an int) or a string like '2GB' or '500MB'")


def plan_files(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names split into files of at most ``max_bytes`` (a tensor larger than that gets a file of its own),
    in order. A pure function of the names and sizes."""
    files, current, used = [], [], 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        files.append(current)
    return files


def file_names(count: int) -> list[str]:
    if count == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class _Writer:
    """Collects tensors for the planned files and writes each as soon as it is complete."""

    def __init__(self, out_dir: str, files: list[list[str]], total_bytes: int):
        self.out_dir, self.files, self.total_bytes = out_dir, files, total_bytes
        self.names = file_names(len(files))
        self.file_of = {name: i for i, names in enumerate(files) for name in names}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        index = self.file_of[name]
        self.pending.setdefault(index, {})[name] = tensor.detach().to("cpu").contiguous()
        if len(self.pending[index]) == len(self.files[index]):
            tensors = self.pending.pop(index)
            save_file(tensors, os.path.join(self.out_dir, self.names[index]), metadata={"format": "pt"})
            self.weight_map.update({n: self.names[index] for n in tensors})

    def finish(self) -> None:
        if self.pending:
            raise RuntimeError(f"internal error: files {sorted(self.pending)} were not complete")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            with open(os.path.join(self.out_dir, SAFE_INDEX), "w") as f:
                json.dump(index, f, indent=2)


def _remove_old_weights(out_dir: str) -> None:
    for name in os.listdir(out_dir):
        if name == SAFE_INDEX or (name.startswith("model") and name.endswith(".safetensors")):
            os.remove(os.path.join(out_dir, name))


def save_streamed(model, out_dir: str, write: bool, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``model``'s weights (DTensors gathered one at a time: a collective, call on every rank) into
    ``out_dir`` as safetensors files of at most ``max_shard_bytes``, on the rank that passes ``write=True``.

    A failed write on the writing rank (a full disk) is raised after the last gather, so that the other ranks
    never wait for a gather it left."""
    entries, _ = model_entries(model)
    sizes = [(k[len(MODEL) :], v.numel() * v.element_size()) for k, v in entries.items()]
    files = plan_files(sizes, max_shard_bytes)
    writer = None
    error: BaseException | None = None
    if write:
        os.makedirs(out_dir, exist_ok=True)
        _remove_old_weights(out_dir)
        writer = _Writer(out_dir, files, sum(n for _, n in sizes))
    for key, value in entries.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if writer is not None and error is None:
            try:
                writer.add(key[len(MODEL) :], full)
            except (OSError, RuntimeError) as err:  # keep gathering with the others; raise at the end
                error = err
        del full
    if error is not None:
        raise error
    if writer is not None:
        writer.finish()


# ---------------------------------------------------------------- consolidate
def _load_tensors(path: str, metadata, keys: list[str]) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    state = {
        k: torch.empty(
            tuple(metadata.state_dict_metadata[k].size), dtype=metadata.state_dict_metadata[k].properties.dtype
        )
        for k in keys
    }
    dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    return state


def _load_objects(path: str, keys: list[str]) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    state = {k: "" for k in keys}
    dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    return state


def consolidate(checkpoint: str, out: str, optimizer: bool = False, max_shard_size="2GB") -> str:
    """Turn a checkpoint with a sharded part (``hdp_sharded/``, written by HDPTrainer) into a transformers model
    folder ``out`` (safetensors split by ``max_shard_size``, the checkpoint's ``config.json`` and tokenizer files),
    on this process alone, one file's worth of tensors at a time; with ``optimizer=True`` also ``optimizer.pt``,
    the whole optimizer state in ``torch.optim``'s format (parameter indices in the saved groups' order; this
    file is built in memory: it needs the optimizer state's size in host memory). Returns ``out``."""
    folder = os.path.join(checkpoint, SHARDED_DIR)
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise FileNotFoundError(
            f"{checkpoint} has no sharded part ({SHARDED_DIR}/.metadata): it is not a sharded HDPTrainer checkpoint. "
            "A checkpoint with model.safetensors is already a transformers model folder."
        )
    metadata = read_metadata(folder)
    keys = [k for k in metadata.state_dict_metadata if k.startswith(MODEL)]
    if not keys and not any(f.endswith(".safetensors") for f in os.listdir(checkpoint)):
        raise ValueError(f"{checkpoint} holds neither sharded weights nor model.safetensors")
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(checkpoint)):  # config, generation config, tokenizer; whole weights as they are
        source = os.path.join(checkpoint, name)
        if (
            os.path.isfile(source)
            and (
                name.endswith(".json")
                or name.endswith(".safetensors")
                or name.endswith(".model")
                or name.endswith(".txt")
            )
            and name not in ("trainer_state.json", "hdp_state.json")
        ):
            shutil.copyfile(source, os.path.join(out, name))
    if keys:
        tied = json.loads(_load_objects(folder, [TIED])[TIED]) if TIED in metadata.state_dict_metadata else {}
        sizes = []
        for k in keys:
            md = metadata.state_dict_metadata[k]
            numel = 1
            for n in md.size:
                numel *= n
            sizes.append((k[len(MODEL) :], numel * md.properties.dtype.itemsize))
        files = plan_files(sizes, parse_size(max_shard_size))
        _remove_old_weights(out)
        writer = _Writer(out, files, sum(n for _, n in sizes))
        for names in files:
            loaded = _load_tensors(folder, metadata, [MODEL + n for n in names])
            for n in names:
                writer.add(n, loaded.pop(MODEL + n))
        writer.finish()
        logger.info(
            "consolidated %d tensors into %d file(s) in %s (tied, left out: %s)",
            len(keys),
            len(files),
            out,
            sorted(tied) or "none",
        )
    if optimizer:
        _consolidate_optimizer(folder, metadata, out)
    return out


def _consolidate_optimizer(folder: str, metadata, out: str) -> None:
    if GROUPS not in metadata.state_dict_metadata:
        raise ValueError(f"{folder} holds no optimizer state (saved with save_only_model=True)")
    groups = json.loads(_load_objects(folder, [GROUPS])[GROUPS])
    index, state, torch_groups = 0, {}, []
    for group in groups:
        ids = []
        for name in group["params"]:
            prefix = f"{OPTIM}{name}."
            keys = [k for k in metadata.state_dict_metadata if k.startswith(prefix) and "." not in k[len(prefix) :]]
            tensors = [k for k in keys if hasattr(metadata.state_dict_metadata[k], "size")]
            values = _load_tensors(folder, metadata, tensors) if tensors else {}
            values.update(
                _load_objects(folder, [k for k in keys if k not in tensors]) if len(tensors) < len(keys) else {}
            )
            if values:
                state[index] = {k[len(prefix) :]: v for k, v in values.items()}
            ids.append(index)
            index += 1
        torch_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    torch.save({"state": state, "param_groups": torch_groups}, os.path.join(out, "optimizer.pt"))
    with open(os.path.join(out, "optimizer_param_names.json"), "w") as f:
        json.dump([g["params"] for g in groups], f, indent=1)
