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
- checks once per step, before any P2P, that every rank holds the same plan (an all-gather of the
  plan's 63-bit fingerprint) and names the disagreeing ranks if not;
- reduces gradients: one collective per optimizer step over one flat buffer, however many
  micro-batches a rank ran (zero included), with extra scalars riding along in the same buffer.

:class:`HDPAccelerator` plugs the mesh into accelerate: an :class:`accelerate.Accelerator` whose
``prepare_model`` places the model but never wraps it in DDP (HDP synchronises gradients itself,
once per step, so DDP's per-backward reduction and its bucket memory would be wrong and wasted)
and whose ``no_sync`` is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator


class PlanMismatchError(RuntimeError):
    """Ranks disagree on the step plan; running it would deadlock or train on wrong data."""


class P2PTimeoutError(RuntimeError):
    """A ring partner did not answer in time."""


@dataclass
class CommStats:
    bytes_sent: int = 0
    messages_sent: int = 0

    def reset(self) -> "CommStats":
        snapshot = CommStats(self.bytes_sent, self.messages_sent)
        self.bytes_sent = self.messages_sent = 0
        return snapshot


class DynamicMesh:
    """Per-sample context-parallel groups over the one global process group."""

    def __init__(self, device: torch.device | None = None, p2p_timeout_s: float | None = None):
        self.initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.initialized else 0
        self.world_size = dist.get_world_size() if self.initialized else 1
        self.backend = dist.get_backend() if self.initialized else None
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        self.p2p_timeout = datetime.timedelta(seconds=p2p_timeout_s) if p2p_timeout_s else None
        self.stats = CommStats()

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
        if not handles:
            return
        *works, (what, dst, src) = handles
        for work in works:
            try:
                if self.p2p_timeout is not None and self.backend == "gloo":
                    ok = work.wait(self.p2p_timeout)
                else:
                    ok = work.wait()
            except RuntimeError as err:  # gloo raises on timeout
                raise P2PTimeoutError(
                    f"rank {self.rank}: P2P exchange {what} (send to rank {dst}, receive from rank {src}) failed: {err}. "
                    "A ring partner did not reach the same piece: check that every rank runs the same plan "
                    "and that no rank has died."
                ) from err
            if ok is False:
                raise P2PTimeoutError(
                    f"rank {self.rank}: P2P exchange {what} with ranks {dst}/{src} did not complete within {self.p2p_timeout}."
                )

    # ----------------------------------------------------------- collectives
    def check_plan(self, fingerprint: int, step: int) -> None:
        """Raise :class:`PlanMismatchError` unless every rank holds a plan with this fingerprint."""
        if self.world_size == 1:
            return
        mine = torch.tensor([fingerprint], dtype=torch.int64, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        values = [int(t.item()) for t in everyone]
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(values):
                groups.setdefault(v, []).append(r)
            detail = "; ".join(f"ranks {rs} hold plan {v:#x}" for v, rs in groups.items())
            raise PlanMismatchError(
                f"step {step}: the ranks do not hold the same plan ({detail}). Every rank must see the same "
                "dataset (same files, same order), the same seed and the same HDPConfig; running different plans "
                "would deadlock or train on wrong data, so nothing was sent."
            )

    def reduce_gradients(self, params: list[torch.nn.Parameter], extras: list[float] | None = None) -> list[float]:
        """Sum every parameter's gradient over all ranks in ONE collective, in place.

        Parameters without a gradient (a rank that ran no micro-batch, or an unused weight) take
        part with zeros, and get the summed gradient. ``extras`` are scalars summed in the same
        collective (for example the step's loss sum); their sums are returned.
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
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, n in zip(params, sizes):
            chunk = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n
        return flat[offset:].tolist()


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
    """An :class:`accelerate.Accelerator` for HDP: replicated model states, no DDP wrapper.

    Gradients are reduced by :meth:`DynamicMesh.reduce_gradients`, once per optimizer step.
    Use :func:`attach_mesh` to turn the Accelerator the Trainer built into one of these.
    """

    mesh: DynamicMesh

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        # evaluation_mode=True places the model and applies mixed precision without the DDP wrapper
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)

    def no_sync(self, model):
        return contextlib.nullcontext()


def attach_mesh(accelerator: Accelerator, mesh: DynamicMesh) -> HDPAccelerator:
    """Make ``accelerator`` an :class:`HDPAccelerator` carrying ``mesh`` (state is kept as is)."""
    if not isinstance(accelerator, HDPAccelerator):
        accelerator.__class__ = type("HDP" + type(accelerator).__name__, (HDPAccelerator, type(accelerator)), {})
    accelerator.mesh = mesh
    return accelerator
