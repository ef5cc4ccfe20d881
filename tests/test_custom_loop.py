"""A custom accelerate loop with the public API (HDPAccelerator, hdp_steps, hdp_backward) trains exactly.

On 2 and 4 gloo ranks (one launch each) the loop of ``examples/custom_loop.py`` runs two SGD steps of a
tiny float64 Llama on a batch mixing short samples with ones split over 2-4 ranks, planned by the
balanced planner; ranks run different numbers of micro-batches. Every step's loss and gradients, and the
weights after both steps, equal one process running the same global batches (the "reference" attention
backend). The 2-rank launch also checks that wrong uses are refused with a message (never a hang) and runs
the shipped example itself; a one-process run of the example and a launch without a process group
run as subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
from unittest import mock

import pytest
import torch

from tests.dist_utils import ROOT, run_distributed
from tests.models import load_model, mixed_batch, reference_step, save_tiny_model

EXAMPLE = os.path.join(ROOT, "examples", "custom_loop.py")
# (tokens per rank, sampler seed) per world: the 60-token sample needs 2 and 4 ranks, 40 and 33 need 1-3;
# with these the balanced planner gives the ranks different micro-batch counts in some step (asserted)
SETTINGS = {2: (40, 0), 4: (16, 3)}
BATCH = 5  # samples per step: 2 steps over the 10 samples
LR = 0.1


def _rows() -> list[dict]:
    return [{"input_ids": s["input_ids"], "labels": s.get("labels", s["input_ids"])} for s in mixed_batch()]


def _refused(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return "NOT REFUSED"


def _wrong_uses(acc, model, batch, path) -> dict:
    """Every wrong use raises on every rank before any collective, so no rank waits for another."""
    from accelerate import Accelerator
    from datasets import Dataset
    from torch.nn.parallel import DistributedDataParallel

    from hf_hdp import HDPAccelerator, HDPConfig
    from hf_hdp.engine import run_micro_batches

    step = batch["hdp_step"]
    ddp = DistributedDataParallel(load_model(path))
    plain = Accelerator(cpu=True)
    plain_model = plain.prepare(load_model(path))  # a plain Accelerator wraps it in DDP
    fresh = HDPAccelerator(hdp_config=HDPConfig(tokens_per_rank=32, global_batch_size=BATCH))
    return {
        "prepare_ddp": _refused(lambda: acc.prepare(ddp)),
        "backward_ddp": _refused(lambda: acc.hdp_backward(ddp, batch)),
        "backward_plain_accelerator_model": _refused(lambda: acc.hdp_backward(plain_model, batch)),
        "plain_accelerator_no_mesh": _refused(
            lambda: run_micro_batches(
                load_model(path),
                step.micro_batches,
                step.num_loss_tokens,
                getattr(plain, "mesh", None),
                "reference",
                torch.device("cpu"),
            )
        ),
        "backward_unprepared": _refused(lambda: acc.hdp_backward(load_model(path), batch)),
        "backward_not_a_step": _refused(lambda: acc.hdp_backward(model, {"input_ids": torch.ones(1, 4)})),
        "steps_unprepared": _refused(lambda: fresh.hdp_steps(Dataset.from_list(_rows()))),
        "plain_type": type(plain_model).__name__,
    }


def _loop_worker(rank, world, path, zero_stage, extras: bool):
    # as torchrun sets them (accelerate reads them; the gloo group itself is up already)
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29599",
    )
    from datasets import Dataset

    from hf_hdp import HDPAccelerator, HDPConfig

    torch.use_deterministic_algorithms(True)
    acc = HDPAccelerator(
        hdp_config=HDPConfig(
            tokens_per_rank=SETTINGS[world][0],
            global_batch_size=BATCH,
            attention_backend="reference",
            zero_stage=zero_stage,
        )
    )
    model = load_model(path)  # float64; prepare switches it to the "hdp" attention
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    # a prepared scheduler steps once per optimizer step: HDP's global batch does not grow with the world size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    model.train()
    steps, first = [], None
    for batch in acc.hdp_steps(Dataset.from_list(_rows()), seed=SETTINGS[world][1]):
        first = first or batch
        step = batch["hdp_step"]
        loss = acc.hdp_backward(model, batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        steps.append(
            {
                "rows": step.rows,
                "loss": loss,
                "micro": len(step.micro_batches),
                "grads": grads if rank == 0 else None,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {
        "steps": steps,
        "weights": weights if rank == 0 else {n: w.sum() for n, w in weights.items()},
        "type": type(model).__name__,
    }
    if extras:
        out["refused"] = _wrong_uses(acc, model, first, path)
        printed = io.StringIO()
        # the example ends with end_training(), which would destroy the group run_distributed closes itself
        with (
            mock.patch.object(sys, "argv", [EXAMPLE, "3"]),
            contextlib.redirect_stdout(printed),
            mock.patch("torch.distributed.destroy_process_group"),
        ):
            runpy.run_path(EXAMPLE, run_name="__main__")
        out["example"] = printed.getvalue()
    return out


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("custom_loop") / "llama"))


def _check_against_reference(path, results, world):
    samples = _rows()
    ref_model = load_model(path)
    steps = results[0]["steps"]
    assert len(steps) == 2
    for i, step in enumerate(steps):
        assert all(r["steps"][i]["rows"] == step["rows"] for r in results)
        ref_loss, ref_grads = reference_step(ref_model, [samples[r] for r in step["rows"]])
        for r in results:  # the same loss on every rank
            assert r["steps"][i]["loss"] == pytest.approx(ref_loss, rel=1e-12)
        assert step["grads"], "rank 0 holds gradients"
        for name, g in step["grads"].items():  # at ZeRO stage 2, rank 0's shard of them
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"step {i} {name}: {m}")
        for r in results:  # LambdaLR(1 / (1 + s)), stepped once per optimizer step whatever the world size
            assert r["steps"][i]["lr"] == pytest.approx(LR / (1 + i), rel=1e-15)
        torch.optim.SGD(ref_model.parameters(), lr=LR / (1 + i)).step()  # the ranks' update, rounded the same way
    ref_weights = dict(ref_model.named_parameters())
    for name, w in results[0]["weights"].items():
        torch.testing.assert_close(w, ref_weights[name].detach(), rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for r in results[1:]:  # every rank holds the same weights
        for name, s in r["weights"].items():
            torch.testing.assert_close(s, results[0]["weights"][name].sum(), rtol=1e-12, atol=1e-12)
    counts = [[r["steps"][i]["micro"] for r in results] for i in range(len(steps))]
    assert any(len(set(c)) > 1 for c in counts), f"ranks ran the same micro-batch counts {counts} (world {world})"
    assert all(r["type"] != "DistributedDataParallel" for r in results)


def test_custom_loop_two_ranks_equals_single_process(model_path):
    """2 ranks, ZeRO 1 (the default); the wrong uses; the shipped example."""
    results = run_distributed(_loop_worker, 2, model_path, None, True)
    _check_against_reference(model_path, results, 2)
    refused = results[0]["refused"]
    assert refused["plain_type"] == "DistributedDataParallel"
    for key in ("prepare_ddp", "backward_ddp", "backward_plain_accelerator_model"):
        assert refused[key].startswith("TypeError") and "DistributedDataParallel" in refused[key], refused[key]
        assert "model.module" in refused[key] and "hang" in refused[key], refused[key]
    assert (
        "need the dynamic mesh" in refused["plain_accelerator_no_mesh"]
        and "HDPAccelerator" in refused["plain_accelerator_no_mesh"]
    ), refused["plain_accelerator_no_mesh"]
    assert (
        "not prepared" in refused["backward_unprepared"]
        and "accelerator.prepare(model)" in refused["backward_unprepared"]
    ), refused["backward_unprepared"]
    assert refused["backward_not_a_step"].startswith("TypeError") and "hdp_steps" in refused["backward_not_a_step"]
    assert "no model was prepared" in refused["steps_unprepared"], refused["steps_unprepared"]
    assert results[1]["refused"] == refused  # every rank refused, the same way
    for r, result in enumerate(results):
        lines = [x for x in result["example"].splitlines() if x.startswith(f"rank {r}: step")]
        assert len(lines) == 3, result["example"]


def test_custom_loop_four_ranks_zero2_equals_single_process(model_path):
    """4 ranks, ZeRO stage 2 (reduce-scatter: each rank keeps its shard's gradients)."""
    results = run_distributed(_loop_worker, 4, model_path, 2, False)
    _check_against_reference(model_path, results, 4)
    full = {n for n, _ in load_model(model_path).named_parameters()}
    assert set(results[0]["steps"][0]["grads"]) < full  # sharded: rank 0 holds only its own


def _run(cmd, env):
    return subprocess.run(
        cmd,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", **env),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_example_runs_on_one_process_and_a_launch_without_group_is_refused():
    """``python examples/custom_loop.py``; and WORLD_SIZE=2 without a process group is refused, not hung."""
    proc = _run([sys.executable, EXAMPLE, "2"], {})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [x for x in proc.stdout.splitlines() if x.startswith("rank 0: step")][-1].startswith("rank 0: step 2")
    code = "from hf_hdp import HDPAccelerator, HDPConfig\nHDPAccelerator(hdp_config=HDPConfig(tokens_per_rank=64))\n"
    proc = _run([sys.executable, "-c", code], {"WORLD_SIZE": "2"})
    assert proc.returncode != 0
    assert "WORLD_SIZE=2 processes were launched but torch.distributed is not initialized" in proc.stderr, proc.stderr


def test_accelerate_gradient_accumulation_is_refused():
    """HDP accumulates its micro-batches itself: accelerate's accumulation would skip reduced steps."""
    from hf_hdp import HDPAccelerator, HDPConfig

    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4.*HDPConfig.global_batch_size"):
        HDPAccelerator(hdp_config=HDPConfig(tokens_per_rank=64), gradient_accumulation_steps=4)
