"""TRL's ``SFTTrainer`` with Hybrid Data Parallelism: :class:`HDPSFTTrainer`.

    from trl import SFTConfig
    from hf_hdp import HDPConfig
    from hf_hdp.integrations.trl import HDPSFTTrainer

    trainer = HDPSFTTrainer(model, SFTConfig(..., assistant_only_loss=True, packing=True),
                            train_dataset=chat_ds, processing_class=tokenizer,
                            hdp_config=HDPConfig(tokens_per_rank=8192, global_batch_size=64))
    trainer.train()

Why not ``class T(HDPTrainer, SFTTrainer)``: HDPTrainer's step, loss and evaluation come first in
that order, so SFTTrainer's ``compute_loss`` (its ``loss_type``, its ``entropy`` and
``mean_token_accuracy`` metrics) is silently bypassed, and SFTTrainer's fused LM head replaces the
model's forward; the other order trains with SFTTrainer's per-micro-batch loss and hangs in
evaluation. So HDPSFTTrainer *is* an :class:`~hf_hdp.trainer.HDPTrainer` and takes from SFTTrainer
exactly what HDP can honour, by running SFTTrainer's own code:

- **Everything SFTTrainer does before it builds its Trainer** runs unchanged: ``SFTConfig`` (a plain
  ``TrainingArguments`` is converted as SFTTrainer converts it), a model name loaded with
  ``model_init_kwargs``, the processing class, ``eos_token`` / ``pad_token``, ``chat_template_path``,
  ``peft_config``, the assistant-mask training chat template, and the dataset preparation
  (``formatting_func``, ChatML conversion, EOS, chat template, tokenization, ``assistant_only_loss``
  and ``completion_only_loss`` masks into ``labels`` = -100, ``max_length`` truncation, ``packing``
  with any ``packing_strategy``, ``shuffle_dataset``, ``dataset_kwargs``). It runs SFTTrainer's
  ``__init__`` in a subclass whose next ``__init__`` in the method order (where SFTTrainer hands
  over to ``Trainer``) records the arguments and stops, so no second Trainer, accelerator or fused
  head is ever built.
- **The tokenized dataset goes to HDP.** Its ``labels`` are HDP's labels (HDP shifts them inside
  each document); a packed row's ``seq_lengths`` (``packing_strategy="bfd"`` / ``"bfd_split"``)
  splits it into documents that HDP places as separate sequences, with no attention and no label
  across them, as SFTTrainer's padding-free path does; a ``"wrapped"`` row is one sequence, as it
  is in SFTTrainer. With ``remove_unused_columns=True`` only SFTTrainer's columns (``input_ids``,
  ``labels``, ``seq_lengths``) are kept, as stock does. SFTTrainer's own padding collator is not
  used (HDP never pads); a ``data_collator`` given by the user runs per sample, as under HDPTrainer.
- **The loss** is HDP's token-level loss over the global batch: ``loss_type="nll"`` is the chunked
  cross-entropy of HDPTrainer; ``loss_type="dft"`` (Dynamic Fine-Tuning) weights every token's
  cross-entropy by its own detached probability, ``-p.detach() * log p``, summed and divided by the
  global batch's label count exactly as SFTTrainer does, chunk by chunk (each chunk's logits are
  recomputed in backward, so the full logits never exist).
- **Metrics**: ``entropy`` and ``mean_token_accuracy`` are computed per label token (the entropy of
  the next-token distribution, whether the arg-max is the label) and summed over the whole global
  batch, all micro-batches and ranks, in one small all-reduce per step; a log shows the mean over the
  logged steps of each step's per-token figure, as SFTTrainer logs them with
  ``gradient_accumulation_steps=1``. ``num_tokens`` is the running count of trained tokens. In
  evaluation ``{prefix}_entropy`` / ``{prefix}_mean_token_accuracy`` are per token over the whole
  eval set (SFTTrainer averages per eval batch; equal with one batch).

Refused at construction (each message names the field and the fix): ``activation_offloading``
(HDP offloads with ``HDPConfig.offload_ratio``), ``gradient_checkpointing_kwargs={"selective": True}``,
a MoE router auxiliary loss (``router_aux_loss_coef`` not 0 on a model that returns router logits),
vision datasets, and everything HDPTrainer refuses (``label_smoothing_factor``, ``use_liger_kernel``,
``compute_metrics``, an ``IterableDataset``, ...). ``padding_free`` and ``pad_to_multiple_of`` only
change padding, which HDP never adds: the loss and gradients are those of stock either way.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hf_hdp.integrations.trl needs TRL: pip install 'hf-hdp[trl]' (or pip install 'trl>=1.0')"
    ) from err

from ..collators.documents import IGNORE_INDEX
from ..data.loader import HDPDataLoader
from ..engine.loss import chunked_cross_entropy, chunked_head, map_head_chunks
from ..trainer import HDPTrainer

logger = logging.getLogger(__name__)

#: the columns stock SFTTrainer keeps under ``remove_unused_columns=True`` (its ``_set_signature_columns_if_needed``)
SFT_COLUMNS = ("input_ids", "labels", "seq_lengths")
LOSS_TYPES = ("nll", "dft")


# --------------------------------------------------------------------------- SFTTrainer's preparation
class _Prepared(Exception):
    """Raised where SFTTrainer hands its prepared arguments to ``Trainer.__init__``; carries them."""

    def __init__(self, kwargs: dict):
        super().__init__("SFTTrainer preparation finished")
        self.kwargs = kwargs


class _StopAtTrainerInit(SFTTrainer.__bases__[0]):
    def __init__(self, *args, **kwargs):
        if args:
            raise TypeError("SFTTrainer called Trainer.__init__ with positional arguments; this TRL is not supported")
        raise _Prepared(kwargs)


class _SFTPreparation(SFTTrainer, _StopAtTrainerInit):
    """SFTTrainer's ``__init__`` up to ``Trainer.__init__``; keeps its tokenizer, chat template and masks
    settings for preparing eval datasets later (``_prepare_dataset``)."""


def _prepare(**kwargs) -> tuple[_SFTPreparation, dict]:
    prep = _SFTPreparation.__new__(_SFTPreparation)
    try:
        prep.__init__(**kwargs)
    except _Prepared as done:
        return prep, done.kwargs
    raise RuntimeError("SFTTrainer.__init__ returned without calling Trainer.__init__; this TRL is not supported")


def _refuse_config(args) -> None:
    """SFTConfig fields HDP cannot honour, before SFTTrainer's code acts on them."""
    if args is None:
        return
    if getattr(args, "activation_offloading", False):
        raise ValueError(
            "SFTConfig.activation_offloading=True is not supported by HDPSFTTrainer: HDP runs its own micro-batch "
            "step, and offloads activations itself. Set activation_offloading=False and use "
            "HDPConfig(offload_ratio=...) (a fraction of the decoder layers, or 'auto')."
        )
    if (getattr(args, "gradient_checkpointing_kwargs", None) or {}).get("selective"):
        raise ValueError(
            "SFTConfig.gradient_checkpointing_kwargs={'selective': True} (TRL's selective activation checkpointing) "
            "is not supported by HDPSFTTrainer: it is unverified with HDP's ring attention recomputation. Drop "
            "'selective' (plain gradient_checkpointing=True is supported)."
        )
    loss_type = getattr(args, "loss_type", "nll")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"SFTConfig.loss_type={loss_type!r} is not supported: use one of {list(LOSS_TYPES)}.")


def _refuse_prepared(prep: _SFTPreparation, args, model) -> None:
    """What SFTTrainer decided that HDP cannot honour."""
    if getattr(prep, "_is_vision_dataset", False):
        raise ValueError(
            "HDPSFTTrainer got a vision dataset ('image'/'images' column): HDP trains text-only causal LMs, and "
            "SFTTrainer does not pack vision samples either. Use the stock SFTTrainer for it."
        )
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    text_config = base.config.get_text_config()
    coef = getattr(args, "router_aux_loss_coef", None)
    coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if hasattr(text_config, "output_router_logits") and coef:
        raise ValueError(
            f"{type(base).__name__} adds a MoE load-balancing loss (router_aux_loss_coef={coef}), which HDP's "
            "token-level loss over packed, split sequences does not compute. Set SFTConfig(router_aux_loss_coef=0.0)."
        )
    if hasattr(text_config, "output_router_logits"):
        text_config.output_router_logits = False  # as SFTTrainer does with a coefficient of 0


def _sft_columns(dataset, args):
    """Stock's column removal: SFTTrainer keeps ``input_ids``, ``labels`` and ``seq_lengths``."""
    if dataset is None or not getattr(args, "remove_unused_columns", True):
        return dataset
    if isinstance(dataset, dict):
        return {k: _sft_columns(v, args) for k, v in dataset.items()}
    names = getattr(dataset, "column_names", None)
    if names is None or not hasattr(dataset, "select_columns"):
        return dataset
    return dataset.select_columns([c for c in SFT_COLUMNS if c in names])


# --------------------------------------------------------------------------- loss and metrics
def _token_figures(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[entropy sum, correct, count]`` of labelled rows: logits ``z`` [n, V] (float), targets ``t`` [n]."""
    z = z.detach()
    lse = torch.logsumexp(z, dim=-1)
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    correct = (z.argmax(-1) == t).sum()
    return torch.stack(
        [entropy.double().sum(), correct.double(), torch.tensor(float(t.numel()), dtype=torch.float64, device=z.device)]
    )


def _dft_terms(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DFT's summed loss of logits ``z`` [n, V] (float) against ``t``: every token's cross-entropy times its
    own detached probability, ``-p.detach() * log p``."""
    nll = torch.logsumexp(z, dim=-1) - z.gather(1, t[:, None])[:, 0]
    return (torch.exp(-nll).detach() * nll).sum()


def _chunked_terms(head, hidden, weight, bias, targets, chunk: int, loss_type: str):
    """``(summed loss, figures)`` from the final hidden states ``[T, H]``, ``chunk`` labelled rows at a time
    (the loss's logits are recomputed in backward, so the full logits never exist)."""

    def figures_of(h, w, b, t):
        return _token_figures(head.logits(h, w, b), t)

    def dft_and_figures(h, w, b, t):
        z = head.logits(h, w, b)
        return _dft_terms(z, t), _token_figures(z, t)

    if loss_type == "nll":
        loss = chunked_cross_entropy(hidden, weight, targets, bias, chunk_tokens=chunk, transform=head.transform)
        with torch.no_grad():
            figures = map_head_chunks(hidden, weight, bias, targets, figures_of, chunk_tokens=chunk)
    else:
        terms = map_head_chunks(hidden, weight, bias, targets, dft_and_figures, chunk_tokens=chunk)
        loss = torch.stack([dft for dft, _ in terms]).sum() if terms else hidden.sum() * 0.0  # no label: a connected 0
        figures = [f for _, f in terms]
    return loss, sum(figures, torch.zeros(3, dtype=torch.float64, device=hidden.device))


def _logits_terms(logits: torch.Tensor, targets: torch.Tensor, loss_type: str):
    """``(summed loss, figures)`` from full logits ``[T, V]`` and HDP's shifted targets ``[T]``."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    mask = targets != IGNORE_INDEX
    z, t = logits[mask], targets[mask]
    loss = _dft_terms(z, t) if loss_type == "dft" else F.cross_entropy(z, t, reduction="sum")
    return loss, _token_figures(z, t)


class HDPSFTTrainer(HDPTrainer):
    """TRL's ``SFTTrainer`` with Hybrid Data Parallelism (see the module docstring for what is honoured).

    Takes SFTTrainer's arguments plus ``hdp_config`` (:class:`~hf_hdp.HDPConfig`)."""

    _tag_names = ["trl", "sft", "hf_hdp"]

    def __init__(
        self,
        model=None,
        args: SFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        *,
        hdp_config=None,
    ):
        if model is None:
            raise ValueError("HDPSFTTrainer needs a model (a PreTrainedModel or a model name/path).")
        _refuse_config(args)
        prep, kw = _prepare(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        args = kw["args"]
        _refuse_prepared(prep, args, kw["model"])
        self._sft = prep
        self._sft_metrics = {"train": defaultdict(list)}
        self._sft_figures = None  # [entropy sum, correct, label tokens] of this rank since the last reset
        self._total_train_tokens = 0
        super().__init__(
            kw["model"],
            args,
            # SFTTrainer's own collator only pads (HDP never pads); a user's collator runs per sample
            data_collator=data_collator,
            train_dataset=_sft_columns(kw["train_dataset"], args),
            eval_dataset=_sft_columns(kw["eval_dataset"], args),
            processing_class=kw["processing_class"],
            compute_loss_func=kw["compute_loss_func"],
            compute_metrics=kw["compute_metrics"],
            callbacks=kw["callbacks"],
            optimizers=kw["optimizers"],
            optimizer_cls_and_kwargs=kw["optimizer_cls_and_kwargs"],
            preprocess_logits_for_metrics=kw["preprocess_logits_for_metrics"],
            hdp_config=hdp_config,
        )
        self.completion_only_loss = prep.completion_only_loss
        self.padding_free = True  # HDP's micro-batches are always padding-free
        if callable(getattr(self.model, "add_model_tags", None)):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFT's loss (``loss_type``) over the global batch's label count, and its per-token figures."""
        targets = inputs["labels"]
        if self.compute_loss_func is not None:  # HDPTrainer's path for it; the figures from its full logits
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            mask = targets[0] != IGNORE_INDEX
            logits = outputs.logits[0][mask]
            self._add_figures(
                _token_figures(
                    logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits, targets[0][mask]
                )
            )
            return (loss, outputs) if return_outputs else loss
        loss_type = self.args.loss_type
        model_inputs = dict(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            hdp_metadata=inputs["hdp_metadata"],
            use_cache=False,
        )
        chunk = self.hdp_config.loss_chunk_tokens
        head = chunked_head(model) if chunk is not None else None
        if head is not None:
            (loss_sum, figures), outputs = head.capture(
                model,
                lambda hidden, weight, bias: _chunked_terms(
                    head, hidden, weight, bias, targets.reshape(-1), chunk, loss_type
                ),
                **model_inputs,
            )
        else:
            outputs = model(**model_inputs)
            loss_sum, figures = _logits_terms(outputs.logits[0], targets[0], loss_type)
        self._add_figures(figures)
        loss = loss_sum / max(int(num_items_in_batch or 0), 1)
        return (loss, outputs) if return_outputs else loss

    def _add_figures(self, figures: torch.Tensor) -> None:
        self._sft_figures = figures if self._sft_figures is None else self._sft_figures + figures

    def _global_figures(self, what: str, step: int) -> tuple[float, float, float]:
        """This rank's figures since the last call, summed over all ranks (every rank calls it together)."""
        local = [0.0, 0.0, 0.0] if self._sft_figures is None else self._sft_figures.tolist()
        self._sft_figures = None
        entropy, correct, count = self.mesh.sum_scalars(local, what, step)
        return entropy, correct, count

    # ------------------------------------------------------------------ step and logs
    def training_step(self, model, inputs, num_items_in_batch=None):
        self._sft_figures = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = inputs["hdp_step"]
        entropy, correct, count = self._global_figures("SFT metrics (entropy, token accuracy)", step.global_step)
        metrics = self._sft_metrics["train"]
        metrics["entropy"].append(entropy / count if count > 0 else 0.0)
        metrics["mean_token_accuracy"].append(correct / count if count > 0 else 0.0)
        self._total_train_tokens += int(step.num_tokens)
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """The SFT figures of the steps since the last log (mean of per-step, per-token values), then HDP's."""
        metrics = self._sft_metrics["train"]
        if "loss" in logs and metrics:
            logs.update({key: sum(vals) / len(vals) for key, vals in metrics.items()})
            logs["num_tokens"] = self._total_train_tokens
            metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._sft_figures = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if isinstance(dataloader, HDPDataLoader):
            entropy, correct, count = self._global_figures("SFT eval metrics", self.state.global_step)
            output.metrics[f"{metric_key_prefix}_entropy"] = entropy / count if count > 0 else 0.0
            output.metrics[f"{metric_key_prefix}_mean_token_accuracy"] = correct / count if count > 0 else 0.0
            output.metrics[f"{metric_key_prefix}_num_tokens"] = self._total_train_tokens
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Trainer's evaluate; a dataset passed here is prepared by SFTTrainer's code first, as stock does."""
        if eval_dataset is not None and not isinstance(eval_dataset, str) and not self._sft._skip_prepare_dataset:
            args = self.args
            packing = args.packing if args.eval_packing is None else args.eval_packing

            def prepare(ds, name):
                return self._sft._prepare_dataset(
                    ds, self.processing_class, args, packing, self._sft._formatting_func, name
                )

            if isinstance(eval_dataset, dict):
                eval_dataset = {k: prepare(v, k) for k, v in eval_dataset.items()}
            else:
                eval_dataset = prepare(eval_dataset, "eval")
            eval_dataset = _sft_columns(eval_dataset, args)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


# TRL's RL trainers on HDP live in their own module (rollouts move between ranks): one import path for TRL users
from .rl import HDPGRPOTrainer, HDPRLOOTrainer  # noqa: E402

__all__ = ["HDPGRPOTrainer", "HDPRLOOTrainer", "HDPSFTTrainer", "SFT_COLUMNS"]
