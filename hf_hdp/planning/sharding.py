"""How a run shards its model states: the ZeRO stage and the FSDP mode it uses (pure Python, no torch).

The one rule, which the trainer (:mod:`hf_hdp.trainer.capacity`, :mod:`hf_hdp.engine.zero`), the memory
estimate (:mod:`hf_hdp.planning.cost.memory`) and ``hf-hdp plan --memory`` all apply through
:func:`resolve_sharding`:

- ``fsdp`` (``"shard_grad_op"`` or ``"full_shard"``) shards the optimizer states and the gradients itself (and,
  with ``full_shard``, the weights): the ZeRO stage is then 0, and a ZeRO stage given beside it is refused;
- otherwise the ZeRO stage is the one given, or 1 when none is (``None``); on one rank there is nothing to shard
  and every stage runs as 0.
"""

from __future__ import annotations

#: the FSDP modes HDP runs (FSDP2's ZeRO-2 and ZeRO-3 forms)
FSDP_MODES = ("shard_grad_op", "full_shard")
#: the ZeRO stages HDP runs (:mod:`hf_hdp.engine.zero`)
ZERO_STAGES = (0, 1, 2)


def _setting(name: str, value) -> str:
    """``--zero-stage 1`` for a command-line flag, ``HDPConfig.zero_stage=1`` for anything else."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def resolve_sharding(
    zero_stage: int | None, fsdp: str | None, world_size: int, *, zero_name: str = "zero_stage", fsdp_name: str = "fsdp"
) -> tuple[int, str | None]:
    """``(zero_stage, fsdp)`` a run of ``world_size`` ranks uses, from the settings as the user gave them.

    ``zero_stage``: 0, 1, 2 or ``None`` (unset: 1 on several ranks); ``fsdp``: ``None`` or one of
    :data:`FSDP_MODES`. With ``fsdp`` the stage is 0; on one rank it is 0 too. ``zero_name`` / ``fsdp_name``
    name the two settings in the errors as the caller's user knows them (``"HDPConfig.zero_stage"``,
    ``"--fsdp"``, ...).

    Raises ``ValueError`` for a world size, stage or mode out of range, and for a ZeRO stage given beside
    ``fsdp`` (naming both settings and the fix).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if zero_stage is not None and (isinstance(zero_stage, bool) or zero_stage not in ZERO_STAGES):
        raise ValueError(f"{zero_name} must be 0, 1 or 2 (or unset: 1 on several ranks, 0 on one), got {zero_stage!r}")
    if fsdp is not None and fsdp not in FSDP_MODES:
        raise ValueError(f"{fsdp_name} must be None, {FSDP_MODES[0]!r} or {FSDP_MODES[1]!r}, got {fsdp!r}")
    if fsdp is not None and zero_stage is not None:
        raise ValueError(
            f"{_setting(zero_name, zero_stage)} and {_setting(fsdp_name, fsdp)} are both set: FSDP shards the optimizer "
            f"states and the gradients itself (and, with full_shard, the weights). To shard with FSDP, drop "
            f"{zero_name} (leave it unset); to shard with ZeRO, drop {fsdp_name}."
        )
    if fsdp is not None or world_size == 1:
        return 0, fsdp
    return (1 if zero_stage is None else int(zero_stage)), None
