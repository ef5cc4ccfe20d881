"""The distributed pieces, on the one global process group: the dynamic mesh (:mod:`.mesh`: bounded
collectives, plan checks; its P2P side in :mod:`.p2p`; its errors and :class:`CommStats` in :mod:`.errors`),
the bucketed gradient reduction (:mod:`.reduction`, :mod:`.buckets`), emulated links for benchmarks
(:mod:`.links`) and starting the process group (:mod:`.launch`)."""

from .errors import (
    CollectiveTimeoutError,
    CommStats,
    HDPCommError,
    P2PTimeoutError,
    PeerCrashedError,
    PlanMismatchError,
)
from .launch import check_distributed_setup, init_process_group
from .mesh import DynamicMesh

__all__ = [
    "CollectiveTimeoutError",
    "CommStats",
    "DynamicMesh",
    "HDPCommError",
    "P2PTimeoutError",
    "PeerCrashedError",
    "PlanMismatchError",
    "check_distributed_setup",
    "init_process_group",
]
