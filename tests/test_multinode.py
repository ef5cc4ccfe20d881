"""A real multi-node launch on one machine: two torchrun agents (c10d rendezvous), 2 nodes x 2 ranks.

The agents train the tiny saved Llama with HDPTrainer under ``attention_split="hybrid"`` and
``HDPConfig.ranks_per_node`` unset (tests/scripts/multinode_train.py), so the trainer takes 2 ranks per
node from the launcher's ``LOCAL_WORLD_SIZE``. Samples of 49 and 60 tokens (C = 16: k_min = 4) become
hybrid pieces, Ulysses 2 inside each node x a ring of 2 across the nodes; the final weights equal one
process's (``tests.dist_utils.run_train_steps``, train_steps.py's data and arguments) in float64.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.dist_utils import ROOT, free_port, run_train_steps
from tests.models import load_model, save_tiny_model

SCRIPT = os.path.join(ROOT, "tests", "scripts", "multinode_train.py")
NODES, PER_NODE = 2, 2
STEPS, GLOBAL_BATCH, C = 3, 20, 16  # every one of the 3 global batches holds a sample of 49 or 60 tokens
TIMEOUT_S = 240


def _stop(agents: list[subprocess.Popen]) -> None:
    """Stop the agents and their workers. torchrun starts each worker in a session of its own, so killing an
    agent (or its process group) leaves them running: SIGTERM the agents (each then stops its workers), and
    kill whatever of them and their workers, found beforehand, is still alive after a grace period."""
    workers = []
    for a in agents:
        try:
            workers += psutil.Process(a.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for a in agents:
        if a.poll() is None:
            a.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(a.poll() is None for a in agents) and time.monotonic() < deadline:
        time.sleep(0.2)
    for a in agents:
        if a.poll() is None:
            a.kill()
    _, alive = psutil.wait_procs(workers, timeout=5)
    for w in alive:
        w.kill()


def _launch_two_nodes(model: str, out: str) -> float:
    """Start both agents at once; wait for both (killing both on a timeout or when one fails); return seconds."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    env.pop("LOCAL_WORLD_SIZE", None)  # only the launcher may set it
    agents, logs = [], []
    started = time.monotonic()
    for node in range(NODES):
        # --local-addr: the workers' MASTER_ADDR is the rendezvous leader's address, by default its hostname,
        # which need not resolve everywhere (containers); on one machine 127.0.0.1 always does
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(NODES),
            "--nproc-per-node",
            str(PER_NODE),
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            f"hdp-multinode-{port}",
            "--local-addr",
            "127.0.0.1",
            "--max-restarts",
            "0",
            "--monitor-interval",
            "0.5",
            SCRIPT,
            "--model",
            model,
            "--out",
            out,
            "--steps",
            str(STEPS),
            "--global_batch_size",
            str(GLOBAL_BATCH),
            "--tokens_per_rank",
            str(C),
        ]
        log = open(os.path.join(out, f"agent{node}.log"), "w+")
        logs.append(log)
        agents.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    failure = None
    try:
        while any(a.poll() is None for a in agents):
            if time.monotonic() - started > TIMEOUT_S:
                failure = f"timed out after {TIMEOUT_S} s (a hang)"
                break
            if any(a.poll() not in (None, 0) for a in agents):
                time.sleep(5)  # let the other agent notice and write its error, then stop it
                failure = "an agent failed"
                break
            time.sleep(0.5)
    finally:
        if failure is not None or any(a.poll() is None for a in agents):
            _stop(agents)
        for a in agents:
            a.wait()
    codes = [a.returncode for a in agents]
    if failure is None and any(codes):
        failure = "an agent failed"
    texts = []
    for node, log in enumerate(logs):
        log.seek(0)
        texts.append(f"----- agent {node} (node rank {node}, exit {codes[node]}) -----\n{log.read()[-6000:]}")
        log.close()
    assert failure is None, failure + "\n" + "\n".join(texts)
    return time.monotonic() - started


def test_two_torchrun_agents_train_hybrid_pieces_across_nodes_like_one_process(tmp_path):
    model = save_tiny_model("llama", str(tmp_path / "model"))
    out = tmp_path / "two_nodes"
    out.mkdir()
    wall = _launch_two_nodes(model, str(out))
    ranks = {}
    for r in range(NODES * PER_NODE):
        with open(out / f"rank{r}.json") as f:
            ranks[r] = json.load(f)
    with open(out / "plan.json") as f:
        record = json.load(f)
    # the launch: ranks 0, 1 on node 0 and 2, 3 on node 1, two ranks per node, one world of 4
    for r, env in ranks.items():
        assert (int(env["GROUP_RANK"]), int(env["LOCAL_RANK"])) == divmod(r, PER_NODE), ranks
        assert env["LOCAL_WORLD_SIZE"] == str(PER_NODE) and env["WORLD_SIZE"] == str(NODES * PER_NODE), ranks
    assert record["world_size"] == NODES * PER_NODE
    # ranks_per_node came from LOCAL_WORLD_SIZE (HDPConfig.ranks_per_node is unset in the script)
    assert record["ranks_per_node"] == PER_NODE, record
    # every step's long sample (k_min = 4) is a hybrid piece: Ulysses 2 inside each node x a ring of 2 across
    assert [p["global_step"] for p in record["plans"]] == [1, 2, 3], record["plans"]
    for plan in record["plans"]:
        long = [p for p in plan["pieces"] if p["length"] > 3 * C]
        assert long, plan
        for p in long:
            assert p["split"] == "hybrid" and p["ulysses"] == 2 and len(p["group"]) == 4, plan
            subgroups = {frozenset(p["group"][i : i + 2]) for i in (0, 2)}
            assert subgroups == {frozenset({0, 1}), frozenset({2, 3})}, plan
    assert max(p["length"] for plan in record["plans"] for p in plan["pieces"]) == 60
    # the weights equal one process's, which trains the same 3 global batches unsplit (C = 64)
    one = run_train_steps(
        1,
        model,
        str(tmp_path / "one"),
        "--steps",
        str(STEPS),
        "--global_batch_size",
        str(GLOBAL_BATCH),
        "--tokens_per_rank",
        "64",
        env={"HF_HUB_OFFLINE": "1"},
    )
    two_nodes = AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float64).state_dict()
    initial = load_model(model).state_dict()
    assert any(not torch.equal(initial[k], one["weights"][k]) for k in initial), "training changed nothing"
    assert set(two_nodes) == set(one["weights"])
    for k, w in one["weights"].items():
        torch.testing.assert_close(two_nodes[k], w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    assert record["losses"] == pytest.approx([e["loss"] for e in one["log_history"] if "loss" in e], rel=1e-6)
    print(f"\ntwo torchrun agents (2 nodes x 2 ranks): {wall:.1f} s; one process: {one['wall']:.1f} s")
