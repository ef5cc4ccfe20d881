"""HDP's figures: totals for the run's summary, and a window between two logging steps.

Every logging step, :meth:`HDPStats.window_logs` gives the Trainer's normal logs (console,
TensorBoard, W&B, ...) scalar entries under ``hdp/``:

- ``hdp/tokens_per_s``: tokens of the global batches over the wall time since the last log;
- ``hdp/p2p_bytes``: P2P bytes all ranks sent per step (measured in the mesh, summed over ranks
  in the gradient collective), and ``hdp/p2p_bytes_est``: the planner's estimate for the last step;
- ``hdp/imbalance_est``, ``hdp/step_time_est_s``: the cost model's estimate for the last step's plan;
- ``hdp/micro_batches_max`` / ``_min``: micro-batches per rank in the last step;
- ``hdp/samples_k{k}``: samples placed on a group of ``k`` ranks since the last log (``k = 1``: ran
  whole on one rank), and ``hdp/max_group_size``;
- ``hdp/mfu_est``: model FLOPs utilisation estimated from the cost model's hardware peak;
- ``hdp/offloaded_bytes`` (with ``HDPConfig.offload_ratio``): bytes of saved activations this rank
  moved to host memory per step (:mod:`hf_hdp.engine.offload`; the same come back in backward).
"""

from __future__ import annotations

import time
from collections import Counter, deque

from ..planning import CostModel, plan_metrics


class HDPStats:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.totals = {"steps": 0, "samples": 0, "tokens": 0, "local_samples": 0, "group_sizes": Counter(),
                       "micro_batches": 0, "p2p_bytes": 0, "busy_s": 0.0}
        # the last steps run: epoch, step, dataset rows, plan fingerprint (for audits and resume tests)
        self.history: deque[dict] = deque(maxlen=1000)
        self.offload = None  # the trainer's OffloadStats, when it offloads activations (track_offload)
        self._reset_window()

    def track_offload(self, stats) -> None:
        """Log ``hdp/offloaded_bytes`` from ``stats`` (an :class:`~hf_hdp.engine.offload.OffloadStats`)."""
        self.offload = stats
        self.window["offloaded_from"] = stats.bytes_to_host

    def _reset_window(self) -> None:
        self.window = {"steps": 0, "tokens": 0, "p2p_bytes": 0.0, "group_sizes": Counter(), "plan": None,
                       "started": time.perf_counter(),
                       "offloaded_from": self.offload.bytes_to_host if self.offload is not None else 0}

    def restart_window_if_empty(self) -> None:
        """Start the tokens/s window now if no step ran in it yet (after setup or a save)."""
        if not self.window["steps"]:
            self.window["started"] = time.perf_counter()

    def exclude_from_window(self, seconds: float) -> None:
        """Leave ``seconds`` of non-training time (an evaluation) out of the current window."""
        self.window["started"] = min(self.window["started"] + seconds, time.perf_counter())

    def record(self, step, global_step: int, busy_s: float, p2p_bytes: int, p2p_bytes_all_ranks: float) -> None:
        sizes = step.plan.group_sizes()
        self.history.append({"epoch": step.epoch, "step": step.step, "rows": step.rows, "plan": step.fingerprint,
                             "global_step": global_step})
        t = self.totals
        t["steps"] += 1
        t["samples"] += len(step.rows)
        t["tokens"] += step.num_tokens
        t["local_samples"] += sizes.get(1, 0)
        t["group_sizes"].update(sizes)
        t["micro_batches"] += len(step.micro_batches)
        t["p2p_bytes"] += p2p_bytes
        t["busy_s"] += busy_s
        w = self.window
        w["steps"] += 1
        w["tokens"] += step.num_tokens
        w["p2p_bytes"] += p2p_bytes_all_ranks
        w["group_sizes"].update(sizes)
        w["plan"] = step.plan

    def window_logs(self, cost: CostModel, num_params: int, peak_flops: float | None = None) -> dict:
        """Scalars for the Trainer's log since the last call; empty if no step ran."""
        w = self.window
        if not w["steps"]:
            return {}
        elapsed = max(time.perf_counter() - w["started"], 1e-9)
        metrics = plan_metrics(w["plan"], cost)
        logs = {
            "hdp/tokens_per_s": round(w["tokens"] / elapsed, 1),
            "hdp/p2p_bytes": round(w["p2p_bytes"] / w["steps"]),
            "hdp/p2p_bytes_est": round(metrics.p2p_bytes),
            "hdp/imbalance_est": round(metrics.imbalance, 4),
            "hdp/step_time_est_s": round(metrics.step_time_s, 6),
            "hdp/micro_batches_max": max(metrics.micro_batches_per_rank),
            "hdp/micro_batches_min": min(metrics.micro_batches_per_rank),
            "hdp/max_group_size": max(w["group_sizes"]),
        }
        if peak_flops:
            logs["hdp/mfu_est"] = round(6 * num_params * w["tokens"] / elapsed / (peak_flops * self.world_size), 5)
        for k, n in sorted(w["group_sizes"].items()):
            logs[f"hdp/samples_k{k}"] = n
        if self.offload is not None:
            logs["hdp/offloaded_bytes"] = round((self.offload.bytes_to_host - w["offloaded_from"]) / w["steps"])
        self._reset_window()
        return logs

    def summary(self) -> dict:
        """Totals over the steps run on this rank (group sizes count samples)."""
        t = self.totals
        return {
            "steps": t["steps"],
            "samples": t["samples"],
            "tokens": t["tokens"],
            "samples_on_one_rank": t["local_samples"],
            "group_sizes": dict(sorted(t["group_sizes"].items())),
            "micro_batches_this_rank": t["micro_batches"],
            "p2p_bytes_this_rank": t["p2p_bytes"],
            "busy_cpu_s_this_rank": round(t["busy_s"], 3),
            **({"offloaded_bytes_this_rank": self.offload.bytes_to_host} if self.offload is not None else {}),
        }
