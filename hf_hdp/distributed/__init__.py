"""The distributed pieces, on the one global process group: the dynamic mesh (:mod:`.mesh`: bounded P2P,
bounded collectives, plan checks), the bucketed gradient reduction (:mod:`.reduction`, :mod:`.buckets`),
emulated links for benchmarks (:mod:`.links`) and starting the process group (:mod:`.launch`)."""

from .launch import check_distributed_setup, init_process_group
from .mesh import (CollectiveTimeoutError, CommStats, DynamicMesh, HDPCommError, P2PTimeoutError, PeerCrashedError,
                   PlanMismatchError)

__all__ = [
    "CollectiveTimeoutError", "CommStats", "DynamicMesh", "HDPCommError", "P2PTimeoutError", "PeerCrashedError",
    "PlanMismatchError", "check_distributed_setup", "init_process_group",
]
