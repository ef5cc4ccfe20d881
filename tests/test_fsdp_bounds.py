"""FSDP2's own collectives under HDP's bound (:mod:`hf_hdp.engine.fsdp`): a rank stopped mid-step makes every
waiting rank raise :class:`CollectiveTimeoutError` within ``HDPConfig.p2p_timeout_s``, and a rank that dies
mid-step makes every surviving rank raise :class:`PeerCrashedError` (or the timeout), never gloo's raw error;
both name the rank, FSDP's collective and the global step. 3 gloo ranks, HDPTrainer, both FSDP modes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.dist_utils import run_distributed
from tests.models import save_tiny_model

STALL_S = 4.0  # the bound in these tests (HDPConfig.p2p_timeout_s)
FAULT_STEP = 2  # the global step during which the faulty rank stops or dies
FAULT_RANK = 2


def _rows() -> list[dict]:  # all shorter than a rank holds: no ring, so FSDP is the only wait
    import torch

    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 128, (12 if i % 3 == 0 else 4,), generator=g).tolist()} for i in range(18)]


def _fault_worker(rank, world, model_path, out_dir, fsdp, fault):
    """HDPTrainer with ``fsdp`` on 3 ranks; at :data:`FAULT_STEP`, rank :data:`FAULT_RANK` stops (SIGSTOP) or
    exits (``os._exit``) at the start of its first forward of the last decoder layer, inside FSDP's part of the
    step. The other ranks return (error type, seconds from the barrier before the step to the error, message)."""
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hdp import HDPConfig, HDPTrainer
    from hf_hdp.distributed import HDPCommError
    from tests.models import load_model

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    args = TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=3,
        save_strategy="no",
        learning_rate=1e-3,
        fsdp=fsdp,
    )
    model = load_model(model_path, dtype=torch.float32)
    trainer = HDPTrainer(
        model,
        args,
        train_dataset=Dataset.from_list(_rows()),
        hdp_config=HDPConfig(planner="naive", tokens_per_rank=16, global_batch_size=6, p2p_timeout_s=STALL_S),
    )
    step_fn = trainer.training_step
    clock = {}

    def faulty_step(model, inputs, num_items_in_batch=None):
        if inputs["hdp_step"].global_step == FAULT_STEP and "start" not in clock:
            dist.barrier()  # start together: on a loaded machine the ranks reach the step seconds apart
            clock["start"] = time.monotonic()
            if rank == FAULT_RANK:

                def stop(*_):
                    handle.remove()  # once
                    if fault == "stall":
                        os.kill(os.getpid(), signal.SIGSTOP)  # alive, silent, until rank 0 sends SIGCONT
                    else:
                        os._exit(0)  # gone without a word: sockets closed by the OS

                handle = trainer.model.model.layers[-1].register_forward_pre_hook(stop, prepend=True)
        return step_fn(model, inputs, num_items_in_batch)

    trainer.training_step = faulty_step
    try:
        trainer.train()
    except HDPCommError as err:
        outcome = (type(err).__name__, time.monotonic() - clock["start"], str(err))
    except Exception as err:
        outcome = (type(err).__name__, time.monotonic() - clock.get("start", 0.0), str(err))
    else:
        outcome = ("no error", None, "")
    if rank == FAULT_RANK:  # resumed by SIGCONT after the others' bound: its own failure is not tested
        return None
    time.sleep(max(0.0, STALL_S + 6 - (time.monotonic() - clock["start"])))  # until the others timed out too
    if fault == "stall" and rank == 0:
        os.kill(pids[FAULT_RANK], signal.SIGCONT)
    return outcome


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("fsdp_bounds") / "model"))


@pytest.mark.parametrize(
    "fsdp,collective",
    [
        (
            "shard_grad_op",
            "FSDP reduce-scatter of the gradients",
        ),  # the step's one reduce-scatter (placeholder backward)
        ("full_shard", "FSDP all-gather of the weights of model.layers.1"),  # the stalled rank stopped before it
    ],
)
def test_a_stalled_rank_makes_fsdps_collectives_time_out_within_the_bound(fsdp, collective, model_path, tmp_path):
    results = run_distributed(_fault_worker, 3, model_path, str(tmp_path), fsdp, "stall", timeout=240)
    for rank, outcome in enumerate(results):
        if rank == FAULT_RANK:
            continue
        kind, elapsed, message = outcome
        assert kind == "CollectiveTimeoutError", (rank, kind, message)
        assert STALL_S - 0.5 < elapsed < STALL_S + 8, (rank, elapsed)  # the bound, plus a loaded machine's scheduling
        assert f"rank {rank}:" in message and f"global step {FAULT_STEP}" in message, message
        assert collective in message and f"within {STALL_S:g} s" in message and "p2p_timeout_s" in message, message


@pytest.mark.parametrize("fsdp", ["shard_grad_op", "full_shard"])
def test_a_rank_that_dies_mid_step_is_reported_as_crashed_under_fsdp(fsdp, model_path, tmp_path):
    results = run_distributed(_fault_worker, 3, model_path, str(tmp_path), fsdp, "kill", timeout=240)
    kinds = []
    for rank, outcome in enumerate(results):
        if rank == FAULT_RANK:
            assert outcome is None
            continue
        kind, elapsed, message = outcome
        kinds.append(kind)
        assert kind in ("PeerCrashedError", "CollectiveTimeoutError"), (rank, kind, message)
        assert elapsed < STALL_S + 8, (rank, elapsed)
        assert f"rank {rank}" in message and f"global step {FAULT_STEP}" in message and "FSDP " in message, message
    assert "PeerCrashedError" in kinds, kinds  # at least the ranks connected to the dead one see the crash
