"""Launching: one process group for several processes, safely across torchrun restarts.

- :func:`init_process_group` initialises the global group from torchrun's environment with a
  per-restart key prefix (torchrun's static rendezvous otherwise hands a restarted round the dead
  round's peer addresses);
- :func:`check_distributed_setup` refuses a launch of several processes that did not form one
  process group (each would train its own copy into one output folder).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def check_distributed_setup(args) -> None:
    """Refuse a launch of several processes that did not form one process group.

    ``WORLD_SIZE`` (set by torchrun and other launchers) says how many processes were started. If it
    is above 1 but ``torch.distributed`` is not initialised, its group has another size, or the
    ``TrainingArguments`` built their state for one process (``args.world_size == 1``), every
    process would train its own copy of the model on its own data and write into the same
    ``output_dir``. That happens, for example, under ``torchrun`` with ``use_cpu=False`` on a machine
    without GPUs: accelerate joins the processes in a group, but TrainingArguments runs each one as
    a single, non-parallel process 0. Raises a ``ValueError`` saying what was found and the fix.
    """
    try:
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return
    if env_world <= 1:
        return
    initialized = dist.is_available() and dist.is_initialized()
    group_world = dist.get_world_size() if initialized else None
    args_world = getattr(args, "world_size", None)
    found = []
    if not initialized:
        found.append("torch.distributed is not initialized")
    elif group_world != env_world:
        found.append(f"the process group has {group_world} ranks")
    if args_world != env_world:
        found.append(f"TrainingArguments.world_size is {args_world} "
                     f"(parallel_mode={getattr(getattr(args, 'parallel_mode', None), 'value', None)!r})")
    if not found:
        return
    raise ValueError(
        f"WORLD_SIZE={env_world} (this process has RANK={os.environ.get('RANK', '?')}) says {env_world} processes "
        f"were launched, but {' and '.join(found)}: every process would train its own copy of the model and write "
        f"into the same output_dir ({getattr(args, 'output_dir', None)!r}). On CPU, build "
        "TrainingArguments(use_cpu=True), so that accelerate starts a gloo process group; on GPUs, check that every "
        "process sees its GPU (torch.cuda.is_available()); or launch a single process (python script.py, not "
        "torchrun)."
    )


def init_process_group(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the global process group from torchrun's environment, safely across restarts.

    Under ``torchrun --max-restarts`` with the default static rendezvous, the agent keeps one
    TCPStore for every restart, so the workers of a restarted round can read the previous round's
    (dead) peer addresses and fail to connect. This puts each round's keys under its own prefix
    (``TORCHELASTIC_RESTART_COUNT``). Call it before building ``TrainingArguments``; accelerate and
    Trainer then use the group as it is. Returns ``False`` (and does nothing) outside torchrun or if
    a group already exists.
    """
    if dist.is_initialized() or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else datetime.timedelta(minutes=30)
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank == 0 and not use_agent_store), timeout=timeout,
                          multi_tenant=not use_agent_store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"hf_hdp/attempt_{attempt}", store)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return True


def launcher_ranks_per_node(configured: int | None) -> int | None:
    """Ranks per node: ``HDPConfig.ranks_per_node`` when set, else the launcher's ``LOCAL_WORLD_SIZE``
    (torchrun and accelerate set it on every rank), else ``None`` (the hardware preset's)."""
    if configured is not None:
        return int(configured)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local and local.isdigit() and int(local) > 0 else None
