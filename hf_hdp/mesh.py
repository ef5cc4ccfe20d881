"""The dynamic mesh: one global process group, P2P with the members of each piece's group.

ByteScale's point (DESIGN §2) is that a context-parallel group of any size can be formed per
sample and per step *without* creating process groups: ring attention only needs point-to-point
sends and receives between the members, and those work on the one global group. Creating groups
per step would be slow and, with NCCL, costs gigabytes of buffers per GPU.

:class:`DynamicMesh` is that layer. It

- knows this rank, the world and the device tensors must live on for the backend (CPU for gloo,
  the local GPU for NCCL);
- exchanges tensors with ring neighbours (``batch_isend_irecv`` on the global group) and counts the
  bytes and messages it sends, so benchmarks report measured traffic, not estimates;
- checks once per step, before any P2P, that every rank holds the same plan (an all-reduce of the
  plans' 63-bit fingerprints, one slot per rank) and names the disagreeing ranks if not;
- reduces gradients: one collective per optimizer step over one flat buffer, however many
  micro-batches a rank ran (zero included), with extra scalars riding along in the same buffer;
- sums a few scalars for evaluation (:meth:`DynamicMesh.sum_scalars`).

No rank waits forever: every one of these waits is bounded (``HDPConfig.p2p_timeout_s``, 10 minutes
by default). A peer that is late past the bound raises :class:`P2PTimeoutError` (ring) or
:class:`CollectiveTimeoutError`; a peer whose process is gone raises :class:`PeerCrashedError`. All
three are :class:`HDPCommError` and name this rank, the peer or the collective, and the step.

:class:`HDPAccelerator` plugs the mesh into accelerate: an :class:`accelerate.Accelerator` whose
``prepare_model`` places the model but never wraps it in DDP (HDP synchronises gradients itself,
once per step, so DDP's per-backward reduction and its bucket memory would be wrong and wasted)
and whose ``no_sync`` is a no-op. :func:`check_distributed_setup` refuses a launch of several
processes that did not form a process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator

DEFAULT_TIMEOUT_S = 600.0
"""Default bound, in seconds, on every HDP wait (``HDPConfig.p2p_timeout_s`` has the same default)."""


class PlanMismatchError(RuntimeError):
    """Ranks disagree on the step plan; running it would deadlock or train on wrong data."""


class HDPCommError(RuntimeError):
    """An HDP P2P exchange or collective failed: a peer was late past the bound, or is gone."""


class P2PTimeoutError(HDPCommError):
    """A ring partner did not answer in time."""


class CollectiveTimeoutError(HDPCommError):
    """A collective over all ranks (plan check, gradient reduction, evaluation sum) did not complete in time."""


class PeerCrashedError(HDPCommError):
    """A peer closed its connection: its process most likely crashed."""


# What the backends say when the process at the other end is gone (gloo: the socket was closed or
# reset; NCCL: ncclRemoteError). Anything else a wait raises is a timeout or an unknown failure.
_CRASH_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited")


def _peer_crashed(err: BaseException) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in _CRASH_MARKERS)


def _timed_out(err: BaseException) -> bool:
    return "timed out" in str(err).lower()


def _at_step(step: int | None) -> str:
    return f" at global step {step}" if step is not None else ""


@dataclass
class CommStats:
    bytes_sent: int = 0
    messages_sent: int = 0


class DynamicMesh:
    """Per-sample context-parallel groups over the one global process group.

    ``p2p_timeout_s`` bounds every wait of the mesh (ring P2P, the plan check, the gradient
    reduction, :meth:`sum_scalars`); ``None`` leaves each wait to the process group's own timeout
    (``TrainingArguments.ddp_timeout``, 30 minutes by default). How the bound is kept depends on the
    backend:

    - gloo: collectives are issued with ``async_op`` and this timeout in their options, so gloo
      itself gives up (and the process can exit), and ``Work.wait(timeout)`` raises; P2P waits pass
      the time left to ``Work.wait(timeout)``, which raises on expiry.
    - NCCL (torch 2.13, ``ProcessGroupNCCL.hpp``: ``WorkNCCL::wait`` with a timeout "will block the
      CPU thread until the NCCL work is completed or timed out. If timeout, exception will be thrown",
      and aborts the communicator first): collectives use that blocking ``wait(timeout)``; they run
      once per step and their result is read on the host anyway, so blocking costs nothing. Their
      options keep the process group's timeout, so NCCL's watchdog, which measures from the launch,
      does not kill the process before the error below is raised. Ring P2P waits stay asynchronous
      (the compute stream waits, the host does not): a host-blocking wait per ring hop would stall
      kernel launches every hop. A stalled ring partner therefore shows up at the step's gradient
      reduction (within the bound) when the host reaches it, or, if the host blocks on the stream
      before that, at the process group's timeout: set ``TrainingArguments.ddp_timeout`` to bound
      that case too.
    """

    def __init__(self, device: torch.device | None = None, p2p_timeout_s: float | None = DEFAULT_TIMEOUT_S):
        self.initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.initialized else 0
        self.world_size = dist.get_world_size() if self.initialized else 1
        self.backend = dist.get_backend() if self.initialized else None
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        self.timeout_s = float(p2p_timeout_s) if p2p_timeout_s else None
        self.timeout = datetime.timedelta(seconds=self.timeout_s) if self.timeout_s else None
        self.stats = CommStats()

    def _bound_text(self) -> str:
        return f"{self.timeout_s:g} s" if self.timeout_s else "the process group's timeout"

    # ------------------------------------------------------------------ P2P
    def exchange(
        self,
        send: torch.Tensor,
        dst: int,
        recv: torch.Tensor,
        src: int,
        what: str = "",
    ) -> list:
        """Start sending ``send`` to ``dst`` and receiving into ``recv`` from ``src``; returns handles for :meth:`wait`."""
        if dst == self.rank and src == self.rank:
            recv.copy_(send)
            return []
        send = send.contiguous()
        ops = [dist.P2POp(dist.isend, send, dst), dist.P2POp(dist.irecv, recv, src)]
        self.stats.bytes_sent += send.numel() * send.element_size()
        self.stats.messages_sent += 1
        return list(dist.batch_isend_irecv(ops)) + [(what, dst, src)]

    def wait(self, handles: list) -> None:
        """Complete an :meth:`exchange`; raise :class:`P2PTimeoutError` past the bound (send and
        receive together), :class:`PeerCrashedError` if the partner's process is gone."""
        if not handles:
            return
        *works, (what, dst, src) = handles
        # gloo returns one work per op (send to dst, receive from src); NCCL one coalesced work
        if len(works) == 2:
            peers = [f"rank {dst}", f"rank {src}"]
        else:
            peers = [f"rank {dst}" if dst == src else f"rank {dst} or {src}"] * len(works)
        bounded = self.timeout is not None and self.backend == "gloo"  # NCCL: see the class docstring
        deadline = time.monotonic() + (self.timeout_s or 0.0)
        for work, peer in zip(works, peers):
            try:
                if bounded:
                    ok = work.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
                else:
                    ok = work.wait()
            except RuntimeError as err:
                raise self._p2p_error(err, what, dst, src, peer) from err
            if ok is False:
                raise HDPCommError(
                    f"rank {self.rank}: P2P exchange {what} (send to rank {dst}, receive from rank {src}) was aborted "
                    "by the backend; see the other ranks' logs."
                )

    def _p2p_error(self, err: Exception, what: str, dst: int, src: int, peer: str) -> HDPCommError:
        where = f"P2P exchange {what} (send to rank {dst}, receive from rank {src})"
        if _peer_crashed(err):
            return PeerCrashedError(
                f"rank {self.rank}'s peer {peer} closed the connection (the process likely crashed; see its log) "
                f"during the {where}. {self.backend}: {err}"
            )
        if _timed_out(err):
            return P2PTimeoutError(
                f"rank {self.rank}: {where} timed out after {self._bound_text()} waiting for {peer}: a ring partner "
                "did not reach the same piece. Check that every rank runs the same plan and that no rank is stuck "
                "(see its log); raise HDPConfig.p2p_timeout_s if a step legitimately takes longer. "
                f"{self.backend}: {err}"
            )
        return HDPCommError(f"rank {self.rank}: {where} with {peer} failed: {err}")

    # ----------------------------------------------------------- collectives
    def _all_reduce(self, tensor: torch.Tensor, what: str, step: int | None) -> None:
        """SUM ``tensor`` over all ranks in place, within the bound (see the class docstring)."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        opts.asyncOp = True
        if self.timeout is not None and self.backend == "gloo":
            opts.timeout = self.timeout  # gloo itself gives up, so this process can still exit
        try:
            work = dist.group.WORLD.allreduce([tensor], opts)
            ok = work.wait(self.timeout) if self.timeout is not None else work.wait()
        except RuntimeError as err:
            raise self._collective_error(err, what, step) from err
        if ok is False:
            raise HDPCommError(f"rank {self.rank}: the {what}{_at_step(step)} was aborted by the backend; "
                               "see the other ranks' logs.")

    def _collective_error(self, err: Exception, what: str, step: int | None) -> HDPCommError:
        where = f"the {what} (an all-reduce over all {self.world_size} ranks){_at_step(step)}"
        if _peer_crashed(err):
            peer = f"peer rank {1 - self.rank}" if self.world_size == 2 else "peer"  # else only the address is known
            return PeerCrashedError(
                f"rank {self.rank}'s {peer} closed the connection (the process likely crashed; see its log) during "
                f"{where}. {self.backend}: {err}"
            )
        if _timed_out(err):
            return CollectiveTimeoutError(
                f"rank {self.rank}: {where} did not complete within {self._bound_text()}: another rank did not reach "
                "it. A rank is stuck or far slower (a hung data loader, a deadlock, a rank still in a long step), or "
                "one crashed (then the ranks connected to it report PeerCrashedError: see their logs). Raise "
                f"HDPConfig.p2p_timeout_s if steps legitimately take longer. {self.backend}: {err}"
            )
        return HDPCommError(f"rank {self.rank}: {where} failed: {err}")

    def check_plan(self, fingerprint: int, step: int) -> None:
        """Raise :class:`PlanMismatchError` unless every rank holds a plan with this fingerprint.

        ``step``: the global optimizer step (1-based), for the messages.
        """
        if self.world_size == 1:
            return
        slots = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        slots[self.rank] = fingerprint  # one slot per rank: the sum is an all-gather
        self._all_reduce(slots, "plan check", step)
        values = slots.tolist()
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(values):
                groups.setdefault(v, []).append(r)
            detail = "; ".join(f"ranks {rs} hold plan {v:#x}" for v, rs in groups.items())
            raise PlanMismatchError(
                f"global step {step}: the ranks do not hold the same plan ({detail}). Every rank must see the same "
                "dataset (same files, same order), the same seed and the same HDPConfig; running different plans "
                "would deadlock or train on wrong data, so nothing was sent."
            )

    def reduce_gradients(self, params: list[torch.nn.Parameter], extras: list[float] | None = None,
                         step: int | None = None) -> list[float]:
        """Sum every parameter's gradient over all ranks in ONE collective, in place.

        Parameters without a gradient (a rank that ran no micro-batch, or an unused weight) take
        part with zeros, and get the summed gradient. ``extras`` are scalars summed in the same
        collective (for example the step's loss sum); their sums are returned. ``step``: the global
        optimizer step (1-based), for the messages.
        """
        extras = list(extras or [])
        if self.world_size == 1:
            return extras
        grads = [p.grad for p in params]
        # the buffer's dtype must not depend on which gradients exist: a rank that ran no
        # micro-batch has none, and every rank must send the same number of bytes
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        sizes = [p.numel() for p in params]
        flat = torch.zeros(sum(sizes) + len(extras), dtype=dtype, device=self.device)
        offset = 0
        for g, n in zip(grads, sizes):
            if g is not None:
                flat[offset : offset + n].copy_(g.reshape(-1))
            offset += n
        if extras:
            flat[offset:] = torch.tensor(extras, dtype=dtype, device=self.device)
        self._all_reduce(flat, "gradient reduction", step)
        offset = 0
        for p, n in zip(params, sizes):
            chunk = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n
        return flat[offset:].tolist()

    def sum_scalars(self, values: list[float], what: str, step: int) -> list[float]:
        """Sum a few scalars over all ranks in one bounded all-reduce, in float64.

        ``what`` names the collective in errors (e.g. ``"evaluation loss sum"``); ``step`` is the
        global optimizer step. With one process the values come back unchanged.
        """
        if self.world_size == 1:
            return list(values)
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._all_reduce(totals, what, step)
        return totals.tolist()


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


class HDPAccelerator(Accelerator):
    """An :class:`accelerate.Accelerator` for HDP: replicated model states, no DDP wrapper, carrying the mesh.

    Gradients are reduced by :meth:`DynamicMesh.reduce_gradients`, once per optimizer step.
    HDPTrainer builds one in its ``create_accelerator_and_postprocess`` from the Accelerator that
    Trainer configured (:meth:`like`).
    """

    def __init__(self, *args, mesh: DynamicMesh | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mesh = mesh

    @classmethod
    def like(cls, accelerator: Accelerator, mesh: DynamicMesh) -> "HDPAccelerator":
        """An HDPAccelerator with ``accelerator``'s settings (precision, dataloader and accumulation
        configuration, handlers, dynamo plugin); the process state is shared, as for any Accelerator."""
        from accelerate.utils import GradientAccumulationPlugin

        handlers = [h for h in (accelerator.ddp_handler, accelerator.scaler_handler, accelerator.init_handler,
                                accelerator.autocast_handler) if h is not None]
        return cls(
            mixed_precision=accelerator.state.mixed_precision,
            dataloader_config=accelerator.dataloader_config,
            gradient_accumulation_plugin=GradientAccumulationPlugin(**accelerator.gradient_state.plugin_kwargs),
            step_scheduler_with_optimizer=accelerator.step_scheduler_with_optimizer,
            kwargs_handlers=handlers or None,
            dynamo_plugin=accelerator.state.dynamo_plugin,
            rng_types=accelerator.rng_types,
            mesh=mesh,
        )

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        # evaluation_mode=True places the model and applies mixed precision without the DDP wrapper
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)

    def no_sync(self, model):
        return contextlib.nullcontext()
