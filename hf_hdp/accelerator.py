"""The dynamic-mesh accelerator plugin: an :class:`accelerate.Accelerator` that carries HDP's mesh.

HDP synchronises gradients itself, once per step and in the same bucketed collectives on every
rank however many micro-batches each ran (:class:`~hf_hdp.distributed.mesh.DynamicMesh`), so the Accelerator
must not wrap the model in DDP (whose per-backward reduction would hang when ranks run different
micro-batch counts, and whose bucket memory would be wasted). :class:`HDPAccelerator` places the
model and applies mixed precision without the wrapper, makes ``no_sync`` a no-op, and takes the norm
of the whole gradient for clipping when each rank holds only a shard of it (ZeRO stage 2).
HDPTrainer builds one from the Accelerator Trainer configured (:meth:`HDPAccelerator.like`).

A custom accelerate loop uses it directly (``examples/custom_loop.py``)::

    accelerator = HDPAccelerator(hdp_config=HDPConfig(tokens_per_rank=8192, global_batch_size=64),
                                 mixed_precision="bf16")
    model, optimizer = accelerator.prepare(model, optimizer)  # no DDP; the "hdp" attention switched on
    for batch in accelerator.hdp_steps(dataset):              # this rank's planned HDP steps
        loss = accelerator.hdp_backward(model, batch)         # micro-batches + the one gradient reduction
        optimizer.step()
        optimizer.zero_grad()

It starts the process group itself under ``torchrun`` (:func:`~hf_hdp.distributed.launch.init_process_group`;
gloo on the CPU, NCCL on GPUs) and builds the mesh on it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from torch.distributed.tensor import DTensor

from .collators.collator import HDPCollator
from .config import HDPConfig, check_global_batch_size
from .data.checks import prepare_dataset, progress_bars, require_map_style
from .data.columns import check_columns, row_rules
from .data.loader import GlobalBatchSampler, HDPStep
from .distributed.launch import init_process_group
from .distributed.mesh import DynamicMesh
from .engine.offload import ActivationOffloader, is_checkpointing
from .engine.setup import enable_hdp_attention, hdp_cost_model, hdp_step_loader, refuse_wrapped
from .engine.step import StepEngine, hdp_loss
from .engine.zero import shard_optimizer
from .models import check_model_supported, hdp_base_model
from .planning.layers import kernel_head_dim


class HDPAccelerator(Accelerator):
    """An :class:`accelerate.Accelerator` for HDP: replicated model states, no DDP wrapper, carrying the mesh.

    ``hdp_config``: the HDP settings of a custom loop (planner, ``tokens_per_rank``, ``global_batch_size``,
    attention backend, ZeRO stage, ...; default ``HDPConfig()``). ``mesh``: a
    :class:`~hf_hdp.distributed.mesh.DynamicMesh` to use; by default one is built over the global process group,
    which is initialised first under ``torchrun`` if nobody did (on a machine without CUDA the
    Accelerator then runs on the CPU, ``cpu=True``). Every other argument is accelerate's.

    Custom-loop API: :meth:`prepare` (the model: no wrapper, ``"hdp"`` attention; the optimizer:
    sharded at ``hdp_config.zero_stage``), :meth:`hdp_steps` (this rank's planned steps of a
    dataset) and :meth:`hdp_backward` (one step's micro-batches and its one gradient reduction).

    Gradients are reduced by :meth:`DynamicMesh.reduce_gradients`, once per optimizer step; after a
    reduction that left each rank only its shard's gradients (ZeRO stage 2), :meth:`clip_grad_norm_`
    takes the norm of the whole gradient over all ranks. HDPTrainer builds one in its
    ``create_accelerator_and_postprocess`` from the Accelerator that Trainer configured (:meth:`like`).
    """

    def __init__(self, *args, hdp_config: HDPConfig | None = None, mesh: DynamicMesh | None = None, **kwargs):
        if hdp_config is not None and not isinstance(hdp_config, HDPConfig):
            raise TypeError(
                f"HDPAccelerator(hdp_config=...) takes an hf_hdp.HDPConfig, got {type(hdp_config).__name__}"
            )
        self.hdp_config = hdp_config if hdp_config is not None else HDPConfig()
        if self.hdp_config.tokens_per_rank == "auto":
            raise ValueError(
                "HDPAccelerator needs an integer HDPConfig.tokens_per_rank; 'auto' is resolved by HDPTrainer from its "
                "TrainingArguments. Give the capacity (hf_hdp.planning.tokens_per_rank_for_memory estimates one)."
            )
        accum = kwargs.get("gradient_accumulation_steps", 1)
        plugin = kwargs.get("gradient_accumulation_plugin")
        if plugin is not None:
            accum = getattr(plugin, "num_steps", accum)
        if (hdp_config is not None or mesh is None) and accum not in (None, 1):
            raise ValueError(
                f"HDPAccelerator(gradient_accumulation_steps={accum}): HDP accumulates a step's micro-batches itself "
                "(hdp_backward runs all of them and reduces once), so accelerate's accumulation would skip optimizer "
                "steps HDP has already reduced for. Leave it at 1 and set HDPConfig.global_batch_size to the samples "
                "per optimizer step."
            )
        self._mesh_problem = None
        # HDPTrainer (like()) switched the attention and checked the backend against its own config at construction
        self._custom_loop = hdp_config is not None or mesh is None
        if mesh is None:
            env_world = _env_world_size()
            init_process_group()  # under torchrun, if nobody did: restart-safe (hf_hdp.distributed.launch)
            problem = _group_problem(env_world)
            if problem is not None:
                raise RuntimeError(f"HDPAccelerator: {problem}.")
            if env_world > 1 and "cpu" not in kwargs and not torch.cuda.is_available():
                kwargs["cpu"] = True  # accelerate counts the gloo ranks only with cpu=True
        super().__init__(*args, **kwargs)
        if mesh is None:
            mesh = self._build_mesh()
        self.mesh = mesh
        self._hdp_models: list = []  # the models prepare() switched to the "hdp" attention
        self._hdp_cost = None
        self._hdp_engine = None  # the step engine (hf_hdp.engine.step), built at the first hdp_backward

    def _build_mesh(self) -> DynamicMesh | None:
        self._mesh_problem = _group_problem(_env_world_size())
        if self._mesh_problem is not None:
            return None
        device = self.device
        if device.type == "cpu":
            device = torch.device("cpu")
        return DynamicMesh(device=device, p2p_timeout_s=self.hdp_config.p2p_timeout_s)

    @classmethod
    def like(cls, accelerator: Accelerator, mesh: DynamicMesh) -> HDPAccelerator:
        """An HDPAccelerator with ``accelerator``'s settings (precision, dataloader and accumulation
        configuration, handlers, dynamo plugin); the process state is shared, as for any Accelerator."""
        handlers = [
            h
            for h in (
                accelerator.ddp_handler,
                accelerator.scaler_handler,
                accelerator.init_handler,
                accelerator.autocast_handler,
            )
            if h is not None
        ]
        return cls(
            mixed_precision=accelerator.state.mixed_precision,
            dataloader_config=accelerator.dataloader_config,
            gradient_accumulation_plugin=GradientAccumulationPlugin(**accelerator.gradient_state.plugin_kwargs),
            step_scheduler_with_optimizer=accelerator.step_scheduler_with_optimizer,
            kwargs_handlers=handlers or None,
            dynamo_plugin=accelerator.state.dynamo_plugin,
            rng_types=accelerator.rng_types,
            mesh=mesh,
        )

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        """accelerate's ``prepare_model`` without the DDP wrapper (device placement and mixed precision
        only), after switching the model (or the model inside a PEFT wrapper) to the ``"hdp"`` attention.
        A model already wrapped in DDP (or DataParallel, or anything that is not a transformers model or a
        PEFT wrapper of one) is refused."""

        refuse_wrapped(model, "HDPAccelerator.prepare")
        if self._custom_loop:
            base = enable_hdp_attention(
                model, self.hdp_config.state_split
            )  # UnsupportedModelError names what the model lacks
            config = base.config
            self.hdp_config.check_attention_backend(  # kernels that cannot run here fail now, not at the first forward
                self.device,
                base.dtype,
                mixed_precision=self.mixed_precision in ("bf16", "fp16"),
                head_dim=kernel_head_dim(config),  # per layer (Gemma 4), q/k and v apart (MLA)
            )
        # evaluation_mode=True places the model and applies mixed precision without the DDP wrapper
        prepared = super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        if all(m is not prepared for m in self._hdp_models):
            self._hdp_models.append(prepared)
        self._hdp_cost = None
        return prepared

    def prepare_optimizer(self, optimizer, device_placement=None):
        """accelerate's ``prepare_optimizer``; on several ranks, first sharded at ``hdp_config.zero_stage``
        (ZeRO 1 by default, :mod:`hf_hdp.engine.zero`; ``zero_stage=0`` keeps it whole). Its ``step()`` is
        then a collective: call it on every rank after :meth:`hdp_backward`."""
        if (
            self._custom_loop
            and self.mesh is not None
            and self.mesh.world_size > 1
            and isinstance(optimizer, torch.optim.Optimizer)
        ):  # HDPTrainer shards its optimizer itself
            args = SimpleNamespace(optim="", fp16=self.mixed_precision == "fp16")
            optimizer = shard_optimizer(optimizer, self.mesh, self.hdp_config.zero_stage, args)
        return super().prepare_optimizer(optimizer, device_placement=device_placement)

    def prepare_scheduler(self, scheduler):
        """accelerate's ``prepare_scheduler``, stepping the scheduler ONCE per optimizer step. accelerate steps a
        prepared scheduler once per process, since its global batch is the per-process batch times the world size;
        HDP's global batch (``global_batch_size`` samples) does not depend on the world size, so a schedule written
        in optimizer steps must advance by one step per step on any number of ranks."""
        prepared = super().prepare_scheduler(scheduler)
        prepared.split_batches = True  # accelerate's "one scheduler step per training step"
        return prepared

    # ------------------------------------------------------------ custom loops
    def _require_mesh(self, what: str) -> DynamicMesh:
        if self.mesh is None:
            raise RuntimeError(f"HDPAccelerator.{what}: no dynamic mesh: {self._mesh_problem or 'mesh=None'}.")
        return self.mesh

    def _hdp_model(self, model=None, what: str = "hdp_steps"):
        """The prepared model ``model`` (or the one prepared model), refusing one prepare() never saw."""

        if model is not None:
            refuse_wrapped(model, f"HDPAccelerator.{what}")
            if any(m is model for m in self._hdp_models):
                return model
            raise ValueError(
                f"HDPAccelerator.{what}: this {type(model).__name__} was not prepared by this accelerator, so it may "
                "not run the 'hdp' attention or sit on the right device. Call `model = accelerator.prepare(model)` "
                "(or `model, optimizer = accelerator.prepare(model, optimizer)`) first, and pass the model it returns."
            )
        if len(self._hdp_models) == 1:
            return self._hdp_models[0]
        raise ValueError(
            f"HDPAccelerator.{what}: "
            + (
                "no model was prepared; call `model = accelerator.prepare(model)` first"
                if not self._hdp_models
                else f"{len(self._hdp_models)} models were prepared; pass model="
            )
        )

    def hdp_cost_model(self, model=None):
        """The balanced planner's cost model of the prepared model (:func:`~hf_hdp.engine.step.hdp_cost_model`)."""
        model = self._hdp_model(model, "hdp_cost_model")
        if self._hdp_cost is None or self._hdp_cost[0] is not model:
            base = hdp_base_model(model)
            cost, _ = hdp_cost_model(
                base, self.hdp_config, self.device, self.mixed_precision in ("bf16", "fp16"), is_checkpointing(base)
            )
            self._hdp_cost = (model, cost)
        return self._hdp_cost[1]

    def hdp_steps(
        self,
        dataset,
        global_batch_size: int | None = None,
        *,
        model=None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        data_collator=None,
        num_workers: int = 0,
    ):
        """This rank's HDP steps over ``dataset``: an :class:`~hf_hdp.data.loader.HDPDataLoader` of
        ``{"hdp_step": HDPStep, ...}`` items, one per optimizer step (call ``.set_epoch(epoch)`` per epoch).

        ``dataset``: a tokenized map-style ``datasets.Dataset`` (``input_ids``, optional ``labels``,
        ``attention_mask`` padding and ``position_ids`` packing, as for HDPTrainer). It is measured and
        checked once (every error names a row; ``hdp_config.long_sample_policy``), then each global
        batch of ``global_batch_size`` rows (default ``hdp_config.global_batch_size``), drawn in an
        order that depends on ``seed`` and the epoch only, never the world size, is planned with
        ``hdp_config.planner`` (balanced by default) and the prepared model's cost model
        (:meth:`hdp_cost_model`). ``data_collator``: a per-sample collator, run as HDPTrainer runs one.
        Call :meth:`prepare` on the model first.
        """
        mesh = self._require_mesh("hdp_steps")
        model = self._hdp_model(model, "hdp_steps")
        cfg = self.hdp_config
        batch = check_global_batch_size(
            global_batch_size if global_batch_size is not None else cfg.global_batch_size,
            "HDPAccelerator.hdp_steps",
            fix="pass global_batch_size= or set HDPConfig.global_batch_size",
        )
        base = hdp_base_model(model)
        require_map_style(dataset, "the dataset of hdp_steps")
        args = SimpleNamespace(remove_unused_columns=True, label_names=None)  # what stock Trainer hands the model
        rules = row_rules(data_collator, base, args)
        check_columns(dataset, rules, base, args, cfg.length_column, "the dataset of hdp_steps")
        collator = HDPCollator(vocab_size=base.get_input_embeddings().num_embeddings)
        with self.main_process_first(), progress_bars(mesh.rank == 0):  # measuring may write datasets cache files
            measured = prepare_dataset(dataset, cfg, mesh.world_size, collator.vocab_size, rules)
        check_model_supported(base, int(measured.doc_lengths.max()))
        sampler = GlobalBatchSampler(len(measured), batch, seed=seed, shuffle=shuffle, drop_last=drop_last)
        return hdp_step_loader(
            measured,
            sampler,
            cfg,
            self.hdp_cost_model(model),
            mesh.world_size,
            mesh.rank,
            collator,
            base,
            num_workers=num_workers,
        )

    def hdp_backward(self, model, step, optimizer=None) -> float:
        """Run one HDP step of this rank: its micro-batches in slot order, then the step's one gradient reduction.

        ``step``: an item of :meth:`hdp_steps` (or its ``HDPStep``). Each micro-batch runs through the
        ``"hdp"`` attention with the mesh and ``hdp_config.attention_backend`` bound; its summed token
        losses are divided by the label-token count of the whole global batch and backpropagated
        (:meth:`backward`: mixed precision's loss scaling applies). Then every rank, also one with no
        micro-batch, joins the same bucketed gradient reduction once, after which every rank holds the
        gradient one device computes on the whole global batch (at ZeRO stage 2 its shard of it): call
        ``optimizer.step()`` on every rank next. A global batch without a label token leaves every
        gradient ``None`` (torch optimizers then skip every parameter). Returns the step's loss, the same
        float on every rank. ``optimizer``: only needed when several optimizers were prepared (ZeRO 2).
        """
        refuse_wrapped(model, "HDPAccelerator.hdp_backward")
        mesh = self._require_mesh("hdp_backward")
        model = self._hdp_model(model, "hdp_backward")
        if isinstance(step, dict) and isinstance(step.get("hdp_step"), HDPStep):
            step = step["hdp_step"]
        if not isinstance(step, HDPStep):
            raise TypeError(
                f"HDPAccelerator.hdp_backward takes an item of accelerator.hdp_steps(dataset) (or its HDPStep), got "
                f"{type(step).__name__}: HDP steps are planned for all ranks together, not batches of a DataLoader."
            )
        cfg = self.hdp_config
        if self._hdp_engine is None:
            offload = None
            if cfg.offload_ratio != 0:
                offload = ActivationOffloader.from_config(cfg, cost_model=lambda: self.hdp_cost_model(model))
            self._hdp_engine = StepEngine(mesh, cfg, backward=self.backward, autocast=self.autocast, offload=offload)
        loss_fn = functools.partial(hdp_loss, chunk_tokens=cfg.loss_chunk_tokens)
        return self._hdp_engine.run(
            model, step, loss_fn, [optimizer] if optimizer is not None else self._optimizers
        ).loss

    def no_sync(self, model):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """accelerate's ``clip_grad_norm_``; with sharded gradients, the norm of the whole gradient.

        After a ZeRO stage 2 reduction (or FSDP's) each rank holds only its shard's gradients, so a local norm
        would differ per rank and clip each shard differently. Then each rank's norm over its own
        gradients is combined over all ranks (:meth:`DynamicMesh.total_norm`, one bounded all-reduce)
        into the norm of the full gradient, the same float on every rank, and every shard is scaled
        as ``torch.nn.utils.clip_grad_norm_`` scales a whole gradient. Returns that norm.
        """
        mesh = self.mesh
        if mesh is None or not mesh.gradients_sharded:
            return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
        self.unscale_gradients()
        # FSDP's gradients are DTensors: each rank's own shard (no collective hidden in the norm)
        grads = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in parameters) if g is not None]
        norm_type = float(norm_type)
        dtype = grads[0].dtype if grads else torch.float32
        local = 0.0
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g, norm_type).to(dtype) for g in grads])
            local = float(torch.linalg.vector_norm(norms, norm_type))
        total = torch.tensor(mesh.total_norm(local, norm_type, mesh.current_step), dtype=dtype, device=mesh.device)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        return total


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def _group_problem(env_world: int) -> str | None:
    """Why the launched processes cannot share one mesh (``WORLD_SIZE`` > 1 without a matching process group)."""
    initialized = dist.is_available() and dist.is_initialized()
    group = dist.get_world_size() if initialized else 1
    if env_world <= 1 or group == env_world:
        return None
    found = "torch.distributed is not initialized" if not initialized else f"the process group has {group} ranks"
    return (
        f"WORLD_SIZE={env_world} processes were launched but {found}, so the ranks cannot share one step plan "
        "and one gradient reduction (each would train its own copy, or a step would hang). Launch with torchrun "
        "(it sets RANK, MASTER_ADDR and MASTER_PORT, and HDPAccelerator starts the group), or initialise "
        "torch.distributed with all the processes before building HDPAccelerator"
    )
