"""Trainer callbacks of HDPTrainer.

HDP's figures themselves reach the Trainer's reporting (console, TensorBoard, W&B, ...) through
:meth:`HDPTrainer.log <hf_hdp.trainer.trainer.HDPTrainer.log>`, which adds the ``hdp/...`` scalars
of :mod:`hf_hdp.trainer.stats` to every training log *before* Trainer appends it to
``state.log_history`` and hands it to the reporting callbacks. A callback could not do that part:
``on_log`` runs after the log history is written, and after the integrations registered first.

What a callback does do is keep the wall-clock window of those figures honest.
``hdp/tokens_per_s`` and ``hdp/mfu_est`` divide the tokens trained since the last log by the
wall time since then, and that window would otherwise also hold

- the setup before the first step (the window opens when the trainer is built), and
- every evaluation and checkpoint save run between two logs.

:class:`HDPWindowCallback` takes them out: it opens the window when training begins, moves its
start past each evaluation (by the ``eval_runtime`` Trainer measured), and reopens a window that
has no step yet after a save.
"""

from __future__ import annotations

from transformers import TrainerCallback


class HDPWindowCallback(TrainerCallback):
    """Keeps setup, evaluation and checkpoint time out of HDP's tokens/s and MFU windows."""

    def __init__(self, stats):
        self.stats = stats

    def on_train_begin(self, args, state, control, **kwargs):
        self.stats.restart_window_if_empty()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        runtime = next((v for k, v in (metrics or {}).items() if k.endswith("_runtime")), None)
        if runtime:
            self.stats.exclude_from_window(float(runtime))

    def on_save(self, args, state, control, **kwargs):
        self.stats.restart_window_if_empty()
