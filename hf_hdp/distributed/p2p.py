"""The dynamic mesh's point-to-point side (:class:`P2PExchange`, a base of
:class:`~hf_hdp.distributed.mesh.DynamicMesh`): ring exchanges with bounded waits, the piecewise byte
transfers of :meth:`P2PExchange.gather_bytes`, and the emulated wire of every transfer (``DynamicMesh(links=...)``)."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import (
    CollectiveTimeoutError,
    HDPCommError,
    P2PTimeoutError,
    PeerCrashedError,
    _at_step,
    _peer_crashed,
    _timed_out,
)


@dataclass
class _Wire:
    """An emulated transfer (``DynamicMesh(links=...)``): when it started, on the wall clock and in this
    process's CPU time, and how long the emulated link takes for it."""

    start: float  # time.monotonic() when the transfer was started
    cpu_start: float  # time.process_time() then
    delay: float  # emulated wire seconds
    seen: float | None = None  # when this rank first saw the real transfer complete, if it had to look for it


class P2PExchange:
    """P2P and link emulation of :class:`~hf_hdp.distributed.mesh.DynamicMesh`, which sets the attributes used
    here (``rank``, ``backend``, ``device``, ``timeout``, ``timeout_s``, ``bucket_bytes``, ``links``, ``stats``)
    and provides its bounded all-reduce."""

    # ------------------------------------------------------------ link emulation
    def _wire(self, delay: float, start: float | None = None) -> _Wire:
        self.stats.emulated_wire_s += delay
        return _Wire(time.monotonic() if start is None else start, time.process_time(), delay)

    def _arrive(self, wire: _Wire, cpu_at_wait: float) -> None:
        """Sleep until an emulated transfer's deadline, after its real transfer is done; count the seconds."""
        self.stats.emulated_exposed_s += max(0.0, wire.delay - (cpu_at_wait - wire.cpu_start))
        begin = wire.start if wire.seen is None else max(wire.start, wire.seen)
        left = begin + wire.delay - time.monotonic()
        if left > 0:
            time.sleep(left)
            self.stats.emulated_wait_s += left

    def _bound_text(self) -> str:
        return f"{self.timeout_s:g} s" if self.timeout_s else "the process group's timeout"

    # ------------------------------------------------------------------ P2P
    def exchange(
        self,
        send: torch.Tensor | None,
        dst: int,
        recv: torch.Tensor | None,
        src: int,
        what: str = "",
    ) -> list:
        """Start sending ``send`` to ``dst`` and receiving into ``recv`` from ``src``; returns handles for :meth:`wait`.

        Either side may be ``None`` (nothing to send, or nothing to receive): windowed layers skip the messages
        a window does not reach, and both partners know it from the same metadata. Both ``None``: no-op."""
        if send is None and recv is None:
            return []
        if dst == self.rank and src == self.rank:
            if send is not None and recv is not None:
                recv.copy_(send)
            return []
        ops = []
        send_bytes = recv_bytes = 0
        if send is not None:
            send = send.contiguous()
            ops.append(dist.P2POp(dist.isend, send, dst))
            send_bytes = send.numel() * send.element_size()
            self.stats.bytes_sent += send_bytes
            self.stats.messages_sent += 1
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, src))
            recv_bytes = recv.numel() * recv.element_size()
        started = time.monotonic() if self.links is not None else None
        works = list(dist.batch_isend_irecv(ops))
        wire = None
        if self.links is not None:
            if send is not None and recv is not None:
                delay = self.links.exchange_delay(self.rank, send_bytes, dst, recv_bytes, src)
            else:
                delay = (
                    self.links.p2p_delay(send_bytes, self.rank, dst)
                    if send is not None
                    else self.links.p2p_delay(recv_bytes, src, self.rank)
                )
            wire = self._wire(delay, started)
        sides = ("send" if send is not None else "") + ("recv" if recv is not None else "")
        return works + [(what, dst, src, wire, sides)]

    def wait(self, handles: list) -> None:
        """Complete an :meth:`exchange`; raise :class:`P2PTimeoutError` past the bound (send and
        receive together), :class:`PeerCrashedError` if the partner's process is gone."""
        if not handles:
            return
        *works, (what, dst, src, wire, sides) = handles
        if wire is not None:
            cpu_at_wait = time.process_time()
            blocked = not all(w.is_completed() for w in works)
        # gloo returns one work per op (send to dst, receive from src); NCCL one coalesced work
        if len(works) == 2:
            peers = [f"rank {dst}", f"rank {src}"]
        elif sides in ("send", "recv"):
            peers = [f"rank {dst}" if sides == "send" else f"rank {src}"] * len(works)
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
        if wire is not None:
            if blocked:
                wire.seen = time.monotonic()
            self._arrive(wire, cpu_at_wait)

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

    def gather_bytes(self, data: bytes, receive: bool, what: str, step: int | None = None) -> list[bytes] | None:
        """Every rank's ``data`` on each rank that passes ``receive=True``; ``None`` on the others. Call on all ranks.

        One bounded all-reduce of the sizes and receivers, then point-to-point transfers in pieces of at
        most ``bucket_bytes``, in the same (source, receiver) order on every rank, each wait bounded:
        memory on the way is one piece. For a sharded optimizer state (a checkpoint).
        """
        if self.world_size == 1:
            return [data] if receive else None
        world = self.world_size
        info = torch.zeros(2 * world, dtype=torch.int64, device=self.device)
        info[self.rank] = len(data)
        info[world + self.rank] = int(bool(receive))
        self._all_reduce(info, f"{what} (sizes)", step)
        sizes, wants = info[:world].tolist(), info[world:].tolist()
        out: list[bytes] | None = [b""] * world if receive else None
        if receive:
            out[self.rank] = data
        piece = self.bucket_bytes
        mine = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
        for src in range(world):
            for dst in (r for r in range(world) if wants[r] and r != src):
                if self.rank == src:
                    for a in range(0, sizes[src], piece):
                        part = mine[a : a + piece].to(self.device)
                        self._p2p_wait(
                            self._p2p_wire(part.numel(), self.rank, dst), dist.isend(part, dst), what, step, dst, True
                        )
                elif self.rank == dst:
                    got = bytearray()
                    for a in range(0, sizes[src], piece):
                        buf = torch.empty(min(piece, sizes[src] - a), dtype=torch.uint8, device=self.device)
                        self._p2p_wait(
                            self._p2p_wire(buf.numel(), src, self.rank), dist.irecv(buf, src), what, step, src, False
                        )
                        got += buf.cpu().numpy().tobytes()
                    out[src] = bytes(got)
        return out

    def _p2p_wire(self, nbytes: int, src: int, dst: int) -> _Wire | None:
        """The emulated transfer of one blocking message of :meth:`gather_bytes` (None without an emulator)."""
        return None if self.links is None else self._wire(self.links.p2p_delay(nbytes, src, dst))

    def _p2p_wait(self, wire: _Wire | None, work, what: str, step: int | None, peer: int, sending: bool) -> None:
        where = f"the {what} ({'sending to' if sending else 'receiving from'} rank {peer}){_at_step(step)}"
        if wire is not None:
            cpu_at_wait = time.process_time()
            blocked = not work.is_completed()
        try:
            ok = work.wait(self.timeout) if self.timeout is not None else work.wait()
        except RuntimeError as err:
            if _peer_crashed(err):
                raise PeerCrashedError(
                    f"rank {self.rank}'s peer rank {peer} closed the connection (the process likely "
                    f"crashed; see its log) during {where}. {self.backend}: {err}"
                ) from err
            if _timed_out(err):
                raise CollectiveTimeoutError(
                    f"rank {self.rank}: {where} did not complete within {self._bound_text()}: rank {peer} did not "
                    f"reach it (see its log); raise HDPConfig.p2p_timeout_s if it legitimately takes longer. "
                    f"{self.backend}: {err}"
                ) from err
            raise HDPCommError(f"rank {self.rank}: {where} failed: {err}") from err
        if ok is False:
            raise HDPCommError(f"rank {self.rank}: {where} was aborted by the backend; see the other ranks' logs.")
        if wire is not None:
            if blocked:
                wire.seen = time.monotonic()
            self._arrive(wire, cpu_at_wait)


__all__ = ["P2PExchange"]
