"""ZeRO stages 1 and 2 over HDP's one global group (``HDPConfig.zero_stage``).

HDP ranks run different numbers of micro-batches in one step, so any sharding of the model states
must keep its collectives per *step*, equal on every rank, never per micro-batch (docs/design.md §8).
ZeRO stages 1 and 2 need exactly that:

- **stage 0**: every rank holds the whole optimizer state and updates every weight.
- **stage 1** (the default on several ranks): the optimizer state is sharded. Each parameter has one
  owner rank (:func:`partition`: largest first, onto the rank with the fewest elements so far, per
  dtype); each rank's own optimizer (:class:`ZeroOptimizer`, the class and arguments Trainer chose)
  holds and updates only the parameters it owns; then the updated weights are copied from their
  owners to every rank (bucketed, bounded all-gathers: :meth:`~hf_hdp.distributed.mesh.DynamicMesh.gather_parameters`).
  The gradients are still all-reduced, so gradient clipping and everything else see the whole
  gradient. Saves ``(1 - 1/world)`` of the optimizer state per rank: with AdamW in float32, 8 of the
  16 bytes per parameter (weights 4, gradients 4, moments 8) become ``8 / world``.
- **stage 2**: also the gradients. The step's gradient collective is a reduce-scatter in the same
  buckets (:meth:`~hf_hdp.distributed.mesh.DynamicMesh.reduce_gradients` with ``owners``): each rank ends with
  the summed gradients of the parameters it owns, and the other gradients are freed (``None``).
  Gradient clipping takes the norm of the whole gradient over all ranks
  (:meth:`~hf_hdp.accelerator.HDPAccelerator.clip_grad_norm_`). It saves ``(1 - 1/world)`` of the
  gradient memory from the reduction to the end of the optimizer step, and moves less data: a
  reduce-scatter and an all-gather of the weights (2x the model bytes per rank, as a plain
  all-reduce) instead of stage 1's all-reduce and all-gather (3x). It does not lower the peak
  during backward: HDP's micro-batches accumulate into whole local gradients, and they can be
  reduced only once the rank's last micro-batch is done, because the ranks run different counts.

Weights stay replicated here. To shard them too, HDPTrainer runs FSDP2
(``TrainingArguments(fsdp="full_shard")``, :mod:`hf_hdp.engine.fsdp`), whose per-layer gathers
need equal micro-batch counts on every rank: lockstep plans.

The ownership is element-free (whole parameters), so any optimizer that updates each parameter from
its own gradient and state works (AdamW, SGD, Adafactor, Lion, 8-bit Adam, ...); one that couples
parameters inside ``step`` (a global norm), fuses its update into backward (LOMO, layer-wise
optimizers) or swaps weights itself (schedule-free) does not, and is refused (``zero_stage`` set) or
kept unsharded with a warning (``zero_stage=None``).

Checkpoints are sharded (:mod:`hf_hdp.engine.state`, written by HDPTrainer's ``_save_checkpoint``): each
rank writes the state of the parameters it owns, keyed by parameter name (:meth:`ZeroOptimizer.owned_state`),
and at load reads those it owns at the new world size, whatever wrote them (:meth:`ZeroOptimizer.owned_params`,
:meth:`ZeroOptimizer.load_owned_state`): no rank holds the whole state. ``state_dict()`` is a small
placeholder that no optimizer loads (Trainer's own checkpoint code would call it on one rank);
:meth:`ZeroOptimizer.full_state_dict` gathers the whole state in ``torch.optim``'s format (global parameter
indices) for custom loops, and :meth:`ZeroOptimizer.load_state_dict` loads such a full state (today's
``optimizer.pt`` checkpoints, or stage 0's) at any world size, each rank keeping its own shard.
"""

from __future__ import annotations

import inspect
import io
import logging
import secrets
from collections.abc import Iterable

import torch

from ..distributed.buckets import plan_buckets
from ..distributed.mesh import DynamicMesh
from ..planning.sharding import resolve_sharding

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME
PLACEHOLDER_KEY = "hf_hdp_zero_placeholder"


def resolve_zero_stage(zero_stage: int | None, world_size: int) -> int:
    """The ZeRO stage a run uses: ``zero_stage``, or 1 on several ranks and 0 on one when it is None.

    On one rank there is nothing to shard: every stage runs as 0. The rule is
    :func:`hf_hdp.planning.sharding.resolve_sharding`'s (without FSDP).
    """
    return resolve_sharding(zero_stage, None, max(int(world_size), 1), zero_name="HDPConfig.zero_stage")[0]


def partition(params: list[torch.Tensor], world_size: int) -> list[int]:
    """The owner rank of each parameter: per dtype, largest first, each onto the rank with the fewest
    elements of that dtype so far (ties: the lowest rank). A pure function, the same on every rank."""
    owners = [0] * len(params)
    dtypes = []
    for p in params:
        if p.dtype not in dtypes:
            dtypes.append(p.dtype)
    for dtype in dtypes:
        load = [0] * world_size
        order = sorted((i for i, p in enumerate(params) if p.dtype == dtype), key=lambda i: (-params[i].numel(), i))
        for i in order:
            rank = min(range(world_size), key=lambda r: (load[r], r))
            owners[i] = rank
            load[rank] += params[i].numel()
    return owners


def group_settings(group: dict) -> dict:
    """A parameter group's settings (lr, weight_decay, ...), without its parameters."""
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


class ZeroOptimizer(torch.optim.Optimizer):
    """A torch optimizer sharded over all ranks of the global group (ZeRO stage 1 or 2).

    ``param_groups`` are the groups of the optimizer Trainer (or a custom loop) built (weight decay / no decay,
    with all their settings): the SAME group dicts, so a learning-rate scheduler built on that optimizer before
    it was sharded still drives this one; ``optimizer_class(local groups, **kwargs)`` becomes this rank's own optimizer
    (:attr:`local`) over the parameters it owns (:attr:`owners`, :func:`partition`), with the same
    groups (possibly empty). :attr:`param_groups` hold every parameter, so learning-rate schedulers and
    ``zero_grad`` work as for any optimizer; their settings are copied to the local groups at each step.
    :attr:`state` is this rank's shard of the state.

    :meth:`step` (on every rank, together): the local optimizer's step, then the updated weights from
    their owners to all ranks (:meth:`~hf_hdp.distributed.mesh.DynamicMesh.gather_parameters`). With ``stage=2``
    the gradients are expected sharded (:func:`gradient_owners`); with 1, whole.
    """

    def __init__(
        self, param_groups: Iterable[dict], optimizer_class: type, mesh: DynamicMesh, stage: int = 1, **kwargs
    ):
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer shards at ZeRO stage 1 or 2, not {stage!r}")
        self._ready = False
        super().__init__(list(param_groups), dict(kwargs))  # the groups themselves: see the class docstring
        self.mesh, self.stage, self.optimizer_class = mesh, stage, optimizer_class
        self.params = [p for g in self.param_groups for p in g["params"]]  # state-dict indices: this order
        for i, p in enumerate(self.params):
            if p.is_sparse or not p.is_contiguous():
                raise ValueError(f"ZeRO shards dense, contiguous parameters; parameter {i} ({tuple(p.shape)}) is not")
        self.owners = partition(self.params, mesh.world_size)
        self._owner = {id(p): r for p, r in zip(self.params, self.owners)}
        local_groups = [
            {**group_settings(g), "params": [p for p in g["params"] if self._owner[id(p)] == mesh.rank]}
            for g in self.param_groups
        ]
        self.local = optimizer_class(local_groups, **kwargs)
        self.state = self.local.state  # this rank's shard
        self._buckets = plan_buckets(
            [(p.numel(), p.dtype) for p in self.params], mesh.bucket_bytes, self.owners, mesh.world_size
        )
        self._token = secrets.token_hex(8)
        self._ready = True

    def owner_of(self, param: torch.Tensor) -> int | None:
        """The rank that updates ``param``; ``None`` if this optimizer does not hold it."""
        return self._owner.get(id(param))

    def add_param_group(self, param_group: dict) -> None:
        if self._ready:
            raise NotImplementedError(
                "ZeroOptimizer shards its parameters when it is built: every parameter to train must require a "
                "gradient before HDPTrainer creates the optimizer (or use HDPConfig(zero_stage=0))."
            )
        super().add_param_group(param_group)

    def _sync_settings(self, source: list[dict], target: list[dict]) -> None:
        for s, t in zip(source, target):
            t.update(group_settings(s))

    @torch.no_grad()
    def step(self, closure=None):
        """This rank's shard's update, then every updated weight to every rank. Call on all ranks."""
        self._sync_settings(self.param_groups, self.local.param_groups)  # the scheduler's learning rate
        loss = self.local.step() if closure is None else self.local.step(closure)
        self._sync_settings(self.local.param_groups, self.param_groups)
        self.mesh.gather_parameters(self.params, self.owners, step=self.mesh.current_step, buckets=self._buckets)
        return loss

    # ------------------------------------------------------------ state
    def _global_groups(self) -> list[dict]:
        groups, start = [], 0
        for g in self.param_groups:
            groups.append({**group_settings(g), "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return groups

    def state_dict(self) -> dict:
        """A placeholder: the state is sharded, and no single rank holds it. Use :meth:`full_state_dict`.

        It has no parameter group, so no optimizer, this one in another process included, loads it: a
        checkpoint whose full state was never written fails to resume instead of resetting the moments.
        (This optimizer loads back its own placeholder as a no-op, for accelerate's device placement.)
        """
        return {
            "state": {},
            "param_groups": [],
            PLACEHOLDER_KEY: {
                "token": self._token,
                "rank": self.mesh.rank,
                "world_size": self.mesh.world_size,
                "stage": self.stage,
            },
        }

    def full_state_dict(self, receive: bool = True) -> dict | None:
        """The whole optimizer state, in ``torch.optim``'s format, on the ranks that pass ``receive=True``.

        Collective: call it on every rank. Each rank's shard travels to the receivers in bounded pieces
        (:meth:`~hf_hdp.distributed.mesh.DynamicMesh.gather_bytes`); the result is on the CPU and loads into this
        optimizer at any world size, or into a plain ``optimizer_class`` over the same groups. ``None``
        on the other ranks.
        """
        # the settings come from param_groups, which the scheduler may have changed since the last step
        buffer = io.BytesIO()
        torch.save(self.local.state_dict()["state"], buffer)
        blobs = self.mesh.gather_bytes(
            buffer.getvalue(), receive, "optimizer state gather (ZeRO)", self.mesh.current_step
        )
        if blobs is None:
            return None
        state = {}
        for rank, blob in enumerate(blobs):
            # this run's own ranks wrote these bytes a moment ago (any optimizer's state objects)
            part = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
            mine = [i for i, owner in enumerate(self.owners) if owner == rank]  # the local optimizer's order
            for local_index, value in part.items():
                state[mine[local_index]] = value
        return {"state": dict(sorted(state.items())), "param_groups": self._global_groups()}

    def owned_params(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        """``{name: parameter}`` of the parameters this rank owns (``names``: ``id(parameter) -> name``)."""
        return {names[id(p)]: p for p, owner in zip(self.params, self.owners) if owner == self.mesh.rank}

    def owned_state(self, names: dict[int, str]) -> dict[str, dict]:
        """This rank's shard of the state, keyed by parameter name: ``{name: {key: value}}`` (the values
        themselves, not copies). For a sharded checkpoint (:mod:`hf_hdp.engine.state`): every rank writes its
        own, and a parameter's state is on one rank only. No communication."""
        return {names[id(p)]: dict(values) for p, values in self.local.state.items()}

    def load_owned_state(self, state: dict[str, dict], saved_groups: list[dict], names: dict[int, str]) -> None:
        """Load this rank's shard from ``{name: {key: value}}`` (the parameters it owns at this world size, read
        from a sharded checkpoint of any world size or mode) and the saved groups' settings (``params``: names,
        in :meth:`owned_params` terms). No communication."""
        local_state, local_groups, index = {}, [], 0
        for group, saved in zip(self.param_groups, saved_groups):
            indices = []
            for p in group["params"]:
                if self._owner[id(p)] != self.mesh.rank:
                    continue
                if names[id(p)] in state:
                    local_state[index] = state[names[id(p)]]
                indices.append(index)
                index += 1
            settings = {
                k: (tuple(v) if isinstance(group.get(k), tuple) and isinstance(v, list) else v)
                for k, v in saved.items()
                if k != "params"
            }
            local_groups.append({**settings, "params": indices})
        self.local.load_state_dict({"state": local_state, "param_groups": local_groups})
        self._sync_settings(self.local.param_groups, self.param_groups)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full optimizer state (from :meth:`full_state_dict`, or any ``torch.optim`` optimizer
        over the same parameter groups, at any world size): this rank keeps its own shard."""
        marker = state_dict.get(PLACEHOLDER_KEY)
        if marker is not None:
            if marker.get("token") == self._token:
                return  # our own placeholder back (accelerate's device placement): the state is where it was
            raise ValueError(
                "this optimizer state is the placeholder a sharded (ZeRO) optimizer returns from state_dict() "
                f"(written by rank {marker.get('rank')} of {marker.get('world_size')}), not a full state: the "
                "checkpoint's save was interrupted before HDP's on_save callback wrote the full state (its "
                "hdp_state.json is missing too). Resume from an earlier checkpoint."
            )
        groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        saved = [len(g["params"]) for g in groups]
        if saved != sizes:
            raise ValueError(
                f"the optimizer state has parameter groups of sizes {saved}, this optimizer {sizes}: it was saved "
                "for other trainable parameters (another model, PEFT configuration or weight-decay grouping)."
            )
        state = state_dict["state"]
        local_state, local_groups, index = {}, [], 0
        for group, saved_group in zip(self.param_groups, groups):
            indices = []
            for saved_id, p in zip(saved_group["params"], group["params"]):
                if self._owner[id(p)] != self.mesh.rank:
                    continue
                if saved_id in state:
                    local_state[index] = state[saved_id]
                indices.append(index)
                index += 1
            local_groups.append({**group_settings(saved_group), "params": indices})
        self.local.load_state_dict({"state": local_state, "param_groups": local_groups})
        self._sync_settings(groups, self.param_groups)


# ---------------------------------------------------------------- HDPTrainer's hooks
def unwrap_zero(optimizer) -> ZeroOptimizer | None:
    """The :class:`ZeroOptimizer` inside accelerate's wrapper(s), or ``None``."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, ZeroOptimizer) and seen < 8:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, ZeroOptimizer) else None


def _why_not_sharded(optimizer, args, built_by_trainer: bool, stage: int) -> str | None:
    name = type(optimizer).__name__
    optim = str(getattr(args, "optim", "") or "")
    if not built_by_trainer:
        return (
            "the optimizer was passed to the trainer ready-made (optimizers=(optimizer, scheduler)), and HDP "
            "shards only an optimizer it builds; pass optimizer_cls_and_kwargs=(cls, kwargs) instead"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        return f"{name} is not a torch.optim.Optimizer"
    if "layerwise" in optim.lower() or "LayerWise" in name or "lomo" in optim.lower():
        return f"optim={optim!r} updates the weights inside backward, not in step()"
    if callable(getattr(optimizer, "train", None)) or callable(getattr(optimizer, "eval", None)):
        return f"{name} switches the weights itself (train()/eval(), a schedule-free optimizer)"
    if any(p.is_sparse or not p.is_contiguous() for g in optimizer.param_groups for p in g["params"]):
        return "some parameters are sparse or not contiguous"
    if stage == 2 and getattr(args, "fp16", False):
        return (
            "fp16 loss scaling skips a step when a rank sees an inf gradient, and at stage 2 each rank sees "
            "only its shard's gradients, so the ranks could disagree; use bf16 or zero_stage=1"
        )
    return None


def _constructor_kwargs(cls: type, defaults: dict) -> dict:
    """The optimizer's settings that its constructor takes (AdamW's defaults also hold Adam's internals)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return dict(defaults)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in parameters and k not in ("self", "params")}


def shard_optimizer(optimizer, mesh: DynamicMesh, zero_stage: int | None, args, built_by_trainer: bool = True):
    """``optimizer`` as a :class:`ZeroOptimizer` at the run's ZeRO stage (:func:`resolve_zero_stage`), or as it is.

    The class, its constructor settings and every parameter group (weight decay / no decay) are kept.
    An optimizer ZeRO cannot shard is refused when ``zero_stage`` was set, and kept whole, with a
    warning, when it was left to the default.
    """
    stage = resolve_zero_stage(zero_stage, mesh.world_size)
    if stage == 0 or unwrap_zero(optimizer) is not None:  # nothing to shard, or sharded already (a second train())
        return optimizer
    reason = _why_not_sharded(optimizer, args, built_by_trainer, stage)
    if reason is not None:
        if zero_stage is not None:
            raise ValueError(
                f"HDPConfig.zero_stage={zero_stage} cannot shard this optimizer: {reason}. "
                "Or set zero_stage=0 (every rank holds the whole optimizer state)."
            )
        logger.warning("hf_hdp: the optimizer states stay replicated on every rank (ZeRO stage 0): %s.", reason)
        return optimizer
    cls = type(optimizer)
    return ZeroOptimizer(optimizer.param_groups, cls, mesh, stage, **_constructor_kwargs(cls, optimizer.defaults))


def gradient_owners(optimizer, params: list[torch.Tensor]) -> list[int | None] | None:
    """For :meth:`~hf_hdp.distributed.mesh.DynamicMesh.reduce_gradients`: at ZeRO stage 2, each parameter's owner
    rank (``None`` for one the optimizer does not hold: every rank keeps its gradient); otherwise
    ``None`` (all-reduce)."""
    zero = unwrap_zero(optimizer)
    if zero is None or zero.stage < 2:
        return None
    return [zero.owner_of(p) for p in params]
