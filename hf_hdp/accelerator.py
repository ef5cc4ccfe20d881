"""The dynamic-mesh accelerator plugin: an :class:`accelerate.Accelerator` that carries HDP's mesh.

HDP synchronises gradients itself, once per step and in the same bucketed collectives on every
rank however many micro-batches each ran (:class:`~hf_hdp.mesh.DynamicMesh`), so the Accelerator
must not wrap the model in DDP (whose per-backward reduction and bucket memory would be wrong and
wasted). :class:`HDPAccelerator` places the model and applies mixed precision without the wrapper,
makes ``no_sync`` a no-op, and takes the norm of the whole gradient for clipping when each rank
holds only a shard of it (ZeRO stage 2). HDPTrainer builds one from the Accelerator Trainer
configured (:meth:`HDPAccelerator.like`); a custom loop can build one directly.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from .mesh import DynamicMesh


class HDPAccelerator(Accelerator):
    """An :class:`accelerate.Accelerator` for HDP: replicated model states, no DDP wrapper, carrying the mesh.

    Gradients are reduced by :meth:`DynamicMesh.reduce_gradients`, once per optimizer step; after a
    reduction that left each rank only its shard's gradients (ZeRO stage 2), :meth:`clip_grad_norm_`
    takes the norm of the whole gradient over all ranks. HDPTrainer builds one in its ``create_accelerator_and_postprocess`` from the Accelerator that
    Trainer configured (:meth:`like`).
    """

    def __init__(self, *args, mesh: DynamicMesh | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mesh = mesh

    @classmethod
    def like(cls, accelerator: Accelerator, mesh: DynamicMesh) -> "HDPAccelerator":
        """An HDPAccelerator with ``accelerator``'s settings (precision, dataloader and accumulation
        configuration, handlers, dynamo plugin); the process state is shared, as for any Accelerator."""
        from accelerate.utils import GradientAccumulationPlugin

        handlers = [h for h in (accelerator.ddp_handler, accelerator.scaler_handler, accelerator.init_handler,
                                accelerator.autocast_handler) if h is not None]
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
        # evaluation_mode=True places the model and applies mixed precision without the DDP wrapper
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)

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
