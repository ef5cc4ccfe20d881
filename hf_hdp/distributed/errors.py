"""hf_hdp's communication errors (every HDP wait is bounded: a late peer raises a timeout, a dead one
:class:`PeerCrashedError`) and :class:`CommStats`, what a :class:`~hf_hdp.distributed.mesh.DynamicMesh` sent."""

from __future__ import annotations

from dataclasses import dataclass


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


# What the backends say when a wait ran past its bound, here or on the other end of the connection (gloo closes a
# pair when one side's wait times out, and the other side then reads "Application timeout caused pair closure").
_TIMEOUT_MARKERS = ("timed out", "application timeout")


def _timed_out(err: BaseException) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in _TIMEOUT_MARKERS)


def _at_step(step: int | None) -> str:
    return f" at global step {step}" if step is not None else ""


@dataclass
class CommStats:
    """What a mesh sent. ``bytes_sent`` / ``messages_sent``: ring P2P only; ``collectives``: collectives
    over all ranks (plan check, gradient buckets, weight all-gathers, sums); ``largest_buffer_bytes``:
    the largest bucket buffer the gradient reduction or the weight all-gather allocated;
    ``buckets_started_in_backward``: gradient buckets started while the last backward still ran.

    With a link emulator only (``DynamicMesh(links=...)``; all three stay 0 without one):
    ``emulated_wire_s``: the emulated link seconds of every P2P exchange and collective this rank ran
    (the formulas' sum); ``emulated_wait_s``: the part of it this rank actually slept (what the real
    transfer and the compute between start and wait did not already cover); ``emulated_exposed_s``: the
    part this rank's own CPU time between start and wait does not cover, ``max(0, delay - CPU s)`` per
    transfer: the wire time a rank with a core of its own would wait (for critical paths built from CPU
    times, as ``benchmarks/real_ranks.py`` does)."""

    bytes_sent: int = 0
    messages_sent: int = 0
    collectives: int = 0
    largest_buffer_bytes: int = 0
    buckets_started_in_backward: int = 0
    emulated_wire_s: float = 0.0
    emulated_wait_s: float = 0.0
    emulated_exposed_s: float = 0.0


__all__ = [
    "CollectiveTimeoutError",
    "CommStats",
    "HDPCommError",
    "P2PTimeoutError",
    "PeerCrashedError",
    "PlanMismatchError",
]
