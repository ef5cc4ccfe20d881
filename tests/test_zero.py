"""Bucketed gradient reduction and ZeRO stages 1 and 2 (``HDPConfig.zero_stage``), on gloo CPU ranks.

- :func:`~hf_hdp.distributed.mesh.plan_buckets` covers every element exactly once, within the bucket bound, and
  puts only a rank's own gradients (and the shared extras) into its reduce-scatter chunks;
- :meth:`~hf_hdp.distributed.mesh.DynamicMesh.reduce_gradients` in small buckets equals the former one-buffer
  reduction (1e-15), issues several collectives and allocates no buffer above the bound; with owners
  (stage 2) each rank keeps exactly its shard's summed gradients;
- :class:`~hf_hdp.engine.zero.ZeroOptimizer` steps exactly as the plain optimizer, holds about
  1/world of its state, and its full state round-trips with a plain AdamW's (any world size);
- HDPTrainer with AdamW and weight decay, ranks running different numbers of micro-batches (one
  none): weights after 4 steps at stages 1 and 2 equal stage 0 and one process (float64, 1e-12);
  stage 2 leaves each rank only its shard's gradients; clipping uses the full gradient's norm; a
  stage 1 checkpoint holds each rank's shard of the optimizer state (consolidated, equal to stage 0's) and resumes bit-exactly,
  and stage 1/2 checkpoints resume at another world size and stage.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_hdp import HDPConfig
from hf_hdp.distributed.buckets import plan_buckets
from hf_hdp.engine.zero import partition, resolve_zero_stage
from tests.dist_utils import run_distributed
from tests.models import CONFIGS, VOCAB, save_tiny_model

STEPS = 4
GLOBAL_BATCH = 3
C_FOR_WORLD = {1: 64, 2: 24, 4: 16}  # a 40-token sample takes 3 ranks on 4, 2 on 2


# ------------------------------------------------------------------ the bucket layout (no processes)
def _covered(buckets, tensors, world, owners):
    """Per rank, the (tensor, element) pairs its chunks hold; checks chunk bounds and overlaps."""
    held = [[] for _ in range(world if owners is not None else 1)]
    for bucket in buckets:
        for r, segments in enumerate(bucket.chunks):
            spans = sorted((s.offset, s.offset + s.stop - s.start) for s in segments)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "segments overlap in a chunk"
            assert all(stop <= bucket.chunk_numel for _, stop in spans)
            for s in segments:
                assert tensors[s.tensor][1] == bucket.dtype and 0 <= s.start < s.stop <= tensors[s.tensor][0]
                held[r].extend((s.tensor, e) for e in range(s.start, s.stop))
    return held


def test_buckets_cover_every_element_once_within_the_bound():
    rng = random.Random(0)
    dtypes = [torch.float64, torch.float32, torch.bfloat16]
    tensors = [(rng.choice([0, 1, 3, 17, 100, 1000, 5000]), rng.choice(dtypes)) for _ in range(40)]
    for bucket_bytes in (64, 1000, 4096, 10**9):
        buckets = plan_buckets(tensors, bucket_bytes)
        assert all(b.numel * torch.empty((), dtype=b.dtype).element_size() <= max(bucket_bytes, 8) for b in buckets)
        (held,) = _covered(buckets, tensors, 1, None)
        assert sorted(held) == [(i, e) for i, (n, _) in enumerate(tensors) for e in range(n)]
        if bucket_bytes == 10**9:
            assert len(buckets) == 3  # one per dtype
        for world in (2, 3, 4):
            owners = [
                rng.choice([None] + list(range(world))) if i % 7 == 0 else rng.randrange(world)
                for i in range(len(tensors))
            ]
            buckets = plan_buckets(tensors, bucket_bytes, owners, world)
            for b in buckets:
                assert len(b.chunks) == world
                assert b.numel * torch.empty((), dtype=b.dtype).element_size() <= max(bucket_bytes, 8 * world)
            held = _covered(buckets, tensors, world, owners)
            for r in range(world):
                want = [(i, e) for i, (n, _) in enumerate(tensors) if owners[i] in (r, None) for e in range(n)]
                assert sorted(held[r]) == want, (bucket_bytes, world, r)


def test_partition_balances_elements_and_is_deterministic():
    params = [torch.empty(n, dtype=torch.float64) for n in (100, 7, 7, 50, 50, 3, 90, 10)]
    owners = partition(params, 3)
    assert owners == partition(params, 3)
    loads = [sum(p.numel() for p, o in zip(params, owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(p.numel() for p in params)
    assert sorted(set(owners)) == [0, 1, 2]


def test_zero_stage_is_validated_and_defaults_to_1_on_several_ranks():
    assert HDPConfig().zero_stage is None
    assert [resolve_zero_stage(None, w) for w in (1, 2, 8)] == [0, 1, 1]
    assert resolve_zero_stage(2, 1) == 0 and resolve_zero_stage(2, 4) == 2 and resolve_zero_stage(0, 4) == 0
    for bad in (3, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"zero_stage must be 0, 1, 2 or None"):
            HDPConfig(zero_stage=bad)


# ------------------------------------------------------------------ reduction and optimizer (gloo ranks)
def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 11), (5,), (300,), (64, 64), (1,), (2, 3, 4), (129,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]


def _set_grads(params, rank: int, step: int = 0):
    g = torch.Generator().manual_seed(1000 * step + rank)
    for i, p in enumerate(params):
        # a rank without a micro-batch has no gradient at all; others miss some parameters
        missing = rank == 1 or (i + rank) % 4 == 0
        p.grad = None if missing else torch.randn(p.shape, generator=g, dtype=p.dtype)


def _reference_sum(params, extras):
    """The former reduction: every gradient and the extras in one flat float64 buffer, one all-reduce."""
    import torch.distributed as dist

    flat = torch.cat(
        [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64) for p in params]
        + [torch.tensor(extras, dtype=torch.float64)]
    )
    dist.all_reduce(flat)
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].view_as(p).clone())
        offset += p.numel()
    return out, flat[offset:].tolist()


def _reduce_worker(rank, world, bucket_bytes):
    from hf_hdp.distributed.mesh import DynamicMesh

    out = {}
    params = _params()
    extras = [rank + 0.5, 1e6 * rank, 3.0]
    _set_grads(params, rank)
    ref, ref_extras = _reference_sum(params, extras)
    # all-reduce buckets
    mesh = DynamicMesh(bucket_bytes=bucket_bytes)
    sums = mesh.reduce_gradients(params, extras=extras, step=3)
    out["allreduce"] = (
        max(float((p.grad - r).abs().max()) for p, r in zip(params, ref)),
        sums,
        ref_extras,
        mesh.stats.collectives,
        mesh.stats.largest_buffer_bytes,
    )
    # reduce-scatter buckets (stage 2): each rank keeps its own parameters' sums
    _set_grads(params, rank)
    owners = partition(params, world)
    mesh = DynamicMesh(bucket_bytes=bucket_bytes)
    sums = mesh.reduce_gradients(params, extras=extras, step=3, owners=owners)
    kept = [i for i, p in enumerate(params) if p.grad is not None]
    diff = max([float((params[i].grad - ref[i]).abs().max()) for i in kept] or [0.0])
    out["scatter"] = (
        kept,
        [i for i, o in enumerate(owners) if o == rank],
        diff,
        sums,
        mesh.stats.collectives,
        mesh.stats.largest_buffer_bytes,
        mesh.gradients_sharded,
    )
    # the full gradient's norm from the shards, the same on every rank
    from hf_hdp.accelerator import HDPAccelerator

    acc = HDPAccelerator.__new__(HDPAccelerator)  # only clip_grad_norm_'s own logic, no accelerate state
    acc.mesh, acc.unscale_gradients = mesh, lambda: None
    full_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(r) for r in ref])))
    out["norm"] = (float(acc.clip_grad_norm_(params, 1e9)), full_norm)
    # mixed dtypes: each bucket in its gradients' own dtype
    p32 = [
        torch.nn.Parameter(torch.ones(50, dtype=torch.float32)),
        torch.nn.Parameter(torch.ones(7, dtype=torch.float64)),
    ]
    for p in p32:
        p.grad = torch.full_like(p, float(rank + 1))
    DynamicMesh(bucket_bytes=bucket_bytes).reduce_gradients(p32, step=3)
    out["dtypes"] = [(p.grad.dtype, float(p.grad[0])) for p in p32]
    return out


def _mesh_worker(rank, world, bucket_bytes):
    """Every mesh-level check of this file in one launch of the ranks (each launch costs seconds of imports):
    the bucketed reduction, the ZeroOptimizer (stage 2; on 4 ranks stage 1 too) and, on 4 ranks, the
    reduction started inside the last backward."""
    out = {
        "reduce": _reduce_worker(rank, world, bucket_bytes),
        "optimizer": {stage: _optimizer_worker(rank, world, stage) for stage in ((1, 2) if world == 4 else (2,))},
    }
    if world == 4:
        out["overlap"] = {sharded: _overlap_worker(rank, world, sharded) for sharded in (False, True)}
    return out


@pytest.fixture(scope="module")
def meshes():
    """:func:`_mesh_worker` on 2 and 4 gloo ranks (1024-byte buckets for the reduction checks)."""
    return {world: run_distributed(_mesh_worker, world, 1024, timeout=400) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_bucketed_reduction_equals_one_buffer_and_stays_within_the_bound(world, meshes):
    bucket_bytes = 1024  # 128 float64 elements: the 64x64 gradient alone spans 32 buckets
    results = [out["reduce"] for out in meshes[world]]
    total = sum(p.numel() for p in _params())
    for rank, out in enumerate(results):
        diff, sums, ref_extras, collectives, largest = out["allreduce"]
        assert diff <= 1e-15, (rank, diff)
        assert sums == pytest.approx(ref_extras, rel=1e-15)
        assert sums[1] == 1e6 * sum(range(world))
        assert collectives >= total * 8 // bucket_bytes > 1  # several buckets, every rank the same number
        assert collectives == results[0]["allreduce"][3]
        assert 0 < largest <= bucket_bytes  # no buffer above the bucket bound (the model is 44 KB here)
        kept, owned, diff, sums2, collectives2, largest2, sharded = out["scatter"]
        assert kept == owned and sharded  # exactly this rank's shard, summed
        assert diff <= 1e-15, (rank, diff)
        assert sums2 == pytest.approx(ref_extras, rel=1e-15)
        assert collectives2 > 1 and 0 < largest2 <= bucket_bytes
        norm, full_norm = out["norm"]
        assert norm == pytest.approx(full_norm, rel=1e-14) and norm == results[0]["norm"][0]
        assert out["dtypes"] == [(torch.float32, world * (world + 1) / 2), (torch.float64, world * (world + 1) / 2)]
    owned_all = sorted(i for out in results for i in out["scatter"][1])
    assert owned_all == list(range(len(_params())))


def _overlap_worker(rank, world, sharded):
    import torch.distributed as dist

    from hf_hdp.distributed.mesh import DynamicMesh

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(16, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 8),
        ).double()

    g = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(5, 16, generator=g, dtype=torch.float64) for _ in range([2, 0, 1, 3][rank])]
    # the reference: the same local gradients in a copy, summed in one flat all-reduce
    ref_model = model()
    for x in inputs:
        ref_model(x).pow(2).sum().backward()
    ref_params = list(ref_model.parameters())
    ref, ref_extras = _reference_sum(ref_params, [rank + 0.5, 2.0])
    # the overlapped reduction: buckets start inside the last backward
    net = model()
    params = list(net.parameters())
    mesh = DynamicMesh(bucket_bytes=2048)  # 256 float64: the 64x64 weights span several buckets
    owners = partition(params, world) if sharded else None
    reduction = mesh.gradient_reduction(params, owners, num_extras=2, step=5)
    for i, x in enumerate(inputs):
        loss = net(x).pow(2).sum()
        with reduction.watch() if i == len(inputs) - 1 else contextlib.nullcontext():
            loss.backward()
    early = reduction.started_in_backward
    sums = reduction.finish([rank + 0.5, 2.0])
    kept = [i for i, p in enumerate(params) if p.grad is not None]
    diff = max([float((params[i].grad - ref[i]).abs().max()) for i in kept] or [0.0])
    dist.barrier()
    return {
        "early": early,
        "buckets": len(reduction.buckets),
        "sums": sums,
        "ref_extras": ref_extras,
        "diff": diff,
        "kept": kept,
        "owned": [i for i, o in enumerate(owners) if o == rank] if sharded else None,
        "collectives": mesh.stats.collectives,
        "largest": mesh.stats.largest_buffer_bytes,
        "n_params": len(params),
    }


@pytest.mark.parametrize("sharded", [False, True])
def test_the_reduction_starts_during_the_last_backward_and_equals_one_flat_all_reduce(sharded, meshes):
    results = [out["overlap"][sharded] for out in meshes[4]]
    for rank, out in enumerate(results):
        assert out["diff"] <= 1e-15, (rank, out["diff"])
        assert out["sums"] == pytest.approx(out["ref_extras"], rel=1e-15) and out["sums"][1] == 8.0
        assert out["collectives"] == results[0]["collectives"] == out["buckets"] > 4  # the same collectives
        assert 0 < out["largest"] <= 2048
        if sharded:
            assert out["kept"] == out["owned"]
        else:
            assert out["kept"] == list(range(out["n_params"]))
    assert results[1]["early"] == 0  # no micro-batch: every bucket starts at finish()
    for rank in (0, 2, 3):  # all but the last-sent bucket (the extras') can start inside backward
        assert 0 < results[rank]["early"] < results[rank]["buckets"], (rank, results[rank]["early"])


def _optimizer_worker(rank, world, stage):
    import torch.distributed as dist

    from hf_hdp.distributed.mesh import DynamicMesh
    from hf_hdp.engine.zero import ZeroOptimizer

    def groups(params):
        return [{"params": params[:4], "weight_decay": 0.1}, {"params": params[4:], "weight_decay": 0.0}]

    mesh = DynamicMesh(bucket_bytes=2048)
    params, plain_params = _params(), _params()
    zero = ZeroOptimizer(groups(params), torch.optim.AdamW, mesh, stage, lr=1e-2, betas=(0.9, 0.99))
    plain = torch.optim.AdamW(groups(plain_params), lr=1e-2, betas=(0.9, 0.99))
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]  # the reduced gradients
        for i, (p, q) in enumerate(zip(params, plain_params)):
            p.grad = grads[i].clone() if stage == 1 or zero.owner_of(p) == rank else None
            q.grad = grads[i].clone()
        zero.step()
        plain.step()
    equal = all(torch.equal(p, q) for p, q in zip(params, plain_params))
    state_numel = sum(v.numel() for s in zero.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    full = zero.full_state_dict(receive=rank == 0)
    reference = plain.state_dict()
    same_state = None
    if rank == 0:
        same_state = (
            sorted(full["state"]) == sorted(reference["state"])
            and all(
                torch.equal(full["state"][i][k], torch.as_tensor(v))
                for i, s in reference["state"].items()
                for k, v in s.items()
            )
            and [{k: v for k, v in g.items()} for g in full["param_groups"]] == reference["param_groups"]
        )
    # a plain optimizer's state (one process) loads into a sharded one, and the next step agrees
    fresh = _params()
    with torch.no_grad():
        for p, q in zip(fresh, plain_params):
            p.copy_(q)
    other = ZeroOptimizer(groups(fresh), torch.optim.AdamW, mesh, stage, lr=1e-2, betas=(0.9, 0.99))
    other.load_state_dict(copy.deepcopy(reference))  # as if read from a checkpoint: no shared tensors
    for p, q in zip(fresh, plain_params):
        g = torch.full(p.shape, 0.01, dtype=p.dtype)
        p.grad = g.clone() if stage == 1 or other.owner_of(p) == rank else None
        q.grad = g.clone()
    other.step()
    plain.step()
    resumed = all(torch.equal(p, q) for p, q in zip(fresh, plain_params))
    # the placeholder state_dict() returns loads nowhere else
    placeholder = zero.state_dict()
    refused = False
    try:
        other.load_state_dict(placeholder)
    except ValueError as err:
        refused = "placeholder" in str(err)
    zero.load_state_dict(placeholder)  # its own: a no-op
    dist.barrier()
    return equal, state_numel, same_state, resumed, refused, sum(p.numel() for p in params)


@pytest.mark.parametrize("world,stage", [(2, 2), (4, 1), (4, 2)])
def test_zero_optimizer_steps_as_the_plain_one_and_holds_its_shard(world, stage, meshes):
    results = [out["optimizer"][stage] for out in meshes[world]]
    total = results[0][5]
    largest = max(p.numel() for p in _params())
    numels = [r[1] for r in results]
    assert sum(numels) == 2 * total  # AdamW's two moments, each held once over all ranks
    assert all(n <= 2 * (total / world + largest) for n in numels), numels
    assert all(n < 2 * total for n in numels)
    for rank, (equal, _, _same_state, resumed, refused, _) in enumerate(results):
        assert equal, rank  # bit-equal weights on every rank
        assert resumed, rank
        assert refused, rank
    assert results[0][2]  # the gathered full state is the plain optimizer's, tensor for tensor


STALL_S = 2.5


def _stalled_worker(rank, world, which):
    import torch.distributed as dist

    from hf_hdp.distributed.mesh import CollectiveTimeoutError, DynamicMesh, HDPCommError

    mesh = DynamicMesh(p2p_timeout_s=STALL_S, bucket_bytes=64)
    params = [torch.nn.Parameter(torch.ones(40, dtype=torch.float64))]
    params[0].grad = torch.ones(40, dtype=torch.float64)
    # start together: on a loaded machine the ranks reach this line seconds apart, and a stalled rank that stopped
    # sleeping (and exited) before the others' bound ran out would make them see a closed connection instead
    dist.barrier()
    if rank == world - 1:
        time.sleep(STALL_S + 8)  # alive, but never reaches the collective, until well after the others' bound
        return None
    started = time.monotonic()
    try:
        if which == "reduce-scatter":
            mesh.reduce_gradients(params, extras=[1.0], step=7, owners=[0])
        elif which == "all-gather":
            mesh.gather_parameters(params, [0], step=7)
        else:
            mesh.gather_bytes(b"x" * 100, rank == 0, "optimizer state gather (ZeRO)", step=7)
    except HDPCommError as err:
        elapsed = time.monotonic() - started
        time.sleep(STALL_S + 8 - elapsed)  # until the other waiting ranks timed out too (the stalled rank is alive)
        return type(err) is CollectiveTimeoutError, elapsed, str(err)
    return "no error"


@pytest.mark.parametrize(
    "which,texts",
    [
        ("reduce-scatter", ("the gradient reduction, bucket 1 of 21 (a reduce-scatter over all 3 ranks)",)),
        ("all-gather", ("the weight all-gather (ZeRO), bucket 1 of 20 (an all-gather over all 3 ranks)",)),
        ("gather", ("the optimizer state gather (ZeRO) (sizes) (an all-reduce over all 3 ranks)",)),
    ],
)
def test_a_stalled_rank_makes_zeros_collectives_time_out_within_the_bound(which, texts):
    # 64-byte buckets: 2 float64 per rank chunk, so rank 0's 40 elements (and 1 extra) take 21 and 20 buckets
    results = run_distributed(_stalled_worker, 3, which, timeout=90)
    for rank, outcome in enumerate(results[:-1]):
        is_timeout, elapsed, message = outcome
        assert is_timeout, message
        assert STALL_S - 0.5 < elapsed < STALL_S + 6, elapsed  # the bound, plus a loaded machine's scheduling
        assert f"rank {rank}:" in message and "global step 7" in message, message
        assert all(t in message for t in texts), message
        assert f"within {STALL_S:g} s" in message and "p2p_timeout_s" in message, message


# ------------------------------------------------------------------ HDPTrainer end to end
def _rows() -> list[dict]:
    """4 samples of 40 tokens and 8 of 3: a 40-token sample takes 3 of 4 ranks (C = 16), so in a
    step a rank runs none, one or two micro-batches."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(12):
        n = 40 if i % 3 == 0 else 3
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 4) + ids[n // 4 :] if i % 2 else list(ids)})
    return rows


def _train(
    model_path,
    out_dir,
    world,
    *,
    optim="adamw_torch",
    zero_stage=None,
    max_grad_norm=1.0,
    save_steps=0,
    resume=None,
    steps=STEPS,
    fsdp=None,
    fsdp_config=None,
    gradient_checkpointing=False,
    evaluate=False,
):
    """Train HDPTrainer in this process (rank of a gloo group, or alone); return what the tests compare."""
    from transformers import TrainerCallback, TrainingArguments

    from hf_hdp import HDPTrainer
    from hf_hdp.engine.zero import unwrap_zero
    from tests.models import load_model

    args = TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        max_steps=steps,
        optim=optim,
        learning_rate=1e-2 if optim.startswith("adamw") else 0.3,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        **({"fsdp": fsdp, "fsdp_config": fsdp_config} if fsdp else {}),
        **({"gradient_checkpointing": True} if gradient_checkpointing else {}),
    )
    model = load_model(model_path)
    trainer = HDPTrainer(
        model,
        args,
        train_dataset=Dataset.from_list(_rows()),
        hdp_config=HDPConfig(
            planner="naive", tokens_per_rank=C_FOR_WORLD[world], global_batch_size=GLOBAL_BATCH, zero_stage=zero_stage
        ),
    )
    record = {"micro_batches": [], "grads": []}
    step_fn = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):
        record["micro_batches"].append(len(inputs["hdp_step"].micro_batches))
        return step_fn(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step

    class Grads(TrainerCallback):  # after the reduction and clipping, before the optimizer step
        def on_pre_optimizer_step(self, args, state, control, **kw):
            record["grads"].append([i for i, p in enumerate(trainer.model.parameters()) if p.grad is not None])

    trainer.add_callback(Grads())
    trainer.train(resume_from_checkpoint=resume)
    from hf_hdp.engine.fsdp import full_model_state, local_tensor

    zero = unwrap_zero(trainer.optimizer)
    state = zero.state if zero is not None else trainer.optimizer.state
    record["state_numel"] = sum(
        local_tensor(v).numel() for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
    )
    record["param_numel"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record["n_params"] = len(list(model.parameters()))
    record["owned"] = (
        [i for i, p in enumerate(model.parameters()) if zero.owner_of(p) == zero.mesh.rank]
        if zero is not None
        else None
    )
    record["stage"] = None if zero is None else zero.stage
    record["grad_norms"] = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    record["weights"] = full_model_state(model)  # FSDP: every rank gathers the whole weights
    record["local_param_numel"] = sum(local_tensor(p).numel() for p in model.parameters())
    record["fsdp_modules"] = len(trainer.hdp_fsdp_modules)
    record["fsdp_mode"] = trainer.hdp_fsdp
    record["early_buckets"] = trainer.mesh.stats.buckets_started_in_backward
    if evaluate:  # after training: with FSDP, on the sharded model
        record["eval_loss"] = trainer.evaluate(Dataset.from_list(_rows()[:7]))["eval_loss"]
    return record


RUNS_4 = {  # name: (keyword arguments of _train, DEFAULT_BUCKET_BYTES or None)
    "stage0": (dict(zero_stage=0, save_steps=2), None),
    "default": (dict(save_steps=2), 4096),  # zero_stage=None: stage 1 on 4 ranks, small buckets
    "stage2": (dict(zero_stage=2, save_steps=2), 4096),
    "sgd_clip_stage0": (dict(optim="sgd", zero_stage=0, max_grad_norm=0.05), None),
    "sgd_clip_stage2": (dict(optim="sgd", zero_stage=2, max_grad_norm=0.05), 4096),
    "resume_stage1": (dict(zero_stage=1, resume="default/checkpoint-2"), 4096),
}
RUNS_2 = {
    "stage2": (dict(zero_stage=2), 2048),
    "from4_stage2_at_stage1": (dict(zero_stage=1, resume="stage2/checkpoint-2"), None),
    "from4_stage1_at_stage2": (dict(zero_stage=2, resume="default/checkpoint-2"), 4096),
}
# FSDP2 (tests/test_fsdp.py) trains in the same processes: one launch of each world for both files
FSDP_RUNS_4 = {
    "full_shard": (dict(fsdp="full_shard", save_steps=2, evaluate=True), None),
    "shard_grad_op": (dict(fsdp="shard_grad_op", save_steps=2, evaluate=True), None),
}
FSDP_RUNS_2 = {
    "full_shard_from4_grad_op": (dict(fsdp="full_shard", resume="shard_grad_op/checkpoint-2"), None),
    # transformers' current spelling: fsdp=True, the strategy in fsdp_config
    "grad_op_checkpointing": (
        dict(fsdp=True, fsdp_config={"reshard_after_forward": False}, gradient_checkpointing=True),
        None,
    ),
    "full_shard_checkpointing": (dict(fsdp="full_shard", gradient_checkpointing=True), None),
    # tied input and output embeddings: one parameter in FSDP's root unit
    "full_shard_tied": (dict(fsdp="full_shard", model="tied"), None),
}


def _trainer_worker(rank, world, model_path, base, runs):
    import hf_hdp.distributed.mesh

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    default_bucket = hf_hdp.distributed.mesh.DEFAULT_BUCKET_BYTES
    out = {}
    for name, (kwargs, bucket) in runs.items():
        hf_hdp.distributed.mesh.DEFAULT_BUCKET_BYTES = bucket or default_bucket
        kwargs = dict(kwargs)
        if kwargs.get("resume"):
            kwargs["resume"] = os.path.join(base, "w4", kwargs["resume"])
        path = os.path.join(base, kwargs.pop("model")) if "model" in kwargs else model_path
        out[name] = _train(path, os.path.join(base, f"w{world}", name), world, **kwargs)
    return out


def train_all(base) -> dict:
    """Every run of this file and tests/test_fsdp.py (the ``sharded_runs`` fixture of tests/conftest.py)."""
    model = save_tiny_model("llama", str(base / "model"))
    tied = CONFIGS["llama"]()
    tied.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tied).save_pretrained(str(base / "tied"))
    four = run_distributed(_trainer_worker, 4, model, str(base), {**RUNS_4, **FSDP_RUNS_4}, timeout=900)
    two = run_distributed(_trainer_worker, 2, model, str(base), {**RUNS_2, **FSDP_RUNS_2}, timeout=600)
    one = {
        "adamw": _train(model, str(base / "w1" / "adamw"), 1, save_steps=2, evaluate=True),
        "sgd_clip": _train(model, str(base / "w1" / "sgd"), 1, optim="sgd", max_grad_norm=0.05),
        "tied": _train(str(base / "tied"), str(base / "w1" / "tied"), 1),
    }
    return {"base": base, 4: four, 2: two, 1: one}


@pytest.fixture(scope="module")
def trained(sharded_runs):
    return sharded_runs


def _close(a, b, what):
    for k, w in b.items():
        torch.testing.assert_close(a[k], w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what} {k}: {m}")


def test_ranks_ran_different_numbers_of_micro_batches_one_none(trained):
    counts = [trained[4][r]["stage0"]["micro_batches"] for r in range(4)]  # [rank][step]
    per_step = list(zip(*counts))
    assert len(per_step) == STEPS
    assert any(0 in s for s in per_step), per_step  # a rank with nothing to run
    assert any(len(set(s)) > 1 and max(s) >= 2 for s in per_step), per_step
    assert any(0 in s for s in zip(*[trained[2][r]["stage2"]["micro_batches"] for r in range(2)]))


def test_stages_1_and_2_train_the_same_weights_as_stage_0_and_one_process(trained):
    one = trained[1]["adamw"]["weights"]
    four = trained[4]
    for r in range(4):
        assert (
            four[r]["default"]["stage"] == 1 and four[r]["stage2"]["stage"] == 2 and four[r]["stage0"]["stage"] is None
        )
        for name in ("stage0", "default", "stage2"):
            _close(four[r][name]["weights"], one, f"rank {r} {name}")
            for k, w in four[0][name]["weights"].items():  # every rank holds the same weights, bit for bit
                assert torch.equal(four[r][name]["weights"][k], w), (r, name, k)
    for r in range(2):
        _close(trained[2][r]["stage2"]["weights"], one, f"2 ranks, rank {r}")


def test_the_trainers_reduction_started_during_the_last_backward(trained):
    # the runs' 4 KiB buckets started inside backward on ranks with micro-batches,
    # rings in that backward included (a 40-token sample on 3 ranks), with no hang and the weights above
    for name in ("default", "stage2"):
        early = [trained[4][r][name]["early_buckets"] for r in range(4)]
        assert sum(early) > 0, (name, early)
    # stage 0 runs with 25 MiB buckets: the tiny model is one bucket, with the extras, so it is sent last
    assert [trained[4][r]["stage0"]["early_buckets"] for r in range(4)] == [0] * 4
    assert trained[1]["adamw"]["early_buckets"] == 0  # one process: nothing to reduce


def test_each_rank_holds_only_its_shard_of_the_optimizer_state(trained):
    four = trained[4]
    total = four[0]["stage0"]["param_numel"]
    assert all(four[r]["stage0"]["state_numel"] == 2 * total for r in range(4))  # replicated: both moments
    for name in ("default", "stage2"):
        numels = [four[r][name]["state_numel"] for r in range(4)]
        assert sum(numels) == 2 * total, (name, numels)
        assert all(0.15 * total <= n <= 0.75 * total for n in numels), (name, numels, total)  # about 2/4 each
        owned = sorted(i for r in range(4) for i in four[r][name]["owned"])
        assert owned == list(range(four[0][name]["n_params"]))  # every parameter has exactly one owner


def test_stage_2_leaves_each_rank_only_its_shards_gradients(trained):
    four = trained[4]
    n_params = len(four[0]["stage0"]["grads"][0])
    for r in range(4):
        assert all(len(g) == n_params for g in four[r]["stage0"]["grads"])  # stage 0: every gradient
        assert all(len(g) == n_params for g in four[r]["default"]["grads"])  # stage 1: all-reduced, whole
        owned = four[r]["stage2"]["owned"]
        assert 0 < len(owned) < n_params
        assert all(g == owned for g in four[r]["stage2"]["grads"]), r
    assert sorted(i for r in range(4) for i in four[r]["stage2"]["owned"]) == list(range(n_params))


def test_clipping_at_stage_2_uses_the_full_gradients_norm(trained):
    four, one = trained[4], trained[1]["sgd_clip"]
    norms0 = four[0]["sgd_clip_stage0"]["grad_norms"]
    assert len(norms0) == STEPS and all(n > 0.05 for n in norms0)  # every step really was clipped
    for r in range(4):
        assert four[r]["sgd_clip_stage2"]["grad_norms"] == pytest.approx(norms0, rel=1e-12)
        _close(four[r]["sgd_clip_stage2"]["weights"], four[0]["sgd_clip_stage0"]["weights"], f"rank {r} clip")
    _close(four[0]["sgd_clip_stage2"]["weights"], one["weights"], "clip vs one process")


def test_a_stage_1_checkpoint_holds_each_ranks_shard_and_consolidates_to_stage_0s_state(trained, tmp_path):
    from hf_hdp.engine.export import consolidate

    base = trained["base"]
    folder = base / "w4" / "default" / "checkpoint-2"
    assert not (folder / "optimizer.pt").exists()  # sharded: every rank wrote its own part
    assert sorted(p.name for p in (folder / "hdp_sharded").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    zero = torch.load(
        consolidate(str(folder), str(tmp_path / "c"), optimizer=True) + "/optimizer.pt", weights_only=False
    )
    plain = torch.load(base / "w4" / "stage0" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert [g["params"] for g in zero["param_groups"]] == [g["params"] for g in plain["param_groups"]]
    assert [g["lr"] for g in zero["param_groups"]] == [g["lr"] for g in plain["param_groups"]]
    assert (
        sorted(zero["state"])
        == sorted(plain["state"])
        == list(range(sum(len(g["params"]) for g in plain["param_groups"])))
    )
    for i, s in plain["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(torch.as_tensor(zero["state"][i][k]), torch.as_tensor(v), rtol=1e-10, atol=1e-14)
    assert (folder / "hdp_state.json").exists()


def test_resume_under_stage_1_gives_the_uninterrupted_weights(trained):
    four = trained[4]
    for r in range(4):
        for k, w in four[r]["default"]["weights"].items():
            assert torch.equal(four[r]["resume_stage1"]["weights"][k], w), (r, k)
        assert four[r]["resume_stage1"]["micro_batches"] == four[r]["default"]["micro_batches"][2:]


def test_zero_checkpoints_resume_at_another_world_size_and_stage(trained):
    full = trained[4][0]["stage0"]["weights"]
    for r in range(2):
        for name in ("from4_stage2_at_stage1", "from4_stage1_at_stage2"):
            assert len(trained[2][r][name]["micro_batches"]) == STEPS - 2
            _close(trained[2][r][name]["weights"], full, f"2 ranks, rank {r}, {name}")
