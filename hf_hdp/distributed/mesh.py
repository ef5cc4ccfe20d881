"""The dynamic mesh: one global process group, P2P with the members of each piece's group.

ByteScale's point (docs/design.md §1) is that a context-parallel group of any size can be formed per
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
- reduces gradients once per optimizer step, however many micro-batches a rank ran (zero included):
  in buckets of at most ``bucket_bytes`` (:data:`DEFAULT_BUCKET_BYTES`, 25 MiB), each in the
  gradients' own dtype, with extra scalars riding along in the bucket sent last, started while the
  last micro-batch's backward still runs (:mod:`hf_hdp.distributed.reduction`); as all-reduces (every
  rank gets the summed gradient) or, for ZeRO stage 2, as reduce-scatters (each rank keeps only the
  gradients its optimizer shard updates) (:meth:`DynamicMesh.reduce_gradients`, :func:`plan_buckets`);
- copies ZeRO's updated weights from their owners to every rank, in the same buckets
  (:meth:`DynamicMesh.gather_parameters`), and gathers a sharded optimizer state for a checkpoint
  (:meth:`DynamicMesh.gather_bytes`);
- sums a few scalars for evaluation (:meth:`DynamicMesh.sum_scalars`);
- for benchmarks only, and only when asked (``DynamicMesh(links=LinkEmulator(...))``; off by default):
  makes every P2P exchange and collective last as long as it would on the emulated links
  (:mod:`hf_hdp.distributed.links`), by sleeping (see :class:`DynamicMesh`).

No rank waits forever: every one of these waits is bounded (``HDPConfig.p2p_timeout_s``, 10 minutes
by default). A peer that is late past the bound raises :class:`P2PTimeoutError` (ring) or
:class:`CollectiveTimeoutError`; a peer whose process is gone raises :class:`PeerCrashedError`. All
three are :class:`HDPCommError` and name this rank, the peer or the collective, and the step.

The ring exchanges, :meth:`DynamicMesh.gather_bytes` and the link emulation live in
:mod:`hf_hdp.distributed.p2p` (:class:`~hf_hdp.distributed.p2p.P2PExchange`, a base of the mesh); the errors
and :class:`CommStats` in :mod:`hf_hdp.distributed.errors`.
:class:`~hf_hdp.accelerator.HDPAccelerator` plugs the mesh into accelerate; the bucket layout is
:mod:`hf_hdp.distributed.buckets`; :mod:`hf_hdp.distributed.launch` starts the process group and refuses a launch of several
processes that did not form one. Their names stay importable from here.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .buckets import Bucket, pack, plan_buckets, unpack
from .errors import (
    CollectiveTimeoutError,
    CommStats,
    HDPCommError,
    P2PTimeoutError,
    PeerCrashedError,
    PlanMismatchError,
    _at_step,
    _peer_crashed,
    _timed_out,
)
from .links import LinkEmulator
from .p2p import P2PExchange, _Wire
from .reduction import GradientReduction

DEFAULT_TIMEOUT_S = 600.0
"""Default bound, in seconds, on every HDP wait (``HDPConfig.p2p_timeout_s`` has the same default)."""

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""Default bound, in bytes, on one bucket of the gradient reduction (25 MiB, DDP's ``bucket_cap_mb``).

Every collective of :meth:`DynamicMesh.reduce_gradients` and :meth:`DynamicMesh.gather_parameters`
moves at most this many bytes per rank, and no buffer they allocate is larger, so the reduction
needs no second copy of the model's gradients. Read when a :class:`DynamicMesh` is built without
``bucket_bytes``: setting this module attribute changes the default of the meshes built afterwards
(HDPTrainer builds its own). Smaller buckets mean more, smaller collectives (latency); larger ones,
more temporary memory.
"""


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class _Pending:
    """A started collective and what to call it in errors."""

    work: object
    kind: str
    what: str
    step: int | None
    wire: _Wire | None = None


# DynamicMesh's names of the collectives -> LinkEmulator.collective_delay's
_EMULATED_KIND = {"an all-reduce": "all_reduce", "a reduce-scatter": "reduce_scatter", "an all-gather": "all_gather"}


class DynamicMesh(P2PExchange):
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

    ``bucket_bytes`` bounds each collective of the gradient reduction and of ZeRO's weight all-gather,
    and each buffer they allocate (default :data:`DEFAULT_BUCKET_BYTES`, read when the mesh is built).

    ``links`` (default ``None``: nothing changes, in behaviour or timing): a
    :class:`~hf_hdp.distributed.links.LinkEmulator`, for benchmarks on one machine, where loopback P2P is nearly
    free. Then every transfer of the mesh is "delivered" at its start plus the emulated delay
    (:meth:`~hf_hdp.distributed.links.LinkEmulator.exchange_delay` for a P2P exchange, ``collective_delay`` for a
    collective, ``p2p_delay`` for :meth:`gather_bytes`' messages), and the wait for it SLEEPS (never
    spins: the ranks of a benchmark share a few cores) only for what is left of that deadline once the
    real transfer is done. So compute between :meth:`exchange` and :meth:`wait` (the ring's block)
    overlaps the wire time as on a real link, and a transfer waited for at once costs its whole delay.
    The start counts from the later of this rank's start and, when this rank had to block (or poll) for
    the real transfer, the moment it completed: a partner (or, for a collective, the last rank) that
    joins late starts the wire late, as it would on a real link. Seconds are counted in
    :class:`CommStats` (``emulated_*``). The bytes moved are the real ones, unchanged. gloo only in
    practice: with NCCL the sleep delays the host, not the GPU stream. ``mesh.links`` may be set or
    cleared between steps (a benchmark's warm-up runs without it).
    """

    def __init__(
        self,
        device: torch.device | None = None,
        p2p_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        bucket_bytes: int | None = None,
        links: LinkEmulator | None = None,
    ):
        bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"DynamicMesh(bucket_bytes=...) must be a positive number of bytes, got {bucket_bytes!r}")
        self.bucket_bytes = bucket_bytes
        self.current_step: int | None = None  # the global step of the last plan check / reduction, for messages
        self.gradients_sharded = False  # the last reduction left each rank only its shard's gradients
        self.initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.initialized else 0
        self.world_size = dist.get_world_size() if self.initialized else 1
        self.backend = dist.get_backend() if self.initialized else None
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
            )
        self.device = torch.device(device)
        self.timeout_s = float(p2p_timeout_s) if p2p_timeout_s else None
        self.timeout = datetime.timedelta(seconds=self.timeout_s) if self.timeout_s else None
        self.stats = CommStats()
        if links is not None and not isinstance(links, LinkEmulator):
            raise TypeError(
                "DynamicMesh(links=...) takes a hf_hdp.distributed.links.LinkEmulator or None, "
                f"got {type(links).__name__}"
            )
        self.links = links

    # ----------------------------------------------------------- collectives
    def _all_reduce(self, tensor: torch.Tensor, what: str, step: int | None) -> None:
        """SUM ``tensor`` over all ranks in place, within the bound (see the class docstring)."""
        self._finish(self._start_all_reduce(tensor, what, step))

    def _start_all_reduce(self, tensor: torch.Tensor, what: str, step: int | None) -> _Pending:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return self._begin(
            lambda o: dist.group.WORLD.allreduce([tensor], o), opts, "an all-reduce", what, step, _nbytes(tensor)
        )

    def _start_reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, what: str, step: int | None) -> _Pending:
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        group = dist.group.WORLD
        start = getattr(group, "reduce_scatter_single", None) or group._reduce_scatter_base  # torch < 2.13
        return self._begin(lambda o: start(output, input, o), opts, "a reduce-scatter", what, step, _nbytes(input))

    def _all_gather(self, output: torch.Tensor, input: torch.Tensor, what: str, step: int | None) -> None:
        """Chunk ``r`` of ``output`` = rank ``r``'s ``input``, within the bound."""
        opts = dist.distributed_c10d.AllgatherOptions()  # not exported by torch.distributed itself
        group = dist.group.WORLD
        start = getattr(group, "all_gather_single", None) or group._allgather_base  # torch < 2.13
        self._collective(lambda o: start(output, input, o), opts, "an all-gather", what, step, _nbytes(output))

    def _collective(self, start, opts, kind: str, what: str, step: int | None, nbytes: int = 0) -> None:
        """Start a collective with ``start(opts)`` and wait for it within the bound (see the class docstring)."""
        self._finish(self._begin(start, opts, kind, what, step, nbytes))

    def _begin(self, start, opts, kind: str, what: str, step: int | None, nbytes: int = 0) -> _Pending:
        """Start a collective with ``start(opts)``, asynchronously; :meth:`_finish` waits for it.

        ``nbytes`` (the all-reduced tensor, a reduce-scatter's whole input, an all-gather's whole output)
        prices it on the emulated links, if any."""
        opts.asyncOp = True
        if self.timeout is not None and self.backend == "gloo":
            opts.timeout = self.timeout  # gloo itself gives up, so this process can still exit
        started = time.monotonic() if self.links is not None else None
        try:
            pending = _Pending(start(opts), kind, what, step)
        except RuntimeError as err:
            raise self._collective_error(err, what, step, kind) from err
        if self.links is not None:
            delay = self.links.collective_delay(nbytes, self.world_size, _EMULATED_KIND[kind])
            pending.wire = self._wire(delay, started)
        return pending

    @staticmethod
    def _done(pending: _Pending) -> bool:
        """Whether a started collective has completed (never waits); with a link emulator, also its emulated
        delay (counted from when this rank first saw the real collective complete)."""
        if not pending.work.is_completed():
            return False
        wire = pending.wire
        if wire is None:
            return True
        now = time.monotonic()
        if wire.seen is None:
            wire.seen = now
        return now >= max(wire.start, wire.seen) + wire.delay

    def _finish(self, pending: _Pending) -> None:
        """Wait for a started collective within the bound (see the class docstring)."""
        wire = pending.wire
        if wire is not None:
            cpu_at_wait = time.process_time()
            blocked = wire.seen is None and not pending.work.is_completed()
        try:
            ok = pending.work.wait(self.timeout) if self.timeout is not None else pending.work.wait()
        except RuntimeError as err:
            raise self._collective_error(err, pending.what, pending.step, pending.kind) from err
        if ok is False:
            raise HDPCommError(
                f"rank {self.rank}: the {pending.what}{_at_step(pending.step)} was aborted by the "
                "backend; see the other ranks' logs."
            )
        self.stats.collectives += 1
        if wire is not None:
            if blocked:
                wire.seen = time.monotonic()
            self._arrive(wire, cpu_at_wait)

    def translate_error(self, err: BaseException, what: str, kind: str, step: int | None) -> HDPCommError | None:
        """The :class:`PeerCrashedError` or :class:`CollectiveTimeoutError` that a backend's raw error (gloo's
        ``Connection closed by peer``, a timed-out wait) in a collective *not run by this mesh* stands for, in
        this mesh's words (this rank, ``what`` and ``kind``, the global ``step``); ``None`` for any other error
        (e.g. a shape error in a model), which should propagate unchanged. For FSDP's own collectives
        (:func:`hf_hdp.engine.fsdp.fsdp_errors`)."""
        if isinstance(err, HDPCommError) or not isinstance(err, RuntimeError):
            return None
        if not (_peer_crashed(err) or _timed_out(err)):
            return None
        return self._collective_error(err, what, step, kind)

    def _collective_error(
        self, err: Exception, what: str, step: int | None, kind: str = "an all-reduce"
    ) -> HDPCommError:
        where = f"the {what} ({kind} over all {self.world_size} ranks){_at_step(step)}"
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

    def _buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed bucket buffer (its size is recorded in ``stats.largest_buffer_bytes``)."""
        buffer = torch.zeros(numel, dtype=dtype, device=self.device)
        self.stats.largest_buffer_bytes = max(self.stats.largest_buffer_bytes, numel * buffer.element_size())
        return buffer

    def check_plan(self, fingerprint: int, step: int) -> None:
        """Raise :class:`PlanMismatchError` unless every rank holds a plan with this fingerprint.

        ``step``: the global optimizer step (1-based), for the messages.
        """
        self.current_step = step
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

    def reduce_gradients(
        self,
        params: list[torch.nn.Parameter],
        extras: list[float] | None = None,
        step: int | None = None,
        owners: Sequence[int | None] | None = None,
    ) -> list[float]:
        """Sum every parameter's gradient over all ranks, in place, in buckets of at most ``bucket_bytes``.

        Every rank issues the same collectives with the same bytes, however many micro-batches it ran
        (zero included): the buckets (:func:`plan_buckets`) depend only on the parameters' sizes and
        dtypes, each bucket is in its gradients' dtype, and a parameter without a gradient (a rank that
        ran no micro-batch, or an unused weight) takes part with zeros. A bucket that is one piece of
        one gradient is reduced in place; the others go through a buffer of at most ``bucket_bytes``,
        so no second copy of the gradients is made.

        ``extras`` are scalars summed in the bucket sent last, in float32 (or the widest parameter
        dtype if wider, as the loss sum always was); their sums are returned.

        The buckets go in a fixed order, the parameters' last first (:mod:`hf_hdp.distributed.reduction`, which
        can also start them during the last backward).

        ``owners=None``: all-reduces, every rank gets every summed gradient. ``owners[i]``: the rank
        that keeps ``params[i]``'s summed gradient (ZeRO stage 2): reduce-scatters, after which the
        other ranks' gradients for it are ``None`` (``None`` in ``owners``: every rank keeps it).
        ``step``: the global optimizer step (1-based), for the messages.
        """
        extras = [float(x) for x in extras or []]
        return self.gradient_reduction(params, owners, len(extras), step).finish(extras)

    def gradient_reduction(
        self,
        params: list[torch.nn.Parameter],
        owners: Sequence[int | None] | None = None,
        num_extras: int = 0,
        step: int | None = None,
    ) -> GradientReduction:
        """The step's reduction of :meth:`reduce_gradients`, to start during the last backward
        (:meth:`GradientReduction.watch`) and complete with :meth:`GradientReduction.finish`
        (:mod:`hf_hdp.distributed.reduction`)."""
        return GradientReduction(self, params, owners, num_extras, step)

    def gather_parameters(
        self,
        params: list[torch.Tensor],
        owners: Sequence[int],
        step: int | None = None,
        buckets: list[Bucket] | None = None,
    ) -> None:
        """Copy every parameter from the rank that owns it to all ranks, in place: ZeRO's weight sync.

        Bucketed all-gathers (at most ``bucket_bytes`` per bucket and buffer, bounded waits); the same
        buckets on every rank. ``buckets``: :func:`plan_buckets` of the parameters with these owners,
        if the caller keeps them.
        """
        if self.world_size == 1:
            return
        if buckets is None:
            buckets = plan_buckets([(p.numel(), p.dtype) for p in params], self.bucket_bytes, owners, self.world_size)
        flats = [p.detach().view(-1) for p in params]
        with torch.no_grad():
            for b, bucket in enumerate(buckets):
                size = bucket.chunk_numel
                mine = self._buffer(size, bucket.dtype)
                pack(mine, bucket.chunks[self.rank], flats)
                gathered = self._buffer(bucket.numel, bucket.dtype)
                self._all_gather(gathered, mine, f"weight all-gather (ZeRO), bucket {b + 1} of {len(buckets)}", step)
                for r, segments in enumerate(bucket.chunks):
                    if r != self.rank:
                        unpack(gathered[r * size : (r + 1) * size], segments, flats)

    def total_norm(self, local_norm: float, norm_type: float, step: int | None = None) -> float:
        """The ``norm_type``-norm over all ranks of each rank's ``local_norm`` (one bounded all-reduce).

        Every rank gets the same float: the norms are gathered (one slot per rank) and combined in rank order.
        """
        if self.world_size == 1:
            return float(local_norm)
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        slots[self.rank] = float(local_norm)
        self._all_reduce(slots, "gradient norm", step)
        return float(torch.linalg.vector_norm(slots.cpu(), float(norm_type)))

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


__all__ = [
    "CollectiveTimeoutError",
    "CommStats",
    "DEFAULT_TIMEOUT_S",
    "DynamicMesh",
    "HDPCommError",
    "P2PTimeoutError",
    "PeerCrashedError",
    "PlanMismatchError",
]
