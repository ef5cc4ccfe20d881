"""FSDP2 under HDP: ``TrainingArguments(fsdp="full_shard" | "shard_grad_op")``, for models whose weights do not fit.

HDP ranks run different numbers of micro-batches per step; FSDP's collectives run per layer, per
forward and per backward, so the ranks must agree on when they run. HDPTrainer applies
``torch.distributed.fsdp.fully_shard`` itself (each decoder layer, then the whole model; on CPU and
GPU alike, over the one global group) and runs FSDP in one of two modes, chosen by the sharding
strategy the user names, in transformers' own words:

``fsdp="shard_grad_op"`` → **ZeRO-2 mode** (HDP's micro-batch counts stay free)
    At the step's start every rank gathers the whole model once (``unshard()`` of every FSDP
    module), runs its own micro-batches with gradient sync off and no reshard
    (``set_requires_gradient_sync(False)``, ``set_reshard_after_backward(False)``), so no collective
    runs inside a micro-batch, and the gradients accumulate unsharded. Then every rank, one without
    a micro-batch included, runs one *placeholder micro-batch* (one token, no label: its loss and
    its gradient contributions are exactly zero) with sync and reshard back on: its backward
    reduce-scatters the accumulated gradients layer by layer, the same collectives on every rank,
    and frees the unsharded weights. Memory in the step: the whole weights and whole gradients,
    as ZeRO stage 2 (optimizer state and, between steps, weights and gradients sharded 1/N). Time:
    one all-gather and one reduce-scatter of the model per step, as ZeRO-2.

``fsdp="full_shard"`` → **ZeRO-3 mode** (lockstep slots)
    FSDP's per-layer all-gather before each layer's forward and backward, and its reduce-scatter
    after each backward, stay on. Every rank then has to run the same number of micro-batches,
    slot by slot: the plan is made *lockstep* (:func:`~hf_hdp.planning.plan.lockstep`; the balanced
    planner's ``lockstep=True``): every rank holds a micro-batch in every slot, a placeholder where
    it has no work, and a slot ends when its slowest rank does. Memory: weights, gradients and
    optimizer state sharded 1/N, plus about two layers' whole weights and gradients at a time.
    Time: two all-gathers and one reduce-scatter of the model per slot, and the gaps of lockstep
    (``plan_metrics(plan, cost)`` of a lockstep plan counts them: each slot is a barrier of all
    ranks).

``full_shard`` means what it says in FSDP: weights sharded also during the step, which is what a
model whose weights do not fit needs; ``shard_grad_op`` is the cheaper mode when they fit.

What carries over: gradient clipping takes the norm of the whole gradient (each rank's local shards,
one bounded all-reduce: :meth:`~hf_hdp.accelerator.HDPAccelerator.clip_grad_norm_`); the step's
loss, P2P bytes and label count go in one bounded sum (:meth:`~hf_hdp.distributed.mesh.DynamicMesh.sum_scalars`);
the optimizer is Trainer's, over the sharded parameters, so its state is sharded too; checkpoints are
sharded (each rank writes its own shards of the weights and the optimizer state with
torch.distributed.checkpoint, :mod:`hf_hdp.engine.state`; ``fsdp_config["state_dict_type"] =
"FULL_STATE_DICT"`` writes the whole weights as safetensors instead, one tensor gathered at a time) and
reshard at load, at any world size, ZeRO stage or FSDP mode; a full-state checkpoint of an older
version loads too (:func:`shard_loaded_state`). FSDP's own collectives run on a process group of their own whose
timeout is ``HDPConfig.p2p_timeout_s`` (:func:`shard_model`), and fail as the mesh's collectives do
(:func:`fsdp_errors`: :class:`~hf_hdp.distributed.CollectiveTimeoutError` past the bound,
:class:`~hf_hdp.distributed.PeerCrashedError` when a rank died, naming this rank, the collective and the step).

The model is sharded when the optimizer is built (``create_optimizer``), after Trainer loaded a
checkpoint to resume from into the whole model; from then on the model's parameters are DTensors.

Refused, each naming the setting: FSDP1 (``fsdp_config["version"] = 1``), CPU offload, size-based
wrapping, ``cpu_ram_efficient_loading``, a ``state_dict_type`` other than sharded or full, XLA, FSDP's
own activation checkpointing (use ``gradient_checkpointing=True``), an explicit ``HDPConfig.zero_stage``
(:func:`~hf_hdp.planning.sharding.resolve_sharding`), PEFT models.
"""

from __future__ import annotations

import contextlib
import datetime
import logging

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..planning.plan import lockstep
from ..planning.sharding import resolve_sharding
from .zero import PLACEHOLDER_KEY

logger = logging.getLogger(__name__)

ZERO2, ZERO3 = "shard_grad_op", "full_shard"


def fsdp_mode(args, zero_stage: int | None) -> str | None:
    """``"full_shard"``, ``"shard_grad_op"`` or ``None`` (no FSDP) from ``TrainingArguments``; refuses
    every FSDP setting HDP does not honour. ``args.fsdp_plugin_args`` is what transformers made of
    ``fsdp`` and ``fsdp_config``."""
    if not getattr(args, "fsdp", None):
        return None
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    config = getattr(args, "fsdp_config", None) or {}

    def refuse(what: str, fix: str):
        raise ValueError(f"TrainingArguments: {what}, which HDPTrainer's FSDP2 does not honour. {fix}")

    if config.get("xla"):
        refuse("fsdp_config['xla'] is set", "HDP runs on CUDA or CPU; unset it.")
    if int(plugin.get("fsdp_version", 2)) != 2:
        refuse(
            f"fsdp_config['version'] = {plugin.get('fsdp_version')} (FSDP1)",
            "HDP applies FSDP2 (torch.distributed.fsdp.fully_shard); set fsdp_config['version'] = 2 or unset it.",
        )
    if plugin.get("cpu_offload"):
        refuse(
            "fsdp='offload' / fsdp_config['cpu_offload'] is set",
            "Drop it; HDP offloads activations with HDPConfig(offload_ratio=...) instead.",
        )
    if plugin.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP":
        refuse(
            f"fsdp_config['auto_wrap_policy'] = {plugin['auto_wrap_policy']!r}",
            "HDP shards each decoder layer (TRANSFORMER_BASED_WRAP, the default); unset it.",
        )
    if plugin.get("cpu_ram_efficient_loading"):
        refuse("fsdp_config['cpu_ram_efficient_loading'] is true", "Set it to false.")
    state_dict_type(args)  # checkpoints: SHARDED_STATE_DICT (the default) or FULL_STATE_DICT
    if plugin.get("activation_checkpointing"):
        refuse(
            "fsdp_config['activation_checkpointing'] is true",
            "Set TrainingArguments(gradient_checkpointing=True) instead: HDP recomputes each layer, rings included.",
        )
    mode = ZERO3 if plugin.get("reshard_after_forward", True) else ZERO2
    resolve_sharding(zero_stage, mode, 1, zero_name="HDPConfig.zero_stage", fsdp_name="TrainingArguments.fsdp")
    return mode


SHARDED, FULL = "SHARDED_STATE_DICT", "FULL_STATE_DICT"


def state_dict_type(args) -> str:
    """``fsdp_config["state_dict_type"]``: how FSDP2 weights go into checkpoints (``SHARDED_STATE_DICT``, the
    default: each rank writes its shards; or ``FULL_STATE_DICT``: the whole weights as safetensors, gathered one
    tensor at a time). Any other value is refused by name."""
    value = (getattr(args, "fsdp_config", None) or {}).get("state_dict_type")
    if value is None:
        return SHARDED
    text = str(value).upper().rsplit(".", 1)[-1]  # also StateDictType.SHARDED_STATE_DICT
    if text not in (SHARDED, FULL):
        raise ValueError(
            f"TrainingArguments: fsdp_config['state_dict_type'] = {value!r}, which HDPTrainer does not "
            f"honour. Set {SHARDED!r} (each rank writes its shards; the default) or {FULL!r} (the whole "
            "weights as safetensors, gathered one tensor at a time)."
        )
    return text


def layer_classes(model, fsdp_config: dict | None) -> tuple[type, ...]:
    """The module classes to shard one by one: ``fsdp_config['transformer_layer_cls_to_wrap']`` or the
    model's ``_no_split_modules`` (its decoder layer), as transformers' auto wrap picks them. Checked
    when the trainer is built: a PEFT model, or a class name the model does not contain, is refused."""
    if getattr(model, "peft_config", None) is not None:
        raise ValueError(
            "HDPTrainer does not apply FSDP to a PEFT model; train the adapters without fsdp "
            "(they are small: ZeRO stage 1 shards their optimizer state)."
        )
    config = fsdp_config or {}
    names = config.get("transformer_layer_cls_to_wrap") or list(getattr(model, "_no_split_modules", None) or [])
    found = {type(m).__name__: type(m) for m in model.modules() if type(m).__name__ in set(names)}
    missing = [n for n in names if n not in found]
    if config.get("transformer_layer_cls_to_wrap") and missing:
        raise ValueError(
            f"fsdp_config['transformer_layer_cls_to_wrap'] names {missing}, which {type(model).__name__} does not "
            f"contain. Its layer classes: {sorted({type(m).__name__ for m in model.modules()})[:20]}"
        )
    return tuple(found.values())


def shard_model(
    model, classes: tuple[type, ...], mode: str, device: torch.device, timeout_s: float | None = None
) -> list:
    """Apply FSDP2 to ``model`` in place (each module of ``classes``, from :func:`layer_classes`, then
    the whole model) over all ranks; returns its FSDP modules, root last. Gradients are summed, not averaged: HDP's loss
    is already divided by the global batch's label count.

    ``timeout_s`` (``HDPConfig.p2p_timeout_s``) bounds every collective FSDP runs (its per-layer all-gathers
    and reduce-scatters, the checkpoints' gathers): FSDP passes no timeout of its own, so its collectives
    wait as long as their process group's timeout, which is fixed when the group is made. With a bound,
    FSDP gets a group of its own over all ranks (one, made here, on every rank) with that timeout; without
    (``None``), it runs on the global group and its timeout (``TrainingArguments.ddp_timeout``)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return fsdp_modules(model)
    if timeout_s is None:
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    else:
        group = torch.distributed.new_group(
            timeout=datetime.timedelta(seconds=timeout_s), backend=torch.distributed.get_backend()
        )
        mesh = DeviceMesh.from_group(group, device.type)
    reshard = mode == ZERO3
    for module in list(model.modules()):
        if classes and isinstance(module, classes):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    modules = fsdp_modules(model)
    for m in modules:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM; the factor is 1)
    logger.info(
        "hf_hdp: FSDP2 %s over %d ranks: %d sharded modules (%s)",
        mode,
        mesh.size(),
        len(modules),
        ", ".join(sorted({c.__name__ for c in classes})) or "the whole model only",
    )
    return modules


# FSDP2's functions (torch.distributed.fsdp._fully_shard) that run or wait for its collectives -> what they move
_ALL_GATHER_FRAMES = ("foreach_all_gather", "foreach_all_gather_copy_out", "wait_for_unshard", "unshard")
_REDUCE_SCATTER_FRAMES = ("foreach_reduce", "post_backward", "finalize_backward")


def _fsdp_collective(err: BaseException) -> tuple[str, str]:
    """(what, kind) of the FSDP collective that raised ``err``, read off its traceback, with the FSDP module
    it ran for when the traceback shows it."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    module = ""
    for frame in frames:  # FSDPParamGroup's repr names its module: "FSDPParamGroup(fqn=model.layers.1)"
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "FSDPParamGroup":
            text = repr(owner)
            if text.startswith("FSDPParamGroup(fqn=") and text.endswith(")"):
                module = f" of {text[len('FSDPParamGroup(fqn=') : -1] or 'the root module'}"
    for frame in reversed(frames):  # the innermost FSDP function says which collective
        name = frame.f_code.co_name
        if name in _ALL_GATHER_FRAMES:
            return f"FSDP all-gather of the weights{module}", "an all-gather"
        if name in _REDUCE_SCATTER_FRAMES:
            return f"FSDP reduce-scatter of the gradients{module}", "a reduce-scatter"
    return "FSDP all-gathers and reduce-scatters", "a collective"


@contextlib.contextmanager
def fsdp_errors(mesh, step: int | None):
    """Around the FSDP part of a step (or an evaluation): a backend's raw failure of one of FSDP's own
    collectives (gloo's ``Connection closed by peer`` from a crashed rank, a wait past the bound of
    :func:`shard_model`'s group) is raised as the :class:`~hf_hdp.distributed.PeerCrashedError` or
    :class:`~hf_hdp.distributed.CollectiveTimeoutError` the mesh raises for its own collectives, naming this
    rank, the collective (and FSDP module) and the global ``step``. Any other error passes unchanged."""
    try:
        yield
    except RuntimeError as err:
        what, kind = _fsdp_collective(err)
        translated = mesh.translate_error(err, what, kind, step)
        if translated is None:
            raise
        raise translated from err


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def begin_zero2_step(modules) -> None:
    """ZeRO-2 mode, at the step's start on every rank: the whole weights, once; no collective until
    :func:`end_zero2_step`."""
    for m in modules:
        m.unshard()
        m.set_requires_gradient_sync(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)


def end_zero2_step(modules) -> None:
    """ZeRO-2 mode, before the placeholder micro-batch: its backward reduce-scatters and reshards."""
    for m in modules:
        m.set_requires_gradient_sync(True, recurse=False)
        m.set_reshard_after_backward(True, recurse=False)


def gather_for_eval(modules) -> None:
    """ZeRO-2 mode evaluation: every rank gathers the whole weights once, so that ranks with different
    micro-batch counts run no collective in between (:func:`release_after_eval` at the end)."""
    for m in modules:
        m.unshard()


def release_after_eval(modules) -> None:
    for m in modules:
        m.reshard()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_model_state(model) -> dict:
    """The whole model's state dict on every rank, on the CPU (each DTensor gathered in turn). Collective."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


def shard_loaded_state(optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a full state: every state tensor shaped like its DTensor
    parameter becomes this rank's shard of it (no communication: every rank holds the full tensor)."""
    for p, values in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for k, v in list(values.items()):
            if torch.is_tensor(v) and not isinstance(v, DTensor) and tuple(v.shape) == tuple(p.shape):
                values[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def _placeholder_if_sharded(optimizer, state_dict: dict) -> dict:
    """``state_dict()`` of an optimizer over sharded parameters: a placeholder once its state holds
    shards. Trainer calls ``state_dict()`` on the saving rank alone, where no rank could gather the
    full state; HDP's ``on_save`` callback gathers it on every rank and replaces the file
    (HDPTrainer saves the sharded state instead, :mod:`hf_hdp.engine.state`). Before the first step (accelerate's
    device placement) the state is empty and passes unchanged."""
    if any(isinstance(v, DTensor) for values in optimizer.state.values() for v in values.values()):
        return {
            "state": {},
            "param_groups": [],
            PLACEHOLDER_KEY: {
                "rank": torch.distributed.get_rank(),
                "world_size": torch.distributed.get_world_size(),
                "stage": "fsdp",
            },
        }
    return state_dict


def prepare_optimizer(optimizer) -> None:
    """Hook :func:`shard_loaded_state` into ``optimizer.load_state_dict`` (Trainer's resume loads the
    full state it finds in the checkpoint) and :func:`_placeholder_if_sharded` into its ``state_dict``."""
    if getattr(optimizer, "_hdp_fsdp_hook", False):
        return
    optimizer.register_load_state_dict_post_hook(lambda opt: shard_loaded_state(opt))
    optimizer.register_state_dict_post_hook(_placeholder_if_sharded)
    optimizer._hdp_fsdp_hook = True


class LockstepPlanner:
    """A planner whose plans are lockstep (:func:`~hf_hdp.planning.plan.lockstep`): ZeRO-3 mode's
    equal micro-batch counts, for any registered planner (the balanced one plans for it itself,
    ``lockstep=True``; applying it again changes nothing)."""

    def __init__(self, planner):
        self.planner = planner

    def __call__(self, lengths, world_size: int, tokens_per_rank: int):
        return lockstep(self.planner(lengths, world_size, tokens_per_rank))
