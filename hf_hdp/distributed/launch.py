"""Launching: one process group for several processes, safely across torchrun restarts.

- :func:`init_process_group` initialises the global group from torchrun's environment with a
  per-restart key prefix (torchrun's static rendezvous otherwise hands a restarted round the dead
  round's peer addresses);
- :func:`check_distributed_setup` refuses a launch of several processes that did not form one
  process group (each would train its own copy into one output folder);
- :func:`install_error_hook` (both functions above install it): hf_hdp's refusals end a launch with one
  short message, once, instead of every rank's traceback.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

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
    install_error_hook()
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
        found.append(
            f"TrainingArguments.world_size is {args_world} "
            f"(parallel_mode={getattr(getattr(args, 'parallel_mode', None), 'value', None)!r})"
        )
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
    install_error_hook()
    if dist.is_initialized() or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else datetime.timedelta(minutes=30)
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=(rank == 0 and not use_agent_store),
        timeout=timeout,
        multi_tenant=not use_agent_store,
    )
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


# ------------------------------------------------------------------ one clear error, once
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_RANKS_DELAY_S = 3.0
"""Under torchrun, how long a rank other than 0 that stops on one of hf_hdp's refusals waits before it
exits: if rank 0 stops on the same refusal, torchrun sees rank 0 fail first and ends the others, so its
summary names the refusal once."""


def is_refusal(err: BaseException) -> bool:
    """Whether ``err`` is one of hf_hdp's refusals of a user's input: a ``ValueError`` or ``TypeError``
    (hf_hdp's own errors, ``HDPDataError``, ``UnsupportedModelError``, ``PlanError``..., derive from
    ``ValueError``) raised by hf_hdp's code. Its message says what was wrong and the fix; a traceback adds
    nothing. Communication errors (each rank's own view of a failure) and everything else are not."""
    if not isinstance(err, (ValueError, TypeError)):
        return False
    if type(err).__module__.split(".")[0] == "hf_hdp":
        return True
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def refusal_text(err: BaseException) -> str:
    return f"hf_hdp: {type(err).__name__}: {err}"


def _excepthook(kind, err, tb, previous=None) -> None:
    previous = previous or sys.__excepthook__
    if not is_refusal(err):
        previous(kind, err, tb)
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    if os.environ.get("HF_HDP_TRACEBACK") == "1":
        traceback.print_exception(kind, err, tb)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun (or accelerate launch) prints the first failed rank's file last, in its summary
        text = refusal_text(err)
        if rank != 0:
            time.sleep(OTHER_RANKS_DELAY_S)  # rank 0 first, if it stops on the same refusal (then we are ended)
            if _rank0_message(error_file) == text:  # torchrun lists the other failures before the root cause
                text = f"hf_hdp: rank {rank} stopped on the same {type(err).__name__} as rank 0 (the root cause, below)"
        try:
            with open(error_file, "w") as f:
                json.dump({"message": text, "timestamp": int(time.time())}, f)
            sys.stderr.flush()
            return
        except OSError:
            pass
    if rank == 0 or error_file:
        print(refusal_text(err), file=sys.stderr, flush=True)
    else:  # no launcher summary: each rank that stops says so in one line
        print(f"hf_hdp (rank {rank}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def _rank0_message(error_file: str) -> str | None:
    """What local rank 0 wrote in its torchrun error file (``<run>/attempt_<n>/<local rank>/error.json``), if
    this node holds global rank 0 and it wrote one."""
    folder = os.path.dirname(error_file)
    if os.environ.get("GROUP_RANK", "0") != "0" or not os.path.basename(folder).isdigit():
        return None
    try:
        with open(os.path.join(os.path.dirname(folder), "0", os.path.basename(error_file))) as f:
            message = json.load(f).get("message")
    except (OSError, ValueError, AttributeError):
        return None
    return message if isinstance(message, str) else None


def install_error_hook() -> None:
    """End a launch that stops on one of hf_hdp's refusals (:func:`is_refusal`) with one short message, once.

    Installs a ``sys.excepthook`` (once; any other uncaught error goes to the hook that was there). For a
    refusal: under torchrun (``TORCHELASTIC_ERROR_FILE``), the rank writes ``hf_hdp: <Error>: <message>``
    into torchrun's error file and prints nothing, so torchrun's summary (the last thing it prints) shows
    it once as the root cause; ranks other than 0 wait :data:`OTHER_RANKS_DELAY_S` first, so that the
    first failure torchrun sees is rank 0's. Without torchrun, rank 0 prints that line and the other ranks
    one line each with their rank. No traceback, unless ``HF_HDP_TRACEBACK=1``. The exit code stays 1."""
    if getattr(sys.excepthook, "hf_hdp", False):
        return
    previous = sys.excepthook

    def hook(kind, err, tb):
        _excepthook(kind, err, tb, previous)

    hook.hf_hdp = True
    sys.excepthook = hook
