"""HDPTrainer: a drop-in ``Trainer`` that trains with Hybrid Data Parallelism.

It changes these things through Trainer's override points, and nothing else:

- ``get_train_dataloader``: one item per optimizer step, holding only this rank's micro-batches of
  the step plan (see :mod:`hf_hdp.data.loader`).
- ``training_step``: one optimizer step of the step engine (:class:`~hf_hdp.engine.step.StepEngine`,
  shared with HDPAccelerator and HDPSFTTrainer): the plan check, this rank's micro-batches in slot
  order (ranks may run different numbers, zero included), the step's one gradient reduction (bounded
  buckets, or FSDP2's own under ``TrainingArguments.fsdp``, :mod:`hf_hdp.engine.fsdp`) and the label
  recount; the trainer adds the warning and the optimizer-step skip of a batch without labels, and
  its figures (:mod:`hf_hdp.trainer.stats`).
- ``create_optimizer``: applies FSDP2 first, when asked; then Trainer's optimizer, sharded at ZeRO
  stage 1 or 2 otherwise. ``save_model``: under FSDP2 the whole weights, gathered on every rank.
- ``compute_loss``: the token-level loss, sum of per-token losses over the global batch's label
  count, from labels the collator already shifted (or the user's ``compute_loss_func``).
- ``create_accelerator_and_postprocess``: Trainer's Accelerator setup, then an
  :class:`~hf_hdp.accelerator.HDPAccelerator` with its settings (model states replicated, no DDP wrapper)
  carrying the :class:`~hf_hdp.distributed.mesh.DynamicMesh`.
- ``get_eval_dataloader`` / ``evaluation_loop``: HDP evaluation, the eval set's per-token mean loss
  (see :mod:`hf_hdp.trainer.evaluation`); Trainer's own ``evaluate`` runs around them.
- ``create_optimizer`` also guards the optimizer's ``step``, so that a global batch without a
  single label token skips the optimizer step for real (see :meth:`HDPTrainer.training_step`).

Every other Trainer input is honoured or refused at construction (see :mod:`hf_hdp.trainer.inputs`
and the README's table): the data collator runs per sample, padding and pre-packed rows become
documents (:mod:`hf_hdp.collators.documents`), NEFTune runs per sample (:mod:`hf_hdp.trainer.neftune`).
HDPTrainer works on a copy of the user's ``TrainingArguments``. Gradient accumulation is HDP's own:
``gradient_accumulation_steps`` only feeds the default global batch size and is 1 in the copy.

PEFT and memory features need nothing more. A PEFT model trains its adapters only (the gradient
all-reduce takes the parameters that require a gradient). With gradient checkpointing
(``TrainingArguments(gradient_checkpointing=True)`` or ``model.gradient_checkpointing_enable()``)
each decoder layer's forward, ring attention and its P2P included, runs again inside backward.
Every member of a ring recomputes the same rings in the same order: a layer is recomputed when its
output's gradient is complete, which needs the backward of every later layer, so on every rank the
backward of a micro-batch is "recompute layer L (its ring segments in metadata order), then ring
backward of layer L", for L from the last layer down, in slot order. bf16/fp16 autocast comes from
accelerate as for Trainer; ring partial outputs and their merge stay in float32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..accelerator import HDPAccelerator
from ..collators.collator import HDPCollator
from ..collators.documents import HDPDataError
from ..config import HDPConfig
from ..data.checks import MeasuredDataset, prepare_dataset, progress_bars, require_map_style, rows_text
from ..data.columns import check_columns, row_rules
from ..data.loader import GlobalBatchSampler, HDPDataLoader
from ..distributed.launch import check_distributed_setup
from ..distributed.mesh import DynamicMesh
from ..engine.fsdp import (
    ZERO2,
    ZERO3,
    fsdp_errors,
    fsdp_mode,
    gather_for_eval,
    layer_classes,
    prepare_optimizer,
    release_after_eval,
    shard_model,
)
from ..engine.offload import ActivationOffloader, run_recomputes_layers
from ..engine.setup import enable_hdp_attention, hdp_cost_model, hdp_step_loader
from ..engine.state import MODEL, has_sharded, has_whole_weights, load_whole_weights
from ..engine.step import StepEngine, guard_step, hdp_loss
from ..engine.zero import shard_optimizer
from ..models import check_model_supported
from ..planning import CostModel
from ..planning.layers import kernel_head_dim
from ..training_args import hdp_config_from_args, warn_if_uniform_lengths
from .callbacks import HDPWindowCallback
from .capacity import resolve_tokens_per_rank
from .checkpoint import HDPCheckpointCallback, check_resume
from .evaluation import eval_dataloader, hdp_evaluation_loop, hdp_predict
from .inputs import check_metrics_arguments, check_step_methods, positional_arguments
from .neftune import PerSampleNEFTune
from .saving import finish_pending, load_scheduler, load_sharded_checkpoint, save_checkpoint, write_model_folder
from .stats import HDPStats

logger = logging.getLogger(__name__)


class HDPTrainer(Trainer):
    """``Trainer`` with Hybrid Data Parallelism. ``hdp_config`` may be omitted (defaults apply)."""

    def __init__(
        self, model=None, args: TrainingArguments | None = None, *pos, hdp_config: HDPConfig | None = None, **kwargs
    ):
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError(
                "HDPTrainer needs a model (model=...); model_init is not supported: HDP switches the model's attention "
                "and measures the data against it when the trainer is built. Build the model and pass model=."
            )
        kwargs.update(positional_arguments(pos))
        check_step_methods(type(self), HDPTrainer)
        self.hdp_config = hdp_config_from_args(args, hdp_config)  # HDPTrainingArguments carry one too
        # HDP changes a few fields for Trainer's loop: on its own copy, never on the user's object
        args = copy.deepcopy(args) if args is not None else TrainingArguments(output_dir="tmp_trainer")
        check_distributed_setup(args)
        world = args.world_size
        # FSDP2 is HDP's own (hf_hdp.engine.fsdp): read the mode, then take fsdp out of Trainer's hands
        self.hdp_fsdp = fsdp_mode(args, self.hdp_config.zero_stage)
        self.hdp_fsdp_modules: list = []  # filled when the model is sharded (create_optimizer)
        if self.hdp_fsdp is not None:
            self._fsdp_layers = layer_classes(model, getattr(args, "fsdp_config", None))  # refusals now, not at train()
            args.fsdp, args.fsdp_plugin_args = False, None
            if world == 1:
                logger.info(
                    "hf_hdp: fsdp=%r on one process: one shard is the whole model, so it trains unsharded.",
                    self.hdp_fsdp,
                )
        self.hdp_config.check_training_args(args)  # settings HDP contradicts or would silently ignore
        check_metrics_arguments(
            kwargs.get("compute_metrics"), kwargs.get("preprocess_logits_for_metrics"), args.prediction_loss_only, args
        )
        if self.hdp_config.global_batch_size is None:
            self.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        else:
            self.global_batch_size = self.hdp_config.global_batch_size
        # HDP runs every micro-batch of a step inside one training_step
        args.gradient_accumulation_steps = 1
        # NEFTune runs per sample (hf_hdp.trainer.neftune), not with Trainer's per-tensor hook
        self.hdp_neftune = PerSampleNEFTune(args.neftune_noise_alpha) if args.neftune_noise_alpha else None
        args.neftune_noise_alpha = None
        self.hdp_model = enable_hdp_attention(model, self.hdp_config.state_split)
        self.hdp_row_rules = row_rules(kwargs.get("data_collator"), self.hdp_model, args)
        super().__init__(model, args, **kwargs)
        config = self.hdp_model.config
        self.hdp_config.check_attention_backend(  # kernels that cannot run here fail now, not at the first forward
            self.args.device,
            self.hdp_model.dtype,
            mixed_precision=bool(self.args.bf16 or self.args.fp16),
            head_dim=kernel_head_dim(config),  # per layer (Gemma 4), q/k and v apart (MLA)
        )
        self.collator = HDPCollator(vocab_size=self.hdp_model.get_input_embeddings().num_embeddings)
        self.hdp_stats = HDPStats(self.mesh.world_size, self.hdp_config.log_keys)
        self._num_params = self.hdp_model.num_parameters()
        self.hdp_train_data: MeasuredDataset | None = None
        self._eval_measured: dict = {}  # dataset fingerprint -> MeasuredDataset
        self._skip_optimizer_step = False  # set by training_step, consumed by the optimizer's guarded step
        self._skipped_steps = 0  # since the last log
        # tokens_per_rank="auto": C from the memory budget, once, before the data is measured against it, into a
        # copy of the config (hf_hdp.trainer.capacity); offload_ratio: the activation offloader (.offload)
        self.hdp_capacity = None
        if self.hdp_config.tokens_per_rank == "auto":
            self.hdp_config, self.hdp_capacity = resolve_tokens_per_rank(
                self.hdp_config,
                self.hdp_model,
                self.args,
                self.mesh.world_size,
                fsdp=self.hdp_fsdp,
                loss_func=self.compute_loss_func,
            )
        self.hdp_offload = ActivationOffloader.from_config(self.hdp_config, cost_model=lambda: self.cost_model)
        if self.hdp_offload is not None:
            self.hdp_stats.track_offload(self.hdp_offload.stats)
        self.hdp_engine = StepEngine(
            self.mesh,
            self.hdp_config,
            backward=self.accelerator.backward,
            autocast=self.compute_loss_context_manager,
            offload=self.hdp_offload,
            collator=self.collator,
        )
        if self.train_dataset is not None:
            self.hdp_train_data = self._measure(self.train_dataset, "train_dataset")
            self.train_dataset = self.hdp_train_data.dataset
            if self.args.process_index == 0:  # equal blocks (run_clm's group_texts): nothing for HDP to balance
                warn_if_uniform_lengths(self.hdp_train_data.doc_lengths, logger)
        longest = [int(self.hdp_train_data.doc_lengths.max())] if self.hdp_train_data is not None else []
        longest += self._measure_eval_datasets()  # bad eval samples fail now, not at the first evaluation
        longest = max(longest) if longest else self.mesh.world_size * self.hdp_config.tokens_per_rank
        self.hdp_model_support = check_model_supported(self.hdp_model, longest)
        self.cost_model = self._make_cost_model()
        self.add_callback(HDPCheckpointCallback(self))
        self.add_callback(HDPWindowCallback(self.hdp_stats))

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's Accelerator setup, then an :class:`~hf_hdp.accelerator.HDPAccelerator` with its settings and the mesh."""
        super().create_accelerator_and_postprocess()
        self.mesh = DynamicMesh(device=self.args.device, p2p_timeout_s=self.hdp_config.p2p_timeout_s)
        self.accelerator = HDPAccelerator.like(self.accelerator, self.mesh)
        gather = self.accelerator.gather_for_metrics
        if "use_gather_object" in inspect.signature(gather).parameters:
            gather = functools.partial(gather, use_gather_object=self.args.eval_use_gather_object)
        self.gather_function = gather

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train, after checking that a checkpoint to resume from reproduces the same batches."""
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                path = get_last_checkpoint(self.args.output_dir)
                if path is None:
                    raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint")
            check_resume(self, path)
            resume_from_checkpoint = path
        if self.hdp_train_data is not None:
            cfg = self.hdp_config
            logger.info(
                "***** HDP *****\n  Global batch = %d samples per optimizer step (any world size; HDP accumulates "
                "its micro-batches itself, so Trainer's 'Gradient Accumulation steps = 1' and per-device batch "
                "below are its loop's settings, not the batch)\n  Planner = %s, tokens per rank C = %d, world = %d, "
                "attention backend = %s, attention split = %s, ranks per node = %d\n  Training rows = %d (%d documents, %d tokens, %d label tokens)",
                self.global_batch_size,
                cfg.planner,
                cfg.tokens_per_rank,
                self.mesh.world_size,
                cfg.attention_backend,
                cfg.attention_split,
                min(self.cost_model.ranks_per_node, self.mesh.world_size),
                len(self.hdp_train_data),
                self.hdp_train_data.doc_lengths.size,
                int(self.hdp_train_data.lengths.sum()),
                int(self.hdp_train_data.loss_tokens.sum()),
            )
        if self.hdp_neftune is not None:
            self.hdp_neftune.attach(self.hdp_model)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.hdp_neftune is not None:
                self.hdp_neftune.detach()

    def _make_cost_model(self) -> CostModel:
        """The cost model of this model on this hardware, for the balanced planner and the logged estimates."""
        cost, self._peak_flops = hdp_cost_model(
            self.hdp_model,
            self.hdp_config,
            self.args.device,
            bool(self.args.bf16 or self.args.fp16),
            run_recomputes_layers(self.args, self.hdp_model),
        )
        return cost

    # ------------------------------------------------------------------ data
    def _measure(self, dataset, what: str) -> MeasuredDataset:
        """The dataset measured for planning; refuses what HDP cannot plan, or would not honour."""
        cfg = self.hdp_config
        require_map_style(dataset, what)
        check_columns(dataset, self.hdp_row_rules, self.hdp_model, self.args, cfg.length_column, what)
        with (
            self.args.main_process_first(desc="hf_hdp: measuring sample lengths"),
            progress_bars(self.args.process_index == 0),
        ):
            # documents, lengths, label tokens, token types and id ranges (cached columns), empty samples,
            # the long-sample policy and the vocabulary range: every error names the user's row
            return prepare_dataset(dataset, cfg, self.mesh.world_size, self.collator.vocab_size, self.hdp_row_rules)

    def _measure_eval_dataset(self, dataset, name: str | None = None) -> MeasuredDataset:
        """Measured once per dataset (by its ``datasets`` fingerprint); an eval set without a label token is refused."""
        key = getattr(dataset, "_fingerprint", None) or id(dataset)
        if key not in self._eval_measured:
            what = "eval_dataset" if name is None else f"eval_dataset[{name!r}]"
            measured = self._measure(dataset, what)
            if not int(measured.loss_tokens.sum()):
                raise HDPDataError(
                    f"{what} has no label token (every label is -100, or every sample has one token), so its "
                    "per-token loss is undefined. Evaluate on samples with labels."
                )
            self._eval_measured[key] = measured
            self._eval_measured[getattr(measured.dataset, "_fingerprint", None) or id(measured.dataset)] = measured
        return self._eval_measured[key]

    def _measure_eval_datasets(self) -> list[int]:
        """Measure the eval set(s) given at construction; returns their longest document lengths."""
        if self.eval_dataset is None:
            return []
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = dict(self.eval_dataset)  # the measured sets replace the user's in a copy
        named = self.eval_dataset if isinstance(self.eval_dataset, dict) else {None: self.eval_dataset}
        longest = []
        for name, dataset in named.items():
            measured = self._measure_eval_dataset(dataset, name)
            if name is None:
                self.eval_dataset = measured.dataset
            else:
                self.eval_dataset[name] = measured.dataset
            longest.append(int(measured.doc_lengths.max()))
        return longest

    def get_train_dataloader(self) -> HDPDataLoader:
        if self.hdp_train_data is None:
            raise ValueError("HDPTrainer: training requires a train_dataset.")
        sampler = GlobalBatchSampler(
            len(self.hdp_train_data),
            self.global_batch_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            drop_last=self.args.dataloader_drop_last,
        )
        return self.hdp_step_loader(self.hdp_train_data, sampler)

    def hdp_step_loader(self, measured: MeasuredDataset, sampler: GlobalBatchSampler) -> HDPDataLoader:
        """A loader of this rank's HDP steps over ``measured``, planned with this trainer's planner and cost model."""
        return hdp_step_loader(
            measured,
            sampler,
            self.hdp_config,
            self.cost_model,
            self.mesh.world_size,
            self.mesh.rank,
            self.collator,
            self.hdp_model,
            num_workers=self.args.dataloader_num_workers,
            lockstep=self.hdp_fsdp == ZERO3 and self.mesh.world_size > 1,
        )

    def get_eval_dataloader(self, eval_dataset=None) -> HDPDataLoader:
        """The eval set planned in unshuffled global batches (see :mod:`hf_hdp.trainer.evaluation`)."""
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("HDPTrainer: evaluation requires an eval_dataset.")
        name = eval_dataset if isinstance(eval_dataset, str) else None
        if name is not None:
            eval_dataset = self.eval_dataset[name]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        return eval_dataloader(self, self._measure_eval_dataset(eval_dataset, name))

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """HDP's forward-only loop for HDP eval loaders: ``{prefix}_loss`` is the eval set's per-token mean loss,
        and per-sample predictions and ``compute_metrics`` unless ``prediction_loss_only`` (see
        :mod:`hf_hdp.trainer.evaluation`)."""
        if isinstance(dataloader, HDPDataLoader):
            gather = self.hdp_fsdp == ZERO2 and bool(self.hdp_fsdp_modules)
            # FSDP's collectives in evaluation fail as the mesh's do (naming rank, collective and step)
            with fsdp_errors(self.mesh, self.state.global_step) if self.hdp_fsdp_modules else contextlib.nullcontext():
                if gather:
                    gather_for_eval(self.hdp_fsdp_modules)  # ZeRO-2 mode: no collective between micro-batches
                try:
                    return hdp_evaluation_loop(self, dataloader, metric_key_prefix, prediction_loss_only, description)
                finally:
                    if gather:
                        release_after_eval(self.hdp_fsdp_modules)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        """Trainer's ``predict`` on HDP's evaluation: ``PredictionOutput(predictions, label_ids, metrics)`` with
        one row per sample in dataset order, padded with -100 (see :mod:`hf_hdp.trainer.evaluation`)."""
        return hdp_predict(self, test_dataset, ignore_keys, metric_key_prefix)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Trainer's ``save_model``; with a sharded (FSDP) model, a transformers folder streamed one tensor at
        a time (a collective: Trainer calls this on every rank; :func:`~hf_hdp.trainer.saving.write_model_folder`),
        loadable with ``from_pretrained`` anywhere."""
        if not self.hdp_fsdp_modules:
            return super().save_model(output_dir, _internal_call)
        write_model_folder(self, output_dir or self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # ------------------------------------------------------------------ checkpoints (hf_hdp.trainer.saving)
    def _save_checkpoint(self, model, trial):
        """Overridden because Trainer's writes into ``checkpoint-N`` directly and gathers a sharded optimizer's
        state on one rank: here every rank writes its shards under ``tmp-checkpoint-N``, renamed when all are done."""
        save_checkpoint(self, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Overridden because Trainer's finds no weights in a checkpoint whose weights are sharded (FSDP2,
        ``SHARDED_STATE_DICT``): those load after the model is sharded, in :meth:`_load_optimizer_and_scheduler`."""
        if not has_whole_weights(resume_from_checkpoint) and has_sharded(resume_from_checkpoint, MODEL):
            self._hdp_sharded_weights = resume_from_checkpoint
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Overridden because Trainer's loads one whole ``optimizer.pt`` on every rank: a sharded checkpoint is
        read by each rank for what it updates now (any world size, ZeRO or FSDP). A full-state checkpoint
        (``optimizer.pt``) still loads through Trainer's."""
        if checkpoint is None or not has_sharded(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        weights = getattr(self, "_hdp_sharded_weights", None) == checkpoint
        self._hdp_sharded_weights = None
        load_sharded_checkpoint(self, checkpoint, weights=weights)
        load_scheduler(self, checkpoint)

    def _load_best_model(self):
        """Overridden because Trainer's reads whole weights into an unsharded model: under FSDP2 each rank
        loads its shards (from the sharded part, or from safetensors one tensor at a time)."""
        self.hdp_finish_checkpoint()
        best = self.state.best_model_checkpoint
        if has_sharded(best, MODEL):
            logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
            load_sharded_checkpoint(self, best, weights=True, optimizer=False)
        elif self.hdp_fsdp_modules:
            logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
            load_whole_weights(self.model, best)
        else:
            super()._load_best_model()

    def hdp_finish_checkpoint(self) -> None:
        """Wait for an asynchronous checkpoint save and publish it (every rank; nothing pending: no-op)."""
        finish_pending(self)

    def get_total_train_batch_size(self, args) -> int:
        """Samples per optimizer step: HDP's global batch, whatever the world size."""
        return self.global_batch_size

    def num_examples(self, dataloader) -> int:
        if isinstance(dataloader, HDPDataLoader):
            return dataloader.dataset.sampler.num_samples
        return super().num_examples(dataloader)

    # ------------------------------------------------------------------ step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token-level loss: this micro-batch's summed token losses over the global batch's label count.

        A ``compute_loss_func`` given to the trainer is honoured here (see :func:`~hf_hdp.engine.step.hdp_loss`);
        otherwise the LM head and the loss run in chunks of ``HDPConfig.loss_chunk_tokens`` tokens
        (:mod:`hf_hdp.engine.loss`), never building the full ``[T, vocab]`` logits."""
        return hdp_loss(
            model,
            inputs,
            num_items_in_batch or 0,
            return_outputs=return_outputs,
            loss_func=self.compute_loss_func,
            chunk_tokens=self.hdp_config.loss_chunk_tokens,
        )

    def create_optimizer(self, model=None):
        """Trainer's optimizer (its class, settings and parameter groups), sharded over the ranks at ZeRO
        stage 1 or 2 (``HDPConfig.zero_stage``, see :mod:`hf_hdp.engine.zero`), with its ``step``
        guarded so that HDP can skip one step (see :meth:`training_step`)."""
        built_by_trainer = self.optimizer is None
        if self.hdp_fsdp is not None and self.mesh.world_size > 1 and built_by_trainer:
            # after Trainer loaded a checkpoint to resume from into the whole model (hf_hdp.engine.fsdp)
            self.hdp_fsdp_modules = shard_model(
                self.model, self._fsdp_layers, self.hdp_fsdp, self.args.device, timeout_s=self.hdp_config.p2p_timeout_s
            )
            self.hdp_engine.fsdp_mode, self.hdp_engine.fsdp_modules = self.hdp_fsdp, self.hdp_fsdp_modules
        optimizer = super().create_optimizer(model)
        if self.hdp_fsdp_modules:
            prepare_optimizer(optimizer)  # its state is sharded like the parameters; full in checkpoints
        else:
            optimizer = self.optimizer = shard_optimizer(
                optimizer, self.mesh, self.hdp_config.zero_stage, self.args, built_by_trainer=built_by_trainer
            )
        guard_step(optimizer, self._consume_skip)
        return optimizer

    def _consume_skip(self) -> bool:
        skip, self._skip_optimizer_step = self._skip_optimizer_step, False
        return skip

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Run this rank's micro-batches of the step, then the step's one (bucketed) gradient reduction.

        A global batch without a single label token (every label -100) has no loss to train on. All
        ranks know it from the plan (the count is global), so all of them skip the forward, the
        backward and the all-reduce, leave every gradient ``None`` and report a loss of 0 (no NaN);
        the optimizer's guarded ``step`` (see :meth:`create_optimizer`) then returns without touching
        the weights or the optimizer state. A zero gradient would not do: AdamW still moves the
        weights through its momentum and weight decay. The learning-rate schedule and ``global_step``
        advance as for any step.
        """
        step = inputs["hdp_step"]
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()  # schedule-free optimizers, as in Trainer.training_step
        result = self.hdp_engine.run(model, step, self.compute_loss, [self.optimizer])
        if result.skipped:
            logger.warning(
                "global step %d (step %d of epoch %d, dataset rows %s): the global batch has no label token (every "
                "label is -100), so the optimizer step was skipped: weights and optimizer state are unchanged and "
                "the step's loss is logged as 0.",
                step.global_step,
                step.step,
                step.epoch,
                rows_text(step.rows, 8),
            )
            self._skip_optimizer_step = True
            self._skipped_steps += 1
        self.hdp_stats.record(
            step, self.state.global_step + 1, result.cpu_s, result.bytes_sent, result.bytes_sent_all, self.cost_model
        )
        return torch.tensor(result.loss, dtype=torch.float32, device=self.args.device)

    def floating_point_ops(self, inputs) -> int:
        step = inputs["hdp_step"]
        return 6 * step.local_tokens * self.hdp_model.num_parameters(only_trainable=False)

    # --------------------------------------------------------------- figures
    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Trainer.log, with HDP's figures (see :mod:`hf_hdp.trainer.stats`) beside each training loss."""
        if "loss" in logs:
            logs.update(self.hdp_stats.window_logs(self._num_params, self._peak_flops))
            if self._skipped_steps:
                logs["hdp/skipped_steps"] = self._skipped_steps  # global batches without a label token
                self._skipped_steps = 0
        super().log(logs, start_time)

    @property
    def hdp_history(self):
        return self.hdp_stats.history

    def hdp_summary(self) -> dict:
        """Totals over the steps this trainer ran on this rank (group sizes count samples)."""
        return self.hdp_stats.summary()
