"""No hangs: every HDP wait is bounded and fails with a useful error (a late peer times out, a dead one is
reported as crashed); disagreeing plans stop before P2P; several processes that formed no group are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from hf_hdp.planning import plan_naive
from tests.dist_utils import ROOT, free_port, run_distributed


def _absent_partner_worker(rank, world_size, plan_json, timeout_s):
    from hf_hdp.attention.interface import hdp_attention_forward
    from hf_hdp.collators import HDPCollator
    from hf_hdp.distributed.mesh import DynamicMesh, P2PTimeoutError
    from hf_hdp.planning import StepPlan

    plan = StepPlan.from_json(plan_json)
    if rank == 1:  # never reaches the ring
        time.sleep(timeout_s + 4)
        return None
    mesh = DynamicMesh(p2p_timeout_s=timeout_s)
    (mb,) = plan.for_rank(0)
    packed = HDPCollator()(mb, {0: {"input_ids": list(range(plan.lengths[0]))}}, rows={0: 1234}, step=7)
    meta = packed["hdp_metadata"]
    meta.bind(mesh, "reference")
    t = packed["input_ids"].shape[1]
    q = torch.randn(1, 2, t, 8)
    module = torch.nn.Module()
    module.is_causal, module.layer_idx = True, 0
    started = time.monotonic()
    try:
        hdp_attention_forward(module, q, q, q, None, hdp_metadata=meta)
    except P2PTimeoutError as err:
        return time.monotonic() - started, str(err)
    return None


def test_missing_ring_partner_raises_within_the_timeout_naming_rank_peer_slot_and_sample():
    plan = plan_naive([30], 2, 16)  # one sample on ranks 0 and 1
    elapsed, message = run_distributed(_absent_partner_worker, 2, plan.to_json(), 2.0, timeout=60)[0]
    assert elapsed < 10, elapsed
    assert "rank 0" in message and "rank 1" in message
    assert "slot 0" in message and "samples [1234]" in message and "global step 7" in message


def _mismatch_worker(rank, world_size):
    from hf_hdp.distributed.mesh import DynamicMesh, PlanMismatchError

    lengths = [30, 5, 7] if rank != 2 else [30, 5, 8]  # rank 2 read a different dataset
    plan = plan_naive(lengths, world_size, 16)
    try:
        DynamicMesh().check_plan(plan.fingerprint(), step=3)
    except PlanMismatchError as err:
        return str(err)
    return None


def test_ranks_with_different_plans_are_stopped_before_any_p2p():
    messages = run_distributed(_mismatch_worker, 3, timeout=60)
    for m in messages:
        assert m is not None and "step 3" in m and "ranks [2]" in m and "ranks [0, 1]" in m


# ------------------------------------------------------------ every HDP wait is bounded
STALL_S = 2.5  # the bound in these tests; a stalled rank sleeps past it


def _collective_worker(rank, world_size, which, stalled_rank):
    """``which`` collective on every rank but ``stalled_rank``, which stays alive past the bound."""
    from hf_hdp.distributed.mesh import CollectiveTimeoutError, DynamicMesh, HDPCommError

    mesh = DynamicMesh(p2p_timeout_s=STALL_S)
    # first, a collective every rank joins: the evaluation sum, in float64
    sums = mesh.sum_scalars([float(rank), 0.5, 1e-17 * (rank + 1)], "evaluation loss sum", step=4)
    if rank == stalled_rank:
        time.sleep(STALL_S + 2.5)  # alive past the others' errors, but never reaches the collective
        return sums, None
    started = time.monotonic()
    try:
        if which == "plan check":
            mesh.check_plan(12345, step=5)
        else:
            params = [torch.nn.Parameter(torch.ones(3))]
            params[0].grad = torch.ones(3)
            mesh.reduce_gradients(params, extras=[1.0], step=5)
    except HDPCommError as err:
        elapsed = time.monotonic() - started
        time.sleep(2)  # stay alive until every waiting rank has timed out (a closed socket reads as a crash)
        return sums, (type(err) is CollectiveTimeoutError, elapsed, str(err))
    return sums, "no error"


def _check_collective_timeouts(results, world_size, stalled_rank, what):
    for rank, (sums, outcome) in enumerate(results):
        assert sums[0] == sum(range(world_size)) and sums[1] == 0.5 * world_size
        assert sums[2] == pytest.approx(1e-17 * sum(range(1, world_size + 1)), rel=1e-12)
        if rank == stalled_rank:
            continue
        is_timeout, elapsed, message = outcome
        assert is_timeout, message
        assert STALL_S - 0.5 < elapsed < STALL_S + 4, elapsed
        assert f"rank {rank}:" in message and f"the {what}" in message and "global step 5" in message, message
        assert f"within {STALL_S:g} s" in message and "p2p_timeout_s" in message, message


def test_a_stalled_rank_makes_the_others_plan_check_time_out_within_the_bound():
    results = run_distributed(_collective_worker, 3, "plan check", 2, timeout=90)
    _check_collective_timeouts(results, 3, 2, "plan check")


def test_a_stalled_rank_makes_the_others_gradient_reduction_time_out_within_the_bound():
    results = run_distributed(_collective_worker, 2, "gradient reduction", 0, timeout=90)
    _check_collective_timeouts(results, 2, 0, "gradient reduction")


def _crashed_peer_worker(rank, world_size, where):
    from hf_hdp.distributed.mesh import DynamicMesh, HDPCommError, PeerCrashedError

    mesh = DynamicMesh(p2p_timeout_s=30.0)  # far longer than the test: a crash must not wait for it
    if rank == 1:
        time.sleep(0.5)
        os._exit(0)  # gone without a word: no destroy_process_group, sockets closed by the OS
    started = time.monotonic()
    try:
        if where == "p2p":
            recv = torch.zeros(4)
            mesh.wait(mesh.exchange(torch.ones(4), 1, recv, 1, what="forward K/V (global step 6, slot 2)"))
        else:
            params = [torch.nn.Parameter(torch.ones(3))]
            mesh.reduce_gradients(params, step=9)
    except HDPCommError as err:
        return type(err) is PeerCrashedError, time.monotonic() - started, str(err)
    return None


def test_a_ring_partner_that_exits_is_reported_as_crashed_not_as_a_timeout():
    crashed, elapsed, message = run_distributed(_crashed_peer_worker, 2, "p2p", timeout=60)[0]
    assert crashed, message
    assert elapsed < 10, elapsed
    assert "rank 0's peer rank 1 closed the connection (the process likely crashed; see its log)" in message
    assert "forward K/V (global step 6, slot 2)" in message and "timed out" not in message


def test_a_rank_that_exits_before_the_gradient_reduction_is_reported_as_crashed():
    crashed, elapsed, message = run_distributed(_crashed_peer_worker, 2, "collective", timeout=60)[0]
    assert crashed, message
    assert elapsed < 10, elapsed
    assert "rank 0's peer rank 1 closed the connection (the process likely crashed; see its log)" in message
    assert "gradient reduction" in message and "global step 9" in message and "timed out" not in message


def test_the_bound_is_finite_by_default_and_the_same_in_config_and_mesh():
    from hf_hdp.config import HDPConfig
    from hf_hdp.distributed.mesh import DEFAULT_TIMEOUT_S, DynamicMesh

    assert HDPConfig().p2p_timeout_s == DEFAULT_TIMEOUT_S == DynamicMesh().timeout_s
    assert 60 <= DEFAULT_TIMEOUT_S <= 3600
    assert DynamicMesh(p2p_timeout_s=None).timeout is None  # the process group's own timeout
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="p2p_timeout_s"):
            HDPConfig(p2p_timeout_s=bad)


def test_sum_scalars_on_one_process_returns_the_values():
    from hf_hdp.distributed.mesh import DynamicMesh

    assert DynamicMesh().sum_scalars([1.5, 2.0], "evaluation loss sum", step=1) == [1.5, 2.0]


# ------------------------------------------- several processes launched, but not one group
def test_world_size_without_a_process_group_is_refused(monkeypatch):
    from hf_hdp.distributed.launch import check_distributed_setup

    args = SimpleNamespace(world_size=1, parallel_mode=None, output_dir="out")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError) as info:
        check_distributed_setup(args)
    message = str(info.value)
    assert "WORLD_SIZE=4" in message and "RANK=3" in message and "torch.distributed is not initialized" in message
    assert "TrainingArguments.world_size is 1" in message and "use_cpu=True" in message and "single process" in message
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed_setup(args)  # one process: nothing to check
    monkeypatch.delenv("WORLD_SIZE")
    check_distributed_setup(args)


def _setup_worker(rank, world_size):
    from hf_hdp.distributed.launch import check_distributed_setup

    os.environ["WORLD_SIZE"] = str(world_size)
    check_distributed_setup(SimpleNamespace(world_size=world_size, output_dir="out"))  # a proper group: fine
    try:
        check_distributed_setup(SimpleNamespace(world_size=1, output_dir="out"))
    except ValueError as err:
        return str(err)
    return None


def test_a_process_group_with_single_process_training_arguments_is_refused():
    for message in run_distributed(_setup_worker, 2, timeout=60):
        assert message is not None and "TrainingArguments.world_size is 1" in message
        assert "not initialized" not in message


SETUP_SCRIPT = """
import os, sys
from transformers import TrainingArguments
from hf_hdp.distributed.launch import check_distributed_setup
args = TrainingArguments(output_dir=sys.argv[1], use_cpu=False, report_to=[])
try:
    check_distributed_setup(args)
    result = "NO ERROR"
except ValueError as err:
    result = "REFUSED: " + str(err)
# one file per process: two processes printing to one pipe can interleave their lines
with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".txt"), "w") as f:
    f.write(result)
"""


def test_torchrun_with_use_cpu_false_on_a_machine_without_gpus_is_refused(tmp_path):
    """What really happens: accelerate joins the processes in a gloo group, but TrainingArguments
    runs each as a single non-parallel process 0 (world_size 1), so each would train alone."""
    script = tmp_path / "setup.py"
    script.write_text(SETUP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        str(tmp_path / "out"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    refusals = [text for text in results if text.startswith("REFUSED:")]
    assert len(refusals) == 2, results
    for line in refusals:
        assert "WORLD_SIZE=2" in line and "TrainingArguments.world_size is 1" in line and "use_cpu=True" in line


def test_a_connection_closed_by_a_peers_timeout_is_a_timeout_not_a_crash():
    """gloo closes a pair when the wait at one end times out; the other end then reads "Application timeout caused
    pair closure". That is a timeout (another rank did not reach the collective), not a crashed peer."""
    from hf_hdp.distributed.mesh import CollectiveTimeoutError, DynamicMesh, PeerCrashedError

    mesh = DynamicMesh(p2p_timeout_s=20)
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:534] Application timeout caused pair closure")
    err = mesh.translate_error(closed, "gradient reduction, bucket 1 of 21", "a reduce-scatter", 7)
    assert type(err) is CollectiveTimeoutError and "global step 7" in str(err), err
    crashed = mesh.translate_error(
        RuntimeError("Connection closed by peer [127.0.0.1]:5000"), "sum", "an all-reduce", 7
    )
    assert type(crashed) is PeerCrashedError, crashed
    assert mesh.translate_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "sum", "x", 7) is None
