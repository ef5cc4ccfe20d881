"""Rollouts on the move: one global batch of RL rollouts, planned and packed for HDP.

Unlike a dataset on disk, each rank's rollouts live in that rank's memory after generation. A
:class:`RolloutStep` turns them into one HDP step:

1. :func:`local_rollouts` cuts this rank's padded ``[B, T]`` tensors into whole sequences (the tokens
   whose attention mask is 1: the prompt, then the completion);
2. :func:`gather_layout` gives every rank every rollout's length, prompt length and owner (two
   small bounded all-reduces), so every rank plans the same step (balanced, per-sample groups, a
   rollout longer than ``tokens_per_rank`` split over several ranks);
3. :func:`route` moves per-token values (token ids to the ranks of each rollout's pieces; per-token
   coefficients the same way; per-token results back to the owner) over the one global group's
   bounded P2P (:meth:`~hf_hdp.distributed.mesh.DynamicMesh.exchange`), in ``world - 1`` rounds
   of pairwise exchanges whose sizes every rank computes from the plan (nothing but the values
   travels);
4. the micro-batches are packed by :class:`~hf_hdp.collators.collator.HDPCollator` as for any
   HDP step, and the collator's :func:`~hf_hdp.collators.collator.packed_ranges` says which rollout token
   every packed position is, so per-token values can sit beside the packed tokens (checked against the packed ids and positions).

Positions: every rollout is numbered from 0 (its first prompt token), as generation numbers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..collators.collator import HDPCollator, packed_ranges
from ..collators.documents import IGNORE_INDEX, HDPDataError
from ..distributed.mesh import DynamicMesh
from ..planning import StepPlan


@dataclass
class Rollouts:
    """This rank's rollouts as whole sequences: ``sequences[b]`` = prompt tokens then completion tokens."""

    sequences: list[torch.Tensor]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return len(self.sequences)


def local_rollouts(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> Rollouts:
    """Cut padded ``[B, T]`` rollouts (left-padded prompts in the first ``prompt_width`` columns,
    right-padded completions after them, TRL's layout) into whole sequences.

    Refuses a row whose prompt is empty or whose mask has holes (the sequence must be contiguous for
    positions from 0 to mean what generation meant)."""
    sequences, prompts = [], []
    mask = attention_mask.bool()
    for b in range(input_ids.size(0)):
        pm, cm = mask[b, :prompt_width], mask[b, prompt_width:]
        p, c = int(pm.sum()), int(cm.sum())
        if p == 0:
            raise HDPDataError(
                f"rollout {b} of this rank has an empty prompt (prompt mask all 0): its first "
                "completion token has no token to be predicted from. Give every prompt a token."
            )
        if not bool(pm[prompt_width - p :].all()) or not bool(cm[:c].all()):
            raise HDPDataError(
                f"rollout {b} of this rank has holes in its attention mask (prompt mask {pm.int().tolist()[:16]}..., "
                f"completion mask {cm.int().tolist()[:16]}...): HDP expects left-padded prompts and right-padded "
                "completions, TRL's layout. Padding inside a sequence cannot be packed exactly."
            )
        ids = torch.cat([input_ids[b, prompt_width - p : prompt_width], input_ids[b, prompt_width : prompt_width + c]])
        sequences.append(ids.detach().to("cpu", torch.long))
        prompts.append(p)
    return Rollouts(sequences, prompts)


@dataclass(frozen=True)
class RolloutLayout:
    """Every rollout of the global batch: its owner, its index there, its length and prompt length.

    Global sample ``s`` is rollout ``local[s]`` of rank ``owners[s]``; ranks in order, rows in order."""

    owners: tuple[int, ...]
    local: tuple[int, ...]
    lengths: tuple[int, ...]
    prompt_lengths: tuple[int, ...]

    def samples_of(self, rank: int) -> list[int]:
        return [s for s, o in enumerate(self.owners) if o == rank]

    @property
    def num_loss_tokens(self) -> int:
        """Completion tokens of the global batch: each is one target of the shifted labels."""
        return sum(n - p for n, p in zip(self.lengths, self.prompt_lengths))


def gather_layout(mesh: DynamicMesh, rollouts: Rollouts, step: int) -> RolloutLayout:
    """Every rank's rollout lengths on every rank (two bounded all-reduces of a few floats)."""
    world, rank = mesh.world_size, mesh.rank
    counts = [0.0] * world
    counts[rank] = float(len(rollouts))
    counts = [int(c) for c in mesh.sum_scalars(counts, "rollout counts", step)]
    start = sum(counts[:rank])
    total = sum(counts)
    slots = [0.0] * (2 * total)
    for b, (seq, p) in enumerate(zip(rollouts.sequences, rollouts.prompt_lengths)):
        slots[2 * (start + b)] = float(seq.numel())
        slots[2 * (start + b) + 1] = float(p)
    slots = [int(v) for v in mesh.sum_scalars(slots, "rollout lengths", step)] if total else []
    owners = tuple(r for r in range(world) for _ in range(counts[r]))
    local = tuple(b for r in range(world) for b in range(counts[r]))
    return RolloutLayout(owners, local, tuple(slots[0::2]), tuple(slots[1::2]))


@dataclass(frozen=True)
class Move:
    """Rows ``ranges`` of sample ``sample``'s per-token values go from rank ``src`` to rank ``dst``."""

    sample: int
    src: int
    dst: int
    ranges: tuple[tuple[int, int], ...]


def piece_ranges(plan: StepPlan) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """``(rank, sample) -> token ranges`` that rank holds of that sample in ``plan`` (every micro-batch)."""
    held: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for mb in plan.micro_batches:
        for p in mb.pieces:
            held.setdefault((mb.rank, p.sample), []).extend(p.token_ranges(mb.rank))
    return held


def moves_to_pieces(plan: StepPlan, layout: RolloutLayout, extend: int = 0) -> list[Move]:
    """Owner to holder of every piece; each range extended by ``extend`` tokens at its end (the label
    of a piece's last token is the next token of the sequence)."""
    out = []
    for (rank, s), ranges in sorted(piece_ranges(plan).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        n = layout.lengths[s]
        out.append(Move(s, layout.owners[s], rank, tuple((a, min(b + extend, n)) for a, b in ranges)))
    return out


def moves_to_owners(plan: StepPlan, layout: RolloutLayout) -> list[Move]:
    """Holder of every piece to the sample's owner: the pieces of a sample cover it exactly once."""
    return [
        Move(s, rank, layout.owners[s], tuple(ranges))
        for (rank, s), ranges in sorted(piece_ranges(plan).items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]


def route(
    mesh: DynamicMesh,
    moves: list[Move],
    values: dict[int, torch.Tensor],
    lengths,
    tail: tuple = (),
    dtype: torch.dtype = torch.long,
    what: str = "rollout tokens",
    step: int | None = None,
) -> dict[tuple[int, int], torch.Tensor]:
    """Carry out ``moves`` (the same list on every rank): ``values[s]`` (``[L_s, *tail]``) is what this
    rank sends of sample ``s``. Returns ``(sample, src) -> [L_s, *tail]`` tensors for the moves this
    rank receives, zero outside the moved ranges.

    ``world - 1`` rounds: in round ``k`` every rank sends one message to ``rank + k`` and receives
    one from ``rank - k`` (each the concatenation of that pair's moves in list order); a pair with
    nothing to move sends nothing, and both sides know it from the plan."""
    rank, world = mesh.rank, mesh.world_size
    width = 1
    for t in tail:
        width *= int(t)
    received: dict[tuple[int, int], torch.Tensor] = {}

    def size(m: Move) -> int:
        return sum(b - a for a, b in m.ranges) * width

    def target(m: Move) -> torch.Tensor:
        key = (m.sample, m.src)
        if key not in received:
            received[key] = torch.zeros((lengths[m.sample], *tail), dtype=dtype, device=mesh.device)
        return received[key]

    for m in moves:  # this rank's moves to itself
        if m.src == rank and m.dst == rank:
            buf = target(m)
            for a, b in m.ranges:
                buf[a:b] = values[m.sample][a:b].to(buf.device, dtype)
    for k in range(1, world):
        dst, src = (rank + k) % world, (rank - k) % world
        out = [m for m in moves if m.src == rank and m.dst == dst]
        inc = [m for m in moves if m.src == src and m.dst == rank]
        send = None
        if out:
            send = torch.cat(
                [values[m.sample][a:b].to(mesh.device, dtype).reshape(-1) for m in out for a, b in m.ranges]
            )
            if send.numel() == 0:
                send = None
        n_in = sum(size(m) for m in inc)
        recv = torch.empty(n_in, dtype=dtype, device=mesh.device) if n_in else None
        mesh.wait(mesh.exchange(send, dst, recv, src, what=f"{what} (round {k})"))
        at = 0
        for m in inc:
            buf = target(m)
            for a, b in m.ranges:
                n = (b - a) * width
                buf[a:b] = recv[at : at + n].view(b - a, *tail)
                at += n
    return received


def beside_packed(runs, per_sample: dict[int, torch.Tensor]) -> torch.Tensor:
    """Per-token values ``[L_s]`` of each sample laid out as the packed row ``[1, T]``."""
    parts = [per_sample[s][a:b] for s, a, b in runs]
    return torch.cat(parts).unsqueeze(0) if parts else torch.zeros(1, 0)


@dataclass
class RolloutStep:
    """One HDP step over a global batch of rollouts, on this rank."""

    layout: RolloutLayout
    plan: StepPlan
    micro_batches: list[dict]
    runs: list[list[tuple[int, int, int]]]  # packed_ranges of each of this rank's micro-batches
    global_step: int
    samples: dict[int, torch.Tensor] = field(default_factory=dict)  # this rank's (partial) token ids per sample

    @property
    def local_tokens(self) -> int:
        return sum(int(m["input_ids"].shape[1]) for m in self.micro_batches)


def build_rollout_step(
    mesh: DynamicMesh,
    rollouts: Rollouts,
    planner,
    tokens_per_rank: int,
    collator: HDPCollator,
    global_step: int,
    num_heads: int | None = None,
) -> RolloutStep:
    """Gather the layout, plan, move the token ids to the pieces and pack this rank's micro-batches."""
    layout = gather_layout(mesh, rollouts, global_step)
    if not layout.lengths:
        raise HDPDataError("the global batch holds no rollout on any rank; nothing to train on.")
    plan = planner(list(layout.lengths), mesh.world_size, tokens_per_rank)
    if any(p.ulysses != 1 for mb in plan.micro_batches for p in mb.pieces):
        plan.validate(num_heads=num_heads)
    mine = {s: rollouts.sequences[layout.local[s]] for s in layout.samples_of(mesh.rank)}
    got = route(
        mesh,
        moves_to_pieces(plan, layout, extend=1),
        mine,
        layout.lengths,
        (),
        torch.long,
        "rollout token ids",
        global_step,
    )
    ids = {s: buf.cpu() for (s, _), buf in got.items()}
    samples = {}
    for s, buf in ids.items():
        labels = buf.clone()
        labels[: layout.prompt_lengths[s]] = IGNORE_INDEX
        samples[s] = {"input_ids": buf.tolist(), "labels": labels.tolist()}
    names = {s: f"rollout {layout.local[s]} of rank {layout.owners[s]}" for s in range(len(layout.lengths))}
    micro, runs = [], []
    for mb in plan.for_rank(mesh.rank):
        batch = collator(mb, samples, rows=names, step=global_step)
        r = packed_ranges(mb)
        positions = torch.cat([torch.arange(a, b) for _, a, b in r]).unsqueeze(0) if r else None
        if (
            positions is None
            or not torch.equal(positions, batch["position_ids"])
            or not torch.equal(beside_packed(r, ids), batch["input_ids"])
        ):
            raise RuntimeError(
                "hf_hdp: the rollout packing order disagrees with HDPCollator's; per-token values "
                "would sit beside the wrong tokens (hf_hdp.collators.collator.packed_ranges)."
            )
        micro.append(batch)
        runs.append(r)
    return RolloutStep(layout, plan, micro, runs, global_step, ids)


def to_owner(
    mesh: DynamicMesh, step: RolloutStep, held: dict[int, torch.Tensor], tail: tuple, dtype, what: str
) -> dict[int, torch.Tensor]:
    """Per-token results ``[L_s, *tail]`` of the pieces this rank ran, assembled on each sample's owner:
    ``sample -> [L_s, *tail]`` for this rank's own samples."""
    got = route(
        mesh, moves_to_owners(step.plan, step.layout), held, step.layout.lengths, tail, dtype, what, step.global_step
    )
    out: dict[int, torch.Tensor] = {}
    for (s, _), buf in got.items():
        out[s] = buf if s not in out else out[s] + buf  # pieces cover disjoint ranges; zeros elsewhere
    return out


__all__ = [
    "Move",
    "RolloutLayout",
    "RolloutStep",
    "Rollouts",
    "beside_packed",
    "build_rollout_step",
    "gather_layout",
    "local_rollouts",
    "moves_to_owners",
    "moves_to_pieces",
    "route",
    "to_owner",
]
