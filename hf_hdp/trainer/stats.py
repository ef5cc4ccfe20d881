"""HDP's figures: totals for the run's summary, and a window between two logging steps.

Every logging step, :meth:`HDPStats.window_logs` adds ``hdp/`` scalars to the Trainer's normal logs
(console, TensorBoard, W&B, ...). Which ones is ``HDPConfig.log_keys``:

- ``"default"``, the figures a user watches (:data:`DEFAULT_LOG_KEYS`): ``hdp/tokens_per_s``
  (throughput), ``hdp/mfu_est`` (how much of the hardware that is; logged when the hardware peak is
  known, e.g. on a GPU the cost model knows), ``hdp/imbalance_est`` (the balance HDP exists for:
  the busiest rank's estimated work over the mean, 1.0 is perfect), ``hdp/p2p_bytes`` (what splitting
  long samples costs in communication), and ``hdp/offloaded_bytes`` when ``offload_ratio`` is set;
- ``"all"``: every figure below;
- a comma-separated string or a list of names (``"p2p_bytes,p2p_bytes_est"``, the ``hdp/`` prefix
  optional): exactly those. ``samples_k`` stands for every ``hdp/samples_k{k}``.

Every figure covers the whole window of steps since the last log, and a measured figure and its
estimate are aggregated alike (so with ``logging_steps > 1`` they can be compared):

- ``hdp/tokens_per_s``: tokens of the window's global batches over the wall time since the last log;
  ``hdp/mfu_est``: model FLOPs utilisation of that rate against the cost model's hardware peak;
- ``hdp/p2p_bytes`` / ``hdp/p2p_bytes_est``: P2P bytes all ranks sent per step, measured in the mesh
  (summed over ranks in the gradient collective) / the planner's estimate of the same plans, each the
  mean over the window's steps, rounded to a byte;
- ``hdp/imbalance_est``, ``hdp/step_time_est_s``: the cost model's estimates for each step's plan,
  mean over the window's steps;
- ``hdp/micro_batches_max`` / ``_min``: the most / fewest micro-batches a rank ran in one step of the window;
- ``hdp/samples_k{k}``: samples placed on a group of ``k`` ranks in the window (``k = 1``: ran whole
  on one rank), and ``hdp/max_group_size``: the largest group of the window;
- ``hdp/offloaded_bytes`` (with ``HDPConfig.offload_ratio``): bytes of saved activations this rank
  moved to host memory per step, mean over the window (:mod:`hf_hdp.engine.offload`; the same come
  back in backward).

``hdp/skipped_steps`` (global batches without a label token since the last log) is logged by
HDPTrainer whenever it is not 0, whatever ``log_keys`` says. Each step's own figures (measured and
estimated P2P bytes, imbalance, step time) are also kept in :attr:`HDPStats.history`, with the step's
epoch, index, dataset rows and plan fingerprint.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable

from ..planning import CostModel, plan_metrics

#: the figures logged by default (``HDPConfig.log_keys="default"``); ``hdp/mfu_est`` needs a known
#: hardware peak, ``hdp/offloaded_bytes`` an ``offload_ratio``
DEFAULT_LOG_KEYS = ("hdp/tokens_per_s", "hdp/mfu_est", "hdp/imbalance_est", "hdp/p2p_bytes", "hdp/offloaded_bytes")
#: every figure (``HDPConfig.log_keys="all"``); ``hdp/samples_k`` stands for each ``hdp/samples_k{k}``
ALL_LOG_KEYS = DEFAULT_LOG_KEYS + (
    "hdp/p2p_bytes_est",
    "hdp/step_time_est_s",
    "hdp/micro_batches_max",
    "hdp/micro_batches_min",
    "hdp/max_group_size",
    "hdp/samples_k",
)
_PER_STEP_MEAN = ("p2p_bytes", "p2p_bytes_est", "imbalance_est", "step_time_est_s")


def resolve_log_keys(log_keys: str | Iterable[str] = "default") -> frozenset[str]:
    """The ``hdp/...`` figures ``log_keys`` asks for (see the module); an unknown name is refused."""
    if log_keys == "default":
        return frozenset(DEFAULT_LOG_KEYS)
    if log_keys == "all":
        return frozenset(ALL_LOG_KEYS)
    names = log_keys.split(",") if isinstance(log_keys, str) else list(log_keys)
    keys = {n.strip() if n.strip().startswith("hdp/") else f"hdp/{n.strip()}" for n in names if str(n).strip()}
    unknown = sorted(keys - set(ALL_LOG_KEYS))
    if unknown or not keys:
        raise ValueError(
            f"HDPConfig.log_keys={log_keys!r}: {'unknown figures ' + str(unknown) if unknown else 'no figure named'}. "
            f"Use 'default', 'all', or a comma-separated list of {[k[len('hdp/') :] for k in ALL_LOG_KEYS]}."
        )
    return frozenset(keys)


def _family(key: str) -> str:
    """The log-key name that selects ``key``: ``hdp/samples_k`` for every ``hdp/samples_k{k}``."""
    return "hdp/samples_k" if key.startswith("hdp/samples_k") else key


class HDPStats:
    def __init__(self, world_size: int, log_keys: str | Iterable[str] = "default"):
        self.world_size = world_size
        self.log_keys = resolve_log_keys(log_keys)
        self.totals = {
            "steps": 0,
            "samples": 0,
            "tokens": 0,
            "local_samples": 0,
            "group_sizes": Counter(),
            "micro_batches": 0,
            "p2p_bytes": 0,
            "busy_s": 0.0,
        }
        # the last steps run: epoch, step, dataset rows, plan fingerprint (for audits and resume tests), and
        # the step's figures: p2p_bytes (measured, all ranks), p2p_bytes_est, imbalance_est, step_time_est_s
        self.history: deque[dict] = deque(maxlen=1000)
        self.offload = None  # the trainer's OffloadStats, when it offloads activations (track_offload)
        self._reset_window()

    def track_offload(self, stats) -> None:
        """Log ``hdp/offloaded_bytes`` from ``stats`` (an :class:`~hf_hdp.engine.offload.OffloadStats`)."""
        self.offload = stats
        self.window["offloaded_from"] = stats.bytes_to_host

    def _reset_window(self) -> None:
        self.window = {
            "steps": 0,
            "tokens": 0,
            "figures": [],
            "group_sizes": Counter(),
            "micro_batches": [],
            "started": time.perf_counter(),
            "offloaded_from": self.offload.bytes_to_host if self.offload is not None else 0,
        }

    def restart_window_if_empty(self) -> None:
        """Start the tokens/s window now if no step ran in it yet (after setup or a save)."""
        if not self.window["steps"]:
            self.window["started"] = time.perf_counter()

    def exclude_from_window(self, seconds: float) -> None:
        """Leave ``seconds`` of non-training time (an evaluation) out of the current window."""
        self.window["started"] = min(self.window["started"] + seconds, time.perf_counter())

    def record(
        self, step, global_step: int, busy_s: float, p2p_bytes: int, p2p_bytes_all_ranks: float, cost: CostModel
    ) -> None:
        """Count one step: ``p2p_bytes`` this rank sent, ``p2p_bytes_all_ranks`` all ranks sent; ``cost``
        estimates the step's plan."""
        sizes = step.plan.group_sizes()
        metrics = plan_metrics(step.plan, cost)
        figures = {
            "p2p_bytes": float(p2p_bytes_all_ranks),
            "p2p_bytes_est": float(metrics.p2p_bytes),
            "imbalance_est": float(metrics.imbalance),
            "step_time_est_s": float(metrics.step_time_s),
        }
        self.history.append(
            {
                "epoch": step.epoch,
                "step": step.step,
                "rows": step.rows,
                "plan": step.fingerprint,
                "global_step": global_step,
                **figures,
            }
        )
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
        w["figures"].append(figures)
        w["group_sizes"].update(sizes)
        w["micro_batches"] += metrics.micro_batches_per_rank

    def window_logs(self, num_params: int, peak_flops: float | None = None) -> dict:
        """The ``hdp/`` scalars chosen by ``log_keys`` for the Trainer's log since the last call; empty if
        no step ran. Starts the next window."""
        w = self.window
        if not w["steps"]:
            return {}
        elapsed = max(time.perf_counter() - w["started"], 1e-9)
        mean = {k: sum(f[k] for f in w["figures"]) / w["steps"] for k in _PER_STEP_MEAN}
        logs = {
            "hdp/tokens_per_s": round(w["tokens"] / elapsed, 1),
            "hdp/p2p_bytes": round(mean["p2p_bytes"]),
            "hdp/p2p_bytes_est": round(mean["p2p_bytes_est"]),
            "hdp/imbalance_est": round(mean["imbalance_est"], 4),
            "hdp/step_time_est_s": round(mean["step_time_est_s"], 6),
            "hdp/micro_batches_max": max(w["micro_batches"]),
            "hdp/micro_batches_min": min(w["micro_batches"]),
            "hdp/max_group_size": max(w["group_sizes"]),
        }
        if peak_flops:
            logs["hdp/mfu_est"] = round(6 * num_params * w["tokens"] / elapsed / (peak_flops * self.world_size), 5)
        for k, n in sorted(w["group_sizes"].items()):
            logs[f"hdp/samples_k{k}"] = n
        if self.offload is not None:
            logs["hdp/offloaded_bytes"] = round((self.offload.bytes_to_host - w["offloaded_from"]) / w["steps"])
        self._reset_window()
        return {k: v for k, v in logs.items() if _family(k) in self.log_keys}

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
